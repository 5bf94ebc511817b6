"""Ingest and normalize training data files into the internal row contracts.

``iter_source(spec)`` reads one ``SourceSpec`` (a file, or a folder of text files) and yields, per raw
row, either :class:`Accepted` (the normalized internal row) or :class:`Rejected` (a machine-readable
reason, a one-line message naming ``file:row`` and the field, and the original row):

- SFT row: ``{"id", "source", "messages": [{"role", "content"}, ...]}``
- preference row: ``{"id", "source", "prompt": [messages], "chosen": str, "rejected": str}``
- text row: ``{"id", "source", "text"}``

``id`` is :func:`tempering.io.content_id` of the normalized content; ``source`` is ``"path:row"``.

Files
    ``.json`` (one array; a ``.json`` file that is really JSON Lines is read as such), ``.jsonl``,
    ``.parquet`` (read through pyarrow, pandas' parquet engine, as plain Python objects) and the
    ``.gz`` of each; plain text (``.txt``, ``.md``, ``.txt.gz``, or a folder of them) for the
    ``text`` format. Row numbers are 1-based: the array index for JSON and parquet, the line
    number for JSON Lines and text (the line where a text chunk starts).

Text
    Text is split on blank lines into paragraphs; consecutive paragraphs are merged (joined by a
    blank line) while the chunk stays within ``chunk_chars`` (default 2,000) characters. A paragraph
    longer than that becomes its own row(s), split at line breaks (one overlong line stays whole).
    Project Gutenberg files keep only the text between the ``*** START OF`` and ``*** END OF``
    lines. Line endings are normalized to ``\\n``. A ``text`` source that is a JSON/JSONL/parquet
    file reads its ``text`` field instead.

Formats (``SourceSpec.format``)
    ``alpaca``: ``instruction``, ``input`` (optional, appended to the instruction after a blank line),
    ``output``, optional ``system`` and ``history`` (``[[user, assistant], ...]`` earlier turns).
    ``sharegpt``: ``conversations`` of ``{from, value}`` (human/user -> user, gpt/assistant/model ->
    assistant, system -> system; other names are kept so validation reports them) plus an optional
    top-level ``system``. ``messages``: OpenAI ``{role, content}`` (content may be a list of
    ``{"type": "text", "text"}`` parts). ``pairs``: ``prompt`` (string or messages), ``chosen`` and
    ``rejected`` (strings, or conversations whose last turn is the assistant answer; the prompt is
    then taken from ``chosen`` when missing), optional ``system``. ``hh``: Anthropic HH-RLHF whole
    dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) in ``chosen``/``rejected`` that share all turns
    but the last: split into prompt messages and the two final answers. ``text``: see above.

Labelled preference formats (a row becomes one pair, or is rejected with a label reason)
    ``alpaca_eval``: ``instruction`` (+ optional ``input``, ``system``), ``output_1``, ``output_2`` and
    ``preference``: 1 or 2 names the better output, 0 is a tie. AlpacaEval's soft annotators write
    a number in [1, 2]: below 1.5 prefers ``output_1``, above it ``output_2``, 1.5 is a tie.
    ``arena``: Chatbot-Arena rows, ``conversation_a`` / ``conversation_b`` (OpenAI message lists)
    and ``winner`` (``model_a``, ``model_b``, ``tie``, ``tie (bothbad)``). The prompt is every turn
    before the final assistant turn and must be the same in both conversations (else
    ``prompt_mismatch``); chosen/rejected are the winner's and the loser's final assistant turns.
    ``ultrafeedback``: a prompt (``prompt`` or ``instruction``; a string or messages) with
    ``completions`` ``[{response | text, overall_score | fine-grained_score | annotations, model}]``;
    the score is ``overall_score``, else ``fine-grained_score``, else the mean of the numeric
    ``annotations.<aspect>.Rating`` values (``fields: {score: <key>}`` names one key instead).
    The best completion is chosen; rejected is the worst (``pairing="best_vs_worst"``) or one
    drawn among the lower-rated ones (``"best_vs_random"``, seeded by ``pairing_seed`` and the
    row's content). The binarized layout (``chosen`` / ``rejected`` message lists or strings, optional
    ``prompt``, ``score_chosen`` / ``score_rejected``) is read too.
    Label reasons: ``unlabelled`` (no label or no score), ``tie`` (label 0 / 1.5, a tied battle,
    all completions scored the same), ``bad_label`` (a label outside its values, or
    ``score_chosen < score_rejected``), ``prompt_mismatch``, ``too_few_completions`` (fewer than 2).

Field mapping
    ``SourceSpec.fields`` maps our field name to the file's: ``{output: response}`` reads the
    ``response`` key as ``output``. It also applies to message keys (``from``/``value``,
    ``role``/``content``) and to ``conversations``/``messages``/``text``.

Errors
    File-level problems (missing path, a folder where a file is expected, an empty file or empty
    JSON array, truncated or corrupt gzip, undecodable or too deeply nested JSON array or text,
    UTF-16) raise :class:`tempering.TemperingError` with one line naming the file. A bad JSON Lines
    line only rejects that row (``invalid_json``, ``invalid_encoding``); so does a string holding an
    unpaired surrogate (a ``\\ud800`` escape: not valid Unicode, it could not be written back as
    UTF-8). A UTF-8 byte-order mark is skipped. Row-level reasons: ``invalid_json``,
    ``invalid_encoding``, ``not_an_object``, ``missing_field``, ``null_field``, ``wrong_type``,
    ``bad_structure``. Content checks (empty fields, roles, role order, lengths, control characters,
    chosen == rejected) are validation's job (``tasks/validate.py``), not this module's.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tempering import TemperingError
from tempering.io import content_id

# Which formats can produce which kind of row.
KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("alpaca", "sharegpt", "messages"),
    "preference": ("pairs", "hh", "alpaca_eval", "arena", "ultrafeedback"),
    "text": ("text",),
}
DEFAULT_CHUNK_CHARS = 2000
TEXT_SUFFIXES = (".txt", ".md", ".text")
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "model": "assistant", "bing": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Accepted:
    """A raw row that normalized into an internal row."""

    row: dict
    file: str
    index: int
    original: Any


@dataclass(frozen=True)
class Rejected:
    """A raw row that could not be normalized: reason code, one-line message, original row."""

    file: str
    index: int
    reason: str
    message: str
    original: Any

    def quarantine(self, stage: str) -> dict:
        return {"source": self.file, "row": self.index, "reason": self.reason, "message": self.message,
                "stage": stage, "original": self.original}


Result = Accepted | Rejected


class RowError(Exception):
    """Raised inside a normalizer: this row is rejected with ``reason``; the message names the field."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------- public API


