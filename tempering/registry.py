"""The model registry: a directory of immutable versions plus an alias file moved atomically.

    python -m tempering.registry --registry registry list
    python -m tempering.registry --registry registry show v0002
    python -m tempering.registry --registry registry promote v0001     # move `production` to v0001
    python -m tempering.registry --registry registry rollback          # production <- previous

Layout (one folder per model name)::

    registry/<name>/
        aliases.json                 {"production": "v0002", "previous": "v0001"} (atomic replace)
        history.jsonl                one line per alias move (who, when, from, to, why)
        .lock                        flock taken by every writer
        versions/v0001/
            model/                   the exported HF folder (safetensors, tokenizer, model card)
            record.json              metrics, gate report, lineage (data hashes, params, git SHA,
                                     parent model), created_at
            samples/                 per-item benchmark results (champion/challenger comparisons)

A version is written to a temporary sibling and renamed into ``versions/`` only when complete,
so readers never see half a version. Aliases are replaced with write-temp + fsync + rename while
holding the lock, so two promotions at once leave a consistent registry: both versions exist,
numbered without gaps, and the alias points at one of them with ``previous`` at the other.

The local registry is the source of truth; :func:`mirror_wandb` copies a promotion to W&B when
tracking is online, and :func:`git_tag` writes a GTO-style git tag when asked.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tempering import TemperingError
from tempering.io import read_jsonl

VERSION_RE = re.compile(r"^v(\d{4,})$")


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass(frozen=True)
class Registry:
    """A registry folder for one model name: ``Registry(root, name)``."""

    root: Path
    name: str

    def __init__(self, root: str | os.PathLike, name: str = "tempering-model"):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise TemperingError(f"promote.model_name: {name!r} is not a valid registry name "
                                 "(letters, digits, . _ -)")
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "name", name)

    # ------------------------------------------------------------------ paths
    @property
    def home(self) -> Path:
        return self.root / self.name

    @property
    def versions_dir(self) -> Path:
        return self.home / "versions"

    @property
    def aliases_file(self) -> Path:
        return self.home / "aliases.json"

    def version_dir(self, version: str) -> Path:
        return self.versions_dir / version

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self, timeout: float = 600.0) -> Iterator[None]:
        """An exclusive ``flock`` on ``<name>/.lock`` (released when the process dies)."""
        self.home.mkdir(parents=True, exist_ok=True)
        fh = open(self.home / ".lock", "a+")
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TemperingError(f"{self.home}: registry is locked by another writer "
                                             f"for more than {timeout:.0f} s") from None
                    time.sleep(0.05)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    # ------------------------------------------------------------------ reading
    def versions(self) -> list[str]:
        if not self.versions_dir.exists():
            return []
        found = [p.name for p in self.versions_dir.iterdir()
                 if p.is_dir() and VERSION_RE.match(p.name) and (p / "record.json").exists()]
        return sorted(found, key=lambda v: int(v[1:]))

    def aliases(self) -> dict[str, str]:
        if not self.aliases_file.exists():
            return {}
        try:
            data = json.loads(self.aliases_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TemperingError(f"{self.aliases_file}: corrupt alias file ({exc.msg})") from None
        return {str(k): str(v) for k, v in data.items()}

    def resolve(self, ref: str) -> str:
        """A version name from a version (``v0003``) or an alias (``production``)."""
        if VERSION_RE.match(ref):
            if ref not in self.versions():
                raise TemperingError(f"{self.home}: no version {ref} (have {', '.join(self.versions()) or 'none'})")
            return ref
        aliases = self.aliases()
        if ref not in aliases:
            raise TemperingError(f"{self.home}: no alias {ref!r} (have {', '.join(sorted(aliases)) or 'none'})")
        return aliases[ref]

    def record(self, ref: str) -> dict:
        version = self.resolve(ref)
        return json.loads((self.version_dir(version) / "record.json").read_text(encoding="utf-8"))

    def model_path(self, ref: str) -> Path:
        return self.version_dir(self.resolve(ref)) / "model"

    def history(self) -> list[dict]:
        path = self.home / "history.jsonl"
        if not path.exists():
            return []
        return read_jsonl(path)

    # ------------------------------------------------------------------ writing
    def _next_version(self) -> str:
        numbers = [int(v[1:]) for v in self.versions()]
        # Half-written versions (crashed mid-copy) are hidden .tmp- folders: never reuse a number
        # that a complete version already holds.
        return f"v{(max(numbers) + 1 if numbers else 1):04d}"

    def _log(self, entry: dict) -> None:
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid(), **entry}
        with open(self.home / "history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _set_alias(self, alias: str, version: str, reason: str) -> dict[str, str]:
        """Move ``alias`` to ``version``; the old target becomes ``previous`` (caller holds the lock)."""
        aliases = self.aliases()
        old = aliases.get(alias)
        if old == version:
            return aliases
        aliases[alias] = version
        if alias == "production" and old:
            aliases["previous"] = old
        _fsync_write(self.aliases_file, json.dumps(aliases, indent=2, sort_keys=True) + "\n")
        self._log({"alias": alias, "from": old, "to": version, "reason": reason})
        return aliases

    def register(self, model_dir: str | os.PathLike, record: dict, *, alias: str | None = "production",
                 samples_dir: str | os.PathLike | None = None, reason: str = "gate passed") -> str:
        """Copy ``model_dir`` in as a new immutable version; move ``alias`` to it. Returns the version."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise TemperingError(f"{model_dir}: not a model folder (no config.json); nothing registered")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        # Copy outside the lock (slow), rename inside it (fast): concurrent promotions stay short.
        staging = self.versions_dir / f".tmp-staging-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(model_dir, staging / "model")
            if samples_dir and Path(samples_dir).exists():
                shutil.copytree(samples_dir, staging / "samples")
            with self.lock():
                version = self._next_version()
                full = {"version": version, "name": self.name,
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
                _fsync_write(staging / "record.json", json.dumps(full, indent=2, default=str) + "\n")
                os.replace(staging, self.version_dir(version))
                self._log({"registered": version, "reason": reason})
                if alias:
                    self._set_alias(alias, version, reason)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return version

    def set_alias(self, alias: str, ref: str, reason: str = "manual") -> dict[str, str]:
        with self.lock():
            return self._set_alias(alias, self.resolve(ref), reason)

    def rollback(self, alias: str = "production", reason: str = "rollback") -> dict[str, str]:
        """Point ``production`` back at ``previous`` (and ``previous`` at what was production)."""
        with self.lock():
            aliases = self.aliases()
            if "previous" not in aliases or alias not in aliases:
                raise TemperingError(f"{self.home}: nothing to roll back to (no '{alias}' and 'previous' aliases)")
            current, prev = aliases[alias], aliases["previous"]
            aliases[alias], aliases["previous"] = prev, current
            _fsync_write(self.aliases_file, json.dumps(aliases, indent=2, sort_keys=True) + "\n")
            self._log({"alias": alias, "from": current, "to": prev, "reason": reason})
            return aliases


# ----------------------------------------------------------------------------- mirrors


def mirror_wandb(registry: Registry, version: str, alias: str, project: str) -> str | None:
    """Log the version's model as a W&B artifact with ``alias`` when W&B is online; else None.

    The local registry leads: this is a copy for people who browse W&B, never read back.
    """
    if os.environ.get("WANDB_MODE", "offline") != "online":
        return None
    import wandb

    run = wandb.init(project=project, job_type="promote", name=f"promote-{version}")
    try:
        art = wandb.Artifact(registry.name, type="model", metadata=registry.record(version))
        art.add_dir(str(registry.model_path(version)))
        run.log_artifact(art, aliases=[alias, version])
        return f"{project}/{registry.name}:{alias}"
    finally:
        run.finish()


def git_tag(version: str, name: str, alias: str, cwd: str | os.PathLike = ".") -> str | None:
    """A GTO-style annotated tag ``<name>@<version>`` plus ``<name>#<alias>#<n>``; None outside git."""
    import subprocess

    tag = f"{name}@{version}"
    try:
        proc = subprocess.run(["git", "tag", "-a", tag, "-m", f"Registering {name} {version}"],
                              cwd=cwd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return None
        n = len(subprocess.run(["git", "tag", "-l", f"{name}#{alias}#*"], cwd=cwd, capture_output=True,
                               text=True, timeout=30).stdout.split()) + 1
        subprocess.run(["git", "tag", "-a", f"{name}#{alias}#{n}", "-m", f"Promote {name} {version} to {alias}"],
                       cwd=cwd, capture_output=True, text=True, timeout=30)
        return tag
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- CLI


def _show(reg: Registry, ref: str) -> str:
    rec = reg.record(ref)
    aliases = [a for a, v in reg.aliases().items() if v == rec["version"]]
    lines = [f"{reg.name} {rec['version']}" + (f"  ({', '.join(sorted(aliases))})" if aliases else ""),
             f"  created:  {rec.get('created_at')}",
             f"  model:    {reg.model_path(rec['version'])}"]
    lin = rec.get("lineage") or {}
    for key in ("git_sha", "base_model", "parent", "data"):
        if key in lin:
            lines.append(f"  {key + ':':9} {json.dumps(lin[key]) if isinstance(lin[key], dict) else lin[key]}")
    bench = (rec.get("metrics") or {}).get("benchmarks") or {}
    if bench:
        lines.append("  benchmarks:")
        for name, b in bench.items():
            cand, base = (b.get("candidate") or {}).get("acc"), (b.get("base") or {}).get("acc")
            lines.append(f"    {name:24} {b.get('role', ''):8} candidate {cand} base {base}")
    gate = rec.get("gate") or {}
    if gate:
        lines.append(f"  gate:     {'passed' if gate.get('passed') else 'FAILED'}")
        for r in gate.get("reasons") or []:
            lines.append(f"    - {r}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tempering.registry",
                                     description="List, show, promote and roll back model versions.")
    parser.add_argument("--registry", default="registry", help="registry folder (default: registry)")
    parser.add_argument("--name", default="tempering-model", help="model name (default: tempering-model)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="versions and aliases")
    p_show = sub.add_parser("show", help="metrics, lineage and gate reasons of one version")
    p_show.add_argument("ref", nargs="?", default="production", help="version or alias")
    p_prom = sub.add_parser("promote", help="point an alias at a version")
    p_prom.add_argument("ref", help="version or alias")
    p_prom.add_argument("--alias", default="production")
    p_prom.add_argument("--reason", default="manual promotion")
    p_rb = sub.add_parser("rollback", help="production <- previous")
    p_rb.add_argument("--alias", default="production")
    args = parser.parse_args(argv)
    reg = Registry(args.registry, args.name)
    try:
        if args.cmd == "list":
            aliases = reg.aliases()
            by_version: dict[str, list[str]] = {}
            for a, v in aliases.items():
                by_version.setdefault(v, []).append(a)
            versions = reg.versions()
            if not versions:
                print(f"{reg.home}: no versions")
            for v in versions:
                rec = reg.record(v)
                tags = ", ".join(sorted(by_version.get(v, [])))
                print(f"{v}  {rec.get('created_at', '')}  {tags}")
        elif args.cmd == "show":
            print(_show(reg, args.ref))
        elif args.cmd == "promote":
            print(json.dumps(reg.set_alias(args.alias, args.ref, args.reason), indent=2))
        elif args.cmd == "rollback":
            print(json.dumps(reg.rollback(args.alias), indent=2))
    except TemperingError as exc:
        print(f"tempering registry: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
