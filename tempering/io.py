"""Files in, files out: atomic writes, JSONL, hashing and the ``meta.json`` written beside outputs.

Every stage writes to a temporary sibling path and renames it into place at the end, so a crash
never leaves a partial output where a later stage (or DVC) would read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tempering import TemperingError

# ----------------------------------------------------------------------------- atomic writes


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` (file or directory); rename it into place on success.

    On any exception the temporary path is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(tmp)
        raise
    if not tmp.exists():
        raise TemperingError(f"{final}: the stage produced no output")
    if tmp.is_file():
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists() and final.is_dir() and tmp.is_dir():
        # Directories cannot be replaced in one rename: move the old one aside first.
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if final.exists() and final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemperingError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise TemperingError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None


def read_json_or_none(path: str | os.PathLike) -> Any | None:
    """The lenient reader, for optional records (metrics a report summarises, an earlier run's
    record, a lock's holder): ``None`` when the file is missing, unreadable or not JSON.
    Inputs a stage depends on use :func:`read_json`, which fails with the file and line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def jsonl_line(row: Any) -> str:
    """One JSON line, UTF-8 as is. A row holding text that is not valid Unicode (a lone surrogate
    from a ``\\ud800`` escape in user data) is written ASCII-escaped instead, so one odd row never
    fails a whole write and nothing is lost: json.loads gives the same value back."""
    line = json.dumps(row, ensure_ascii=False, default=str)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row, ensure_ascii=True, default=str)
    return line + "\n"


def dump_jsonl(rows: Iterable[dict], fh) -> int:
    """Write rows to an open text file, one :func:`jsonl_line` each; returns the number written.
    The one JSONL writer of the project (``write_jsonl`` wraps it atomically)."""
    n = 0
    for row in rows:
        fh.write(jsonl_line(row))
        n += 1
    return n


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows atomically (``\\n`` line ends on every platform); returns the number written."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            n = dump_jsonl(rows, fh)
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by a stage (trusted input: errors name file and line)."""
    path = Path(path)
    if not path.exists():
        raise TemperingError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TemperingError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
    return rows


# ----------------------------------------------------------------------------- hashing


def content_id(obj: Any, length: int = 16) -> str:
    """A stable content hash of a JSON-able object (used as row ``id``)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# A model folder's cards: prose for people (export's ``model_card.md`` quotes each stage's
# timings, a Hugging Face ``README.md`` may name the folder a base was loaded from), never read by
# a loader. Two folders with the same weights, config and tokenizer are the same model.
MODEL_CARDS = frozenset({"README.md", "model_card.md"})


def is_model_folder(path: str | os.PathLike) -> bool:
    """A Hugging Face model (``config.json``) or peft adapter (``adapter_config.json``) folder."""
    path = Path(path)
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def hash_path(path: str | os.PathLike) -> str:
    """sha256 over a file, or over a directory's relative paths and file contents (sorted).

    ``meta.json`` files and hidden temp files are left out, so the hash names the content only;
    so are a model folder's cards (:data:`MODEL_CARDS`, top level): a model's hash, which keys
    the DPO reference and evaluate score caches and the registry's "same weights" check, is its
    weights, config and tokenizer.
    """
    path = Path(path)
    if not path.exists():
        raise TemperingError(f"{path}: not found")
    if path.is_file():
        return sha256_file(path)
    skip = {"meta.json"} | (MODEL_CARDS if is_model_folder(path) else set())
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in skip or any(part.startswith(".tmp-") for part in file.parts):
            continue
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(file).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- provenance


def git_sha(cwd: str | os.PathLike | None = None) -> str | None:
    """The current commit (suffixed ``-dirty`` when the tree has changes), or None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions(names: Iterable[str] = ("torch", "transformers", "peft", "trl", "lm_eval",
                                              "great_expectations", "datasketch", "dvc", "prefect")) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(started: float) -> dict:
    """Where and when a stage ran: git SHA, command line, wall time, finish time (never the same
    twice, so data stages keep it out of their outputs: :func:`write_meta` ``reproducible``)."""
    return {"git_sha": git_sha(), "argv": sys.argv, "wall_time_s": round(time.time() - started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_meta(out_dir: str | os.PathLike, *, stage: str, params: Any, inputs: dict[str, Any],
               started: float, extra: dict | None = None, reproducible: bool = False) -> dict:
    """Write ``meta.json`` beside a stage's output: resolved params, input hashes, library versions
    and, unless ``reproducible``, the run's :func:`provenance` (git SHA, command, times).

    ``reproducible=True`` is for data stages: the same inputs then give a byte-identical folder, so
    DVC sees an unchanged output when a code change re-runs the stage without changing its data,
    and the training stages after it do not re-run. Their provenance goes to the stage's
    ``--metrics`` instead; which code made the data is in ``dvc.lock`` (every dependency's md5)."""
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    meta = {
        "stage": stage,
        "params": params,
        "inputs": {k: (hash_path(v) if isinstance(v, (str, Path)) and Path(v).exists() else v)
                   for k, v in inputs.items()},
        "versions": library_versions(),
    }
    if not reproducible:
        meta.update(provenance(started))
    if extra:
        meta.update(extra)
    out_dir = Path(out_dir)
    target = out_dir / "meta.json" if out_dir.is_dir() else out_dir.with_suffix(".meta.json")
    write_json(target, meta)
    return meta


# ----------------------------------------------------------------------------- model pointers

POINTER_FILE = "pointer.json"


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Follow ``pointer.json`` files (a stage that passes its input through writes one)."""
    path = Path(path)
    for _ in range(8):
        pointer = path / POINTER_FILE
        if not pointer.exists():
            return path
        target = Path(read_json(pointer)["model"])
        path = target if target.is_absolute() else (path / target).resolve()
    raise TemperingError(f"{path}: pointer chain is too long (a loop?)")