def check_spec(kind: str, fmt: str) -> None:
    if fmt not in KIND_FORMATS.get(kind, ()):
        raise TemperingError(f"format {fmt!r} cannot produce {kind!r} rows "
                             f"(use one of: {', '.join(KIND_FORMATS.get(kind, ()))})")


def iter_source(spec: Any, *, chunk_chars: int = DEFAULT_CHUNK_CHARS, pairing: str = "best_vs_worst",
                pairing_seed: int = 0) -> Iterator[Result]:
    """Yield one :class:`Accepted` or :class:`Rejected` per raw row of ``spec`` (a ``SourceSpec``).

    ``pairing`` / ``pairing_seed``: how the ``ultrafeedback`` format picks the rejected completion.
    Raises :class:`TemperingError` (one line naming the file) for file-level problems.
    """
    check_spec(spec.kind, spec.format)
    fields = dict(spec.fields or {})
    path = Path(spec.path)
    if not path.exists():
        raise TemperingError(f"{spec.path}: file not found")
    if spec.format == "text" and (path.is_dir() or _is_text_file(path)):
        yield from _iter_text_source(path, spec.path, chunk_chars)
        return
    if path.is_dir():
        raise TemperingError(f"{spec.path}: is a directory; format {spec.format!r} expects a file "
                             "(only the text format reads folders)")
    if getattr(spec, "allow_empty", False) and path.stat().st_size == 0:
        return  # an empty source by design (SourceSpec.allow_empty): no rows, no error
    normalize = _normalizer(spec.format, pairing, pairing_seed)
    for index, raw in iter_records(path, spec.path):
        if isinstance(raw, Rejected):
            yield raw
            continue
        yield _normalize_one(normalize, raw, fields, spec.path, index)


def normalize_record(fmt: str, raw: Any, *, fields: dict | None = None, file: str = "<row>",
                     index: int = 1, pairing: str = "best_vs_worst", pairing_seed: int = 0) -> Result:
    """Normalize one already-parsed record (used by tests and callers holding rows in memory)."""
    return _normalize_one(_normalizer(fmt, pairing, pairing_seed), raw, dict(fields or {}), file, index)


def _normalizer(fmt: str, pairing: str, seed: int):
    if fmt == "ultrafeedback":
        if pairing not in PAIRINGS:
            raise TemperingError(f"pairing {pairing!r}: use one of {', '.join(PAIRINGS)}")
        return functools.partial(_norm_ultrafeedback, pairing=pairing, seed=seed)
    return _NORMALIZERS[fmt]


def iter_records(path: Path, name: str | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, record)`` for a JSON / JSONL / parquet file (plain or ``.gz``).

    A JSON Lines line that does not parse yields ``(line, Rejected)`` instead of a record.
    """
    name = name or str(path)
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    ext = suffixes[-2] if gz and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if ext == ".parquet":
        yield from _iter_parquet(path, name)
    elif ext == ".jsonl" or ext == ".ndjson":
        yield from _iter_jsonl(path, name, gz)
    elif ext == ".json":
        yield from _iter_json(path, name, gz)
    else:
        raise TemperingError(f"{name}: unknown file type {''.join(path.suffixes) or '(none)'}; "
                             "expected .json, .jsonl, .parquet (optionally .gz) or text files")


# ----------------------------------------------------------------------------- raw readers


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
        if path.suffix.lower() == ".gz":
            data = gzip.decompress(data)
    except EOFError:
        raise TemperingError(f"{name}: truncated gzip file (compressed data ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise TemperingError(f"{name}: corrupt gzip file ({exc})") from None
    except IsADirectoryError:
        raise TemperingError(f"{name}: is a directory, expected a file") from None
    except OSError as exc:
        raise TemperingError(f"{name}: cannot read ({exc.strerror or exc})") from None
    return data


def _check_bom(head: bytes, name: str) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TemperingError(f"{name}: UTF-16 encoded; convert it to UTF-8")


def _decode(data: bytes, name: str) -> str:
    """Decode a whole file as UTF-8 (a BOM is skipped); errors name the line."""
    _check_bom(data[:2], name)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TemperingError(f"{name}: line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                             "convert the file to UTF-8") from None


def _iter_json(path: Path, name: str, gz: bool) -> Iterator[tuple[int, Any]]:
    """A JSON array file, element by element. Streamed (:func:`_stream_json_array`: memory bounded
    by the largest row, not the file); anything the streaming reader does not handle (not an array,
    invalid JSON or UTF-8, a JSON Lines file named .json, ...) is read again by the whole-file
    reader, which gives the exact error (rows already yielded are not repeated)."""
    done = 0
    try:
        for index, item in _stream_json_array(path, gz):
            done = index
            yield index, item
        if done:
            return
    except (ValueError, OSError, EOFError, RecursionError, zlib.error):
        pass
    for index, item in _iter_json_whole(path, name, gz):
        if index > done:
            yield index, item


_JSON_CHUNK = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")


def _stream_json_array(path: Path, gz: bool) -> Iterator[tuple[int, Any]]:
    """Yield the elements of a top-level JSON array, reading ``_JSON_CHUNK`` characters at a time.
    Raises ValueError on anything else (the caller falls back to the whole-file reader)."""
    import io

    decoder = json.JSONDecoder()
    raw = gzip.open(path, "rb") if gz else open(path, "rb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict") as fh:
        buf, pos, eof = "", 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = fh.read(_JSON_CHUNK)
            if not chunk:
                eof = True
                return False
            buf, pos = buf[pos:] + chunk, 0
            return True

        def skip_ws() -> str:
            nonlocal pos
            while True:
                pos = _WS.match(buf, pos).end()
                if pos < len(buf):
                    return buf[pos]
                if not more():
                    return ""

        if skip_ws() != "[":
            raise ValueError("not a JSON array")
        pos += 1
        index = 0
        if skip_ws() == "]":
            raise ValueError("an empty JSON array")
        while True:
            while True:  # one element: decode, reading more while it may be cut at the buffer's end
                try:
                    item, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if more():
                        continue
                    raise
                if end == len(buf) and more():
                    continue
                break
            pos = end
            index += 1
            yield index, item
            sep = skip_ws()
            if sep == ",":
                pos += 1
                if skip_ws() in ("]", ""):
                    raise ValueError("trailing comma")
                continue
            if sep != "]":
                raise ValueError("expected , or ]")
            pos += 1
            if skip_ws() != "":
                raise ValueError("data after the array")
            return


def _iter_json_whole(path: Path, name: str, gz: bool) -> Iterator[tuple[int, Any]]:
    text = _decode(_read_bytes(path, name), name)
    if not text.strip():
        raise TemperingError(f"{name}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            # A .json file that is really JSON Lines (common in the wild).
            yield from _jsonl_lines(text.encode("utf-8").splitlines(keepends=True), name)
            return
        raise TemperingError(f"{name}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise TemperingError(f"{name}: invalid JSON (nested too deeply to parse)") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        hint = f" (it is an object; the rows may be under {lists[0]!r})" if lists else ""
        raise TemperingError(f"{name}: expected a JSON array of rows{hint}")
    if not isinstance(data, list):
        raise TemperingError(f"{name}: expected a JSON array of rows, got {_type_name(data)}")
    if not data:
        raise TemperingError(f"{name}: file is empty (an empty JSON array)")
    for i, item in enumerate(data, 1):
        yield i, item


def _iter_jsonl(path: Path, name: str, gz: bool) -> Iterator[tuple[int, Any]]:
    try:
        fh = gzip.open(path, "rb") if gz else open(path, "rb")
    except IsADirectoryError:
        raise TemperingError(f"{name}: is a directory, expected a file") from None
    except OSError as exc:
        raise TemperingError(f"{name}: cannot read ({exc.strerror or exc})") from None
    with fh:
        try:
            yield from _jsonl_lines(fh, name)
        except EOFError:
            raise TemperingError(f"{name}: truncated gzip file (compressed data ends early)") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise TemperingError(f"{name}: corrupt gzip file ({exc})") from None


def _jsonl_lines(lines, name: str) -> Iterator[tuple[int, Any]]:
    seen = False
    for lineno, raw in enumerate(lines, 1):
        if lineno == 1:
            _check_bom(raw[:2], name)
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            seen = True
            yield lineno, Rejected(name, lineno, "invalid_encoding",
                                   f"{name}:{lineno}: line is not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                   f"at column {exc.start + 1})",
                                   raw.decode("utf-8", errors="replace").rstrip("\r\n"))
            continue
        if not line.strip():
            continue
        seen = True
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            yield lineno, Rejected(name, lineno, "invalid_json",
                                   f"{name}:{lineno}: invalid JSON at column {exc.colno} ({exc.msg})",
                                   line.rstrip("\r\n"))
        except RecursionError:
            yield lineno, Rejected(name, lineno, "invalid_json",
                                   f"{name}:{lineno}: invalid JSON (nested too deeply to parse)",
                                   line.rstrip("\r\n")[:1000])
    if not seen:
        raise TemperingError(f"{name}: file is empty")


def _iter_parquet(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    if path.is_dir():
        raise TemperingError(f"{name}: is a directory, expected a file")
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = io.BytesIO(_read_bytes(path, name)) if path.suffix.lower() == ".gz" else path
        table = pq.read_table(source)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TemperingError(f"{name}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise TemperingError(f"{name}: file is empty (0 rows)")
    for i, rec in enumerate(table.to_pylist(), 1):
        yield i, rec


# ----------------------------------------------------------------------------- text


def _is_text_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(TEXT_SUFFIXES)


def _text_files(path: Path, name: str) -> list[tuple[Path, str]]:
    if path.is_file():
        return [(path, name)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise TemperingError(f"{name}: folder holds no .txt, .md or .txt.gz files")
    return [(p, f"{name.rstrip('/')}/{p.relative_to(path).as_posix()}") for p in files]


_START = re.compile(r"^\s*\*\*\*\s*START OF (THE |THIS )?PROJECT GUTENBERG", re.I)
_END = re.compile(r"^\s*\*\*\*\s*END OF (THE |THIS )?PROJECT GUTENBERG", re.I)
_END_NOTE = re.compile(r"^\s*End of (the )?Project Gutenberg", re.I)


def strip_gutenberg(lines: list[str]) -> tuple[int, int]:
    """Return the ``[start, end)`` line range of the book proper (the whole file if no markers)."""
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if _START.match(line):
            start = i + 1
            break
    for i in range(len(lines) - 1, start - 1, -1):
        if _END.match(lines[i]):
            end = i
            break
    if end < len(lines):  # the "End of the Project Gutenberg EBook ..." note just above the marker
        for i in range(end - 1, max(start, end - 10) - 1, -1):
            if _END_NOTE.match(lines[i]):
                end = i
                break
    return start, end


def split_text(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[tuple[int, str]]:
    """Split ``text`` into ``(start_line, chunk)`` rows (see the module docstring)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start, end = strip_gutenberg(lines)
    paragraphs: list[tuple[int, list[str]]] = []
    current: list[str] = []
    first = 0
    for i in range(start, end):
        line = lines[i].rstrip()
        if line.strip():
            if not current:
                first = i + 1
            current.append(line)
        elif current:
            paragraphs.append((first, current))
            current = []
    if current:
        paragraphs.append((first, current))

    chunks: list[tuple[int, str]] = []
    buf: list[str] = []
    buf_start, buf_len = 0, 0

    def flush() -> None:
        nonlocal buf, buf_len
        if buf:
            chunks.append((buf_start, "\n\n".join(buf)))
        buf, buf_len = [], 0

    for para_start, para_lines in paragraphs:
        para = "\n".join(para_lines)
        if len(para) > chunk_chars:
            flush()
            piece: list[str] = []
            piece_start, piece_len = para_start, 0
            for offset, line in enumerate(para_lines):
                if piece and piece_len + 1 + len(line) > chunk_chars:
                    chunks.append((piece_start, "\n".join(piece)))
                    piece, piece_len = [], 0
                if not piece:
                    piece_start = para_start + offset
                piece.append(line)
                piece_len += len(line) + (1 if piece_len else 0)
            if piece:
                chunks.append((piece_start, "\n".join(piece)))
            continue
        if buf and buf_len + 2 + len(para) > chunk_chars:
            flush()
        if not buf:
            buf_start = para_start
        buf.append(para)
        buf_len += len(para) + (2 if buf_len else 0)
    flush()
    return chunks


def _iter_text_source(path: Path, name: str, chunk_chars: int) -> Iterator[Result]:
    for file, file_name in _text_files(path, name):
        text = _decode(_read_bytes(file, file_name), file_name)
        if not text.strip():
            raise TemperingError(f"{file_name}: file is empty")
        for line, chunk in split_text(text, chunk_chars):
            yield Accepted({"id": content_id({"text": chunk}), "source": f"{file_name}:{line}", "text": chunk},
                           file_name, line, chunk)


# ----------------------------------------------------------------------------- normalizers


def _normalize_one(normalize, raw: Any, fields: dict, file: str, index: int) -> Result:
    if not isinstance(raw, dict):
        return Rejected(file, index, "not_an_object",
                        f"{file}:{index}: row is a {_type_name(raw)}, expected an object", raw)
    try:
        content = normalize(raw, fields)
    except RowError as err:
        return Rejected(file, index, err.reason, f"{file}:{index}: {err.message}", raw)
    row = {"id": content_id(content), "source": f"{file}:{index}", **content}
    return Accepted(row, file, index, raw)


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def clean_text(value: str) -> str:
    """Normalize line endings and surrounding whitespace (control characters are left for validation)."""
    return value.replace("\r\n", "\n").replace("\r", "\n").strip()


def _key(fields: dict, name: str) -> str:
    return fields.get(name, name)


def _get(rec: dict, fields: dict, name: str, *, required: bool = True) -> Any:
    key = _key(fields, name)
    label = name if key == name else f"{key} (as {name})"
    if key not in rec:
        if required:
            present = ", ".join(sorted(map(str, rec))[:8]) or "none"
            raise RowError("missing_field", f"field '{label}' is missing (fields present: {present})")
        return None
    value = rec[key]
    if value is None and required:
        raise RowError("null_field", f"field '{label}' is null")
    return value


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _unicode(value: str, label: str) -> str:
    """Reject text holding an unpaired UTF-16 surrogate (a JSON ``\\ud800`` escape): it is not valid
    Unicode, cannot be written as UTF-8, and would crash every later stage."""
    bad = _SURROGATE.search(value)
    if bad:
        raise RowError("invalid_encoding", f"field '{label}' contains an unpaired surrogate "
                                           f"U+{ord(bad.group()):04X} at offset {bad.start()} (not valid Unicode)")
    return value


def _string(value: Any, label: str) -> str:
    if isinstance(value, str):
        return clean_text(_unicode(value, label))
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise RowError("wrong_type", f"field '{label}' must be a string, got {_type_name(value)} ({shown})")


def _req_str(rec: dict, fields: dict, name: str) -> str:
    return _string(_get(rec, fields, name), _key(fields, name))


def _opt_str(rec: dict, fields: dict, name: str) -> str:
    value = _get(rec, fields, name, required=False)
    return "" if value is None else _string(value, _key(fields, name))


def _content(value: Any, label: str) -> str:
    """Message content: a string, or a list of OpenAI text parts."""
    if value is None:
        raise RowError("null_field", f"field '{label}' is null")
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in value):
        return clean_text(_unicode("".join(p["text"] for p in value), label))
    return _string(value, label)


def _messages(value: Any, label: str, fields: dict, role_key: str, content_key: str,
              role_map: dict | None = None) -> list[dict]:
    if value is None:
        raise RowError("null_field", f"field '{label}' is null")
    if not isinstance(value, list):
        raise RowError("wrong_type", f"field '{label}' must be a list of messages, got {_type_name(value)}")
    if not value:
        raise RowError("bad_structure", f"field '{label}' is an empty list")
    rk, ck = _key(fields, role_key), _key(fields, content_key)
    out = []
    for i, msg in enumerate(value):
        where = f"{label}[{i}]"
        if not isinstance(msg, dict):
            raise RowError("wrong_type", f"field '{where}' must be an object, got {_type_name(msg)}")
        if rk not in msg:
            raise RowError("missing_field", f"field '{where}.{rk}' is missing")
        if ck not in msg:
            raise RowError("missing_field", f"field '{where}.{ck}' is missing")
        role = msg[rk]
        if role is None:
            raise RowError("null_field", f"field '{where}.{rk}' is null")
        if not isinstance(role, str):
            raise RowError("wrong_type", f"field '{where}.{rk}' must be a string, got {_type_name(role)}")
        role = _unicode(role, f"{where}.{rk}").strip().lower()
        if role_map is not None:
            role = role_map.get(role, role)
        out.append({"role": role, "content": _content(msg[ck], f"{where}.{ck}")})
    return out


def _norm_alpaca(rec: dict, fields: dict) -> dict:
    instruction = _req_str(rec, fields, "instruction")
    extra = _opt_str(rec, fields, "input")
    output = _req_str(rec, fields, "output")
    system = _opt_str(rec, fields, "system")
    history = _get(rec, fields, "history", required=False)
    messages = [{"role": "system", "content": system}] if system else []
    if history is not None:
        hk = _key(fields, "history")
        if not isinstance(history, list):
            raise RowError("wrong_type", f"field '{hk}' must be a list of [user, assistant] pairs, "
                                         f"got {_type_name(history)}")
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise RowError("bad_structure", f"field '{hk}[{i}]' must be a [user, assistant] pair")
            messages.append({"role": "user", "content": _string(pair[0], f"{hk}[{i}][0]")})
            messages.append({"role": "assistant", "content": _string(pair[1], f"{hk}[{i}][1]")})
    user = "\n\n".join(part for part in (instruction, extra) if part)
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _norm_sharegpt(rec: dict, fields: dict) -> dict:
    conv = _get(rec, fields, "conversations")
    messages = _messages(conv, _key(fields, "conversations"), fields, "from", "value", SHAREGPT_ROLES)
    system = _opt_str(rec, fields, "system")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


def _norm_messages(rec: dict, fields: dict) -> dict:
    msgs = _get(rec, fields, "messages")
    return {"messages": _messages(msgs, _key(fields, "messages"), fields, "role", "content")}


def _answer(value: Any, label: str, fields: dict) -> tuple[str, list[dict] | None]:
    """A preference answer: a string, or a conversation whose last turn is the answer."""
    if isinstance(value, list):
        msgs = _messages(value, label, fields, "role", "content")
        if msgs[-1]["role"] != "assistant":
            raise RowError("bad_structure", f"field '{label}': the last message must be the assistant's answer")
        return msgs[-1]["content"], msgs[:-1]
    return _string(value, label), None


def _norm_pairs(rec: dict, fields: dict) -> dict:
    ck, rk = _key(fields, "chosen"), _key(fields, "rejected")
    chosen, chosen_ctx = _answer(_get(rec, fields, "chosen"), ck, fields)
    rejected, _ = _answer(_get(rec, fields, "rejected"), rk, fields)
    raw_prompt = _get(rec, fields, "prompt", required=chosen_ctx is None or not chosen_ctx)
    pk = _key(fields, "prompt")
    if raw_prompt is None:
        prompt = chosen_ctx or []
    elif isinstance(raw_prompt, list):
        prompt = _messages(raw_prompt, pk, fields, "role", "content")
    else:
        prompt = [{"role": "user", "content": _string(raw_prompt, pk)}]
    system = _opt_str(rec, fields, "system")
    if system and (not prompt or prompt[0]["role"] != "system"):
        prompt.insert(0, {"role": "system", "content": system})
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def parse_hh(dialogue: str) -> list[dict]:
    """Split an HH-RLHF dialogue into messages (Human -> user, Assistant -> assistant)."""
    text = dialogue.replace("\r\n", "\n")
    if not text.startswith("\n\n"):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _norm_hh(rec: dict, fields: dict) -> dict:
    ck, rk = _key(fields, "chosen"), _key(fields, "rejected")
    chosen_raw = _req_str(rec, fields, "chosen")
    rejected_raw = _req_str(rec, fields, "rejected")
    turns = {}
    for label, raw in ((ck, chosen_raw), (rk, rejected_raw)):
        try:
            msgs = parse_hh(raw)
        except ValueError as exc:
            raise RowError("bad_structure", f"field '{label}': {exc}") from None
        if not msgs:
            raise RowError("bad_structure", f"field '{label}': no 'Human:'/'Assistant:' turns found")
        if msgs[-1]["role"] != "assistant":
            raise RowError("bad_structure", f"field '{label}': the dialogue does not end with an Assistant turn")
        turns[label] = msgs
    if turns[ck][:-1] != turns[rk][:-1]:
        raise RowError("bad_structure", f"fields '{ck}' and '{rk}' do not share the same earlier turns")
    return {"prompt": turns[ck][:-1], "chosen": turns[ck][-1]["content"], "rejected": turns[rk][-1]["content"]}


def _norm_text(rec: dict, fields: dict) -> dict:
    return {"text": _req_str(rec, fields, "text")}


# ----------------------------------------------------------------------------- labelled preference data

PAIRINGS = ("best_vs_worst", "best_vs_random")


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _label(rec: dict, fields: dict, name: str) -> tuple[str, Any]:
    """(file key, value) of a label field; a missing, null or blank label is ``unlabelled``."""
    key = _key(fields, name)
    label = name if key == name else f"{key} (as {name})"
    if key not in rec:
        raise RowError("unlabelled", f"field '{label}' is missing: the row carries no label")
    value = rec[key]
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str)
                                                                                 and not value.strip()):
        raise RowError("unlabelled", f"field '{label}' is {'empty' if isinstance(value, str) else 'null'}: "
                                     "the row carries no label")
    return key, value


def _number(value: Any, label: str) -> float:
    """A numeric label or score: a number or a numeric string (CSV/parquet exports), never a boolean."""
    if isinstance(value, bool):
        raise RowError("wrong_type", f"field '{label}' must be a number, got boolean ({_shown(value)})")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise RowError("wrong_type", f"field '{label}' must be a number, got {_type_name(value)} ({_shown(value)})")


def _user_prompt(rec: dict, fields: dict, names: tuple[str, ...]) -> list[dict]:
    """The prompt messages from the first present field of ``names`` (a string or messages),
    plus the instruction's ``input`` and the row's ``system`` when present."""
    name = next((n for n in names if _key(fields, n) in rec), names[0])
    key = _key(fields, name)
    if key not in rec and len(names) > 1:
        present = ", ".join(sorted(map(str, rec))[:8]) or "none"
        raise RowError("missing_field", f"field '{' or '.join(_key(fields, n) for n in names)}' is missing "
                                        f"(fields present: {present})")
    raw = _get(rec, fields, name)
    if isinstance(raw, list):
        prompt = _messages(raw, key, fields, "role", "content")
    else:
        text = _string(raw, key)
        extra = _opt_str(rec, fields, "input")
        prompt = [{"role": "user", "content": "\n\n".join(p for p in (text, extra) if p)}]
    system = _opt_str(rec, fields, "system")
    if system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    return prompt


def _norm_alpaca_eval(rec: dict, fields: dict) -> dict:
    key, raw = _label(rec, fields, "preference")
    value = _number(raw, key)
    if value == 0 or value == 1.5:
        raise RowError("tie", f"field '{key}' is {_shown(raw)}: a tie, neither output is preferred")
    if not 1 <= value <= 2:
        raise RowError("bad_label", f"field '{key}' must be 1 or 2 (the better output) or 0 (a tie), "
                                    f"got {_shown(raw)}")
    prompt = _user_prompt(rec, fields, ("instruction",))
    first, second = _req_str(rec, fields, "output_1"), _req_str(rec, fields, "output_2")
    chosen, rejected = (first, second) if value < 1.5 else (second, first)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


ARENA_WINNERS = {"model_a": "a", "model_b": "b", "tie": None, "tie (bothbad)": None}


def _norm_arena(rec: dict, fields: dict) -> dict:
    key, raw = _label(rec, fields, "winner")
    if not isinstance(raw, str):
        raise RowError("wrong_type", f"field '{key}' must be a string, got {_type_name(raw)} ({_shown(raw)})")
    winner = raw.strip().lower()
    if winner not in ARENA_WINNERS:
        raise RowError("bad_label", f"field '{key}' must be one of {', '.join(ARENA_WINNERS)}, got {_shown(raw)}")
    if ARENA_WINNERS[winner] is None:
        raise RowError("tie", f"field '{key}' is {_shown(raw)}: a tie, neither conversation is preferred")
    convs = {}
    for side in ("a", "b"):
        ck = _key(fields, f"conversation_{side}")
        msgs = _messages(_get(rec, fields, f"conversation_{side}"), ck, fields, "role", "content")
        if msgs[-1]["role"] != "assistant":
            raise RowError("bad_structure", f"field '{ck}[{len(msgs) - 1}]': the last message must be the "
                                            f"assistant's answer (got {msgs[-1]['role']})")
        convs[side] = (ck, msgs)
    (ak, a), (bk, b) = convs["a"], convs["b"]
    if a[:-1] != b[:-1]:
        i = next((i for i, (x, y) in enumerate(zip(a[:-1], b[:-1])) if x != y), min(len(a), len(b)) - 1)
        if i >= min(len(a), len(b)) - 1:
            detail = f"{ak} has {len(a) - 1} turns before its answer, {bk} {len(b) - 1}"
        else:
            detail = f"'{ak}[{i}]' ({a[i]['role']}) differs from '{bk}[{i}]' ({b[i]['role']})"
        raise RowError("prompt_mismatch", f"fields '{ak}' and '{bk}' do not share the prompt: {detail}")
    win, lose = (a, b) if ARENA_WINNERS[winner] == "a" else (b, a)
    return {"prompt": a[:-1], "chosen": win[-1]["content"], "rejected": lose[-1]["content"]}


UF_SCORES = ("overall_score", "fine-grained_score")


def _uf_score(comp: dict, label: str, fields: dict) -> float:
    """A completion's score: ``fields['score']`` when mapped, else overall_score, fine-grained_score,
    else the mean numeric ``annotations.<aspect>.Rating`` (``"N/A"`` ratings are skipped)."""
    if "score" in fields:
        key = fields["score"]
        if comp.get(key) is None:
            raise RowError("unlabelled", f"field '{label}.{key}' is {'null' if key in comp else 'missing'}: "
                                         "the completion has no score")
        score = _number(comp[key], f"{label}.{key}")
        if math.isnan(score):
            raise RowError("unlabelled", f"field '{label}.{key}' is NaN: the completion has no score")
        return score
    for key in UF_SCORES:
        value = comp.get(key)
        if value is None or (isinstance(value, str) and value.strip().upper() in ("", "N/A")):
            continue
        score = _number(value, f"{label}.{key}")
        if not math.isnan(score):
            return score
    ratings = []
    annotations = comp.get("annotations")
    if isinstance(annotations, dict):
        for aspect, ann in annotations.items():
            for item in (ann if isinstance(ann, list) else [ann]):
                rating = item.get("Rating") if isinstance(item, dict) else None
                if rating is None or (isinstance(rating, str) and rating.strip().upper() in ("", "N/A")):
                    continue
                ratings.append(_number(rating, f"{label}.annotations.{aspect}.Rating"))
    if ratings:
        return sum(ratings) / len(ratings)
    raise RowError("unlabelled", f"field '{label}' has no score (overall_score, fine-grained_score or "
                                 "annotations.*.Rating)")


def _norm_ultrafeedback(rec: dict, fields: dict, *, pairing: str, seed: int) -> dict:
    if _key(fields, "completions") not in rec and _key(fields, "chosen") in rec:
        return _uf_binarized(rec, fields)
    ck = _key(fields, "completions")
    if ck not in rec:
        present = ", ".join(sorted(map(str, rec))[:8]) or "none"
        raise RowError("missing_field", f"field '{ck}' is missing (or 'chosen'/'rejected' for the binarized "
                                        f"layout; fields present: {present})")
    comps = _get(rec, fields, "completions")
    if not isinstance(comps, list):
        raise RowError("wrong_type", f"field '{ck}' must be a list of completions, got {_type_name(comps)}")
    if len(comps) < 2:
        raise RowError("too_few_completions", f"field '{ck}' has {len(comps)} completion(s): a pair needs 2")
    prompt = _user_prompt(rec, fields, ("prompt", "instruction"))
    rk = _key(fields, "response")
    answers, scores = [], []
    for i, comp in enumerate(comps):
        label = f"{ck}[{i}]"
        if not isinstance(comp, dict):
            raise RowError("wrong_type", f"field '{label}' must be an object, got {_type_name(comp)}")
        key = rk if rk in comp or "response" in fields else ("text" if "text" in comp else rk)
        if comp.get(key) is None:
            raise RowError("missing_field" if key not in comp else "null_field",
                           f"field '{label}.{key}' is {'missing' if key not in comp else 'null'}")
        answers.append(_string(comp[key], f"{label}.{key}"))
        scores.append(_uf_score(comp, label, fields))
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of the best
    lower = [i for i in range(len(scores)) if scores[i] < scores[best]]
    if not lower:
        raise RowError("tie", f"all {len(scores)} completions in '{ck}' have the same score "
                              f"{scores[0]:g}: no preferred answer")
    if pairing == "best_vs_worst":
        other = min(lower, key=lambda i: (scores[i], i))
    else:
        draw = content_id({"seed": seed, "prompt": prompt, "answers": answers}, 16)
        other = random.Random(int(draw, 16)).choice(lower)
    return {"prompt": prompt, "chosen": answers[best], "rejected": answers[other]}


def _uf_binarized(rec: dict, fields: dict) -> dict:
    ck, rk = _key(fields, "chosen"), _key(fields, "rejected")
    chosen, chosen_ctx = _answer(_get(rec, fields, "chosen"), ck, fields)
    rejected, rejected_ctx = _answer(_get(rec, fields, "rejected"), rk, fields)
    if chosen_ctx and rejected_ctx is not None and rejected_ctx != chosen_ctx:
        raise RowError("prompt_mismatch", f"fields '{ck}' and '{rk}' do not share the prompt "
                                          "(the turns before their answers differ)")
    if chosen_ctx:
        prompt = chosen_ctx
        system = _opt_str(rec, fields, "system")
        if system and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system})
    else:
        prompt = _user_prompt(rec, fields, ("prompt", "instruction"))
    sck, srk = _key(fields, "score_chosen"), _key(fields, "score_rejected")
    if sck in rec or srk in rec:
        sc = _number(_label(rec, fields, "score_chosen")[1], sck)
        sr = _number(_label(rec, fields, "score_rejected")[1], srk)
        if sc == sr:
            raise RowError("tie", f"fields '{sck}' and '{srk}' are both {sc:g}: no preferred answer")
        if sc < sr:
            raise RowError("bad_label", f"field '{sck}' ({sc:g}) is below '{srk}' ({sr:g}): the label "
                                        "contradicts the scores")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


_NORMALIZERS = {
    "alpaca": _norm_alpaca,
    "sharegpt": _norm_sharegpt,
    "messages": _norm_messages,
    "pairs": _norm_pairs,
    "hh": _norm_hh,
    "alpaca_eval": _norm_alpaca_eval,
    "arena": _norm_arena,
    "text": _norm_text,
}
