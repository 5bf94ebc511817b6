"""Malformed input, end to end through the validate stage: every case has its expected outcome.

Row-level problems: the row is quarantined with a named, machine-readable reason and a message
naming ``file:row`` and the field; the other rows of the file are kept; kept + quarantined = read.
File-level problems: the CLI exits 2 with one line naming the file (and line, where there is one),
never a traceback, and nothing is written where the next stage reads (an earlier output stays).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tasks import validate
from tempering import TemperingError
from tempering.config import Params, SourceSpec, ValidateParams

GOOD = {
    "alpaca": {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    "messages": {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
    "pairs": {"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away."},
    "hh": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
}
KIND = {"alpaca": "sft", "messages": "sft", "sharegpt": "sft", "pairs": "preference", "hh": "preference"}
BIG = "x" * 5_000_000  # a 5 MB single row


def m(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def hh(*turns):
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


# (case id, format, bad row: a JSON-able object or raw bytes of one JSONL line, reason, needle in message)
ROW_CASES = [
    ("invalid_json_line", "alpaca", b'{"instruction": "q", "output": ', "invalid_json", "invalid JSON at column"),
    ("non_utf8_bytes", "alpaca", b'{"instruction": "caf\xe9", "output": "a"}', "invalid_encoding",
     "not valid UTF-8 (byte 0xe9"),
    ("deeply_nested_json", "alpaca", b"[" * 100_000 + b"]" * 100_000, "invalid_json", "nested too deeply"),
    ("missing_output", "alpaca", {"instruction": "q"}, "missing_field", "field 'output' is missing"),
    ("number_as_output", "alpaca", {"instruction": "q", "output": 42}, "wrong_type",
     "field 'output' must be a string, got number (42)"),
    ("list_as_instruction", "alpaca", {"instruction": ["What", "is"], "output": "a"}, "wrong_type",
     "field 'instruction' must be a string, got list"),
    ("null_instruction", "alpaca", {"instruction": None, "output": "a"}, "null_field", "field 'instruction' is null"),
    ("boolean_output", "alpaca", {"instruction": "q", "output": True}, "wrong_type", "got boolean"),
    ("nan_output", "alpaca", b'{"instruction": "q", "output": NaN}', "wrong_type", "field 'output' must be a string"),
    ("row_is_a_list", "alpaca", ["q", "a"], "not_an_object", "row is a list, expected an object"),
    ("row_is_a_string", "alpaca", "q", "not_an_object", "row is a string"),
    ("history_not_pairs", "alpaca", {"instruction": "q", "output": "a", "history": [["only one"]]}, "bad_structure",
     "history[0]"),
    ("empty_output", "alpaca", {"instruction": "q", "output": ""}, "empty_field",
     "messages[1].content (assistant) is empty"),
    ("whitespace_instruction", "alpaca", {"instruction": " \n\t ", "output": "a"}, "empty_field",
     "messages[0].content (user) is empty"),
    ("five_mb_row", "alpaca", {"instruction": "q", "output": BIG}, "too_long",
     "messages[1].content (assistant) is too long (5000000 > 20000"),
    ("control_chars", "alpaca", {"instruction": "q\x1b[31m", "output": "a"}, "control_chars",
     "messages[0].content (user) contains control character U+001B"),
    ("nul_byte", "alpaca", {"instruction": "q", "output": "a\x00b"}, "control_chars", "U+0000"),
    ("lone_surrogate", "alpaca", b'{"instruction": "q", "output": "bad \\ud800 escape"}', "invalid_encoding",
     "field 'output' contains an unpaired surrogate U+D800 at offset 4"),
    ("replacement_char", "alpaca", {"instruction": "q", "output": "mojibake \ufffd"}, "control_chars", "U+FFFD"),
    ("unknown_role", "messages", m(("user", "q"), ("bot", "a")), "unknown_role", "messages[1].role 'bot'"),
    ("two_user_turns", "messages", m(("user", "q"), ("user", "q2"), ("assistant", "a")), "bad_role_order",
     "messages[1]: two consecutive user turns"),
    ("two_assistant_turns", "messages", m(("user", "q"), ("assistant", "a"), ("assistant", "b")), "bad_role_order",
     "two consecutive assistant turns"),
    ("system_in_the_middle", "messages", m(("user", "q"), ("system", "s"), ("assistant", "a")), "bad_role_order",
     "messages[1]: a system turn after the first turn"),
    ("ends_with_user", "messages", m(("user", "q"), ("assistant", "a"), ("user", "q2")), "bad_role_order",
     "must end with an assistant turn"),
    ("starts_with_assistant", "messages", m(("assistant", "a"), ("user", "q"), ("assistant", "b")),
     "bad_role_order", "must start with a user turn"),
    ("empty_assistant_turn", "messages", m(("user", "q"), ("assistant", "  ")), "empty_field",
     "messages[1].content (assistant) is empty"),
    ("empty_messages", "messages", {"messages": []}, "bad_structure", "field 'messages' is an empty list"),
    ("message_without_content", "messages", {"messages": [{"role": "user"}]}, "missing_field",
     "messages[0].content' is missing"),
    ("role_is_a_number", "messages", {"messages": [{"role": 1, "content": "q"}]}, "wrong_type",
     "messages[0].role' must be a string"),
    ("messages_is_a_string", "messages", {"messages": "hello"}, "wrong_type", "must be a list of messages"),
    ("sharegpt_unknown_speaker", "sharegpt",
     {"conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "a"}]}, "unknown_role",
     "messages[1].role 'narrator'"),
    ("sharegpt_value_number", "sharegpt", {"conversations": [{"from": "human", "value": 5}]}, "wrong_type",
     "conversations[0].value"),
    ("chosen_equals_rejected", "pairs", {"prompt": "q", "chosen": "Same.", "rejected": "Same."},
     "chosen_equals_rejected", "chosen and rejected are identical"),
    ("chosen_equals_rejected_ws", "pairs", {"prompt": "q", "chosen": "Same.", "rejected": " Same.\n"},
     "chosen_equals_rejected", "identical"),
    ("missing_rejected", "pairs", {"prompt": "q", "chosen": "a"}, "missing_field", "field 'rejected' is missing"),
    ("empty_chosen", "pairs", {"prompt": "q", "chosen": "", "rejected": "b"}, "empty_field", "field chosen is empty"),
    ("prompt_ends_with_assistant", "pairs",
     {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x",
      "rejected": "y"}, "bad_role_order", "must end with a user turn"),
    ("hh_diverging_dialogues", "hh",
     {"chosen": hh(("Human", "a"), ("Assistant", "b")), "rejected": hh(("Human", "other"), ("Assistant", "c"))},
     "bad_structure", "do not share the same earlier turns"),
    ("hh_no_markers", "hh", {"chosen": "just text", "rejected": hh(("Human", "a"), ("Assistant", "b"))},
     "bad_structure", "text before the first 'Human:' turn"),
    ("hh_ends_with_human", "hh", {"chosen": hh(("Human", "a")), "rejected": hh(("Human", "a"))}, "bad_structure",
     "does not end with an Assistant turn"),
]


def _line(row) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode("utf-8")


@pytest.fixture(scope="module")
def row_run(tmp_path_factory):
    """One file per case (a good row, the bad row, a good row), all validated in one stage run."""
    root = tmp_path_factory.mktemp("bad_rows")
    specs = []
    for case, fmt, bad, _, _ in ROW_CASES:
        path = root / f"{case}.jsonl"
        good = _line(GOOD[fmt])
        path.write_bytes(good + b"\n" + _line(bad) + b"\n" + good + b"\n")
        specs.append(SourceSpec(path=str(path), kind=KIND[fmt], format=fmt))
    # accepted oddities: a BOM, CRLF endings, blank lines, a mapped field name
    bom = root / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + _line(GOOD["alpaca"]) + b"\r\n\r\n" + _line(GOOD["alpaca"]) + b"\r\n")
    specs.append(SourceSpec(path=str(bom), kind="sft", format="alpaca"))
    mapped = root / "mapped.jsonl"
    mapped.write_bytes(_line({"instruction": "q", "response": "a"}) + b"\n" + _line({"instruction": "q", "output": "a"}))
    specs.append(SourceSpec(path=str(mapped), kind="sft", format="alpaca", fields={"output": "response"}))
    text = root / "short.txt"
    text.write_text("Too short.\n", encoding="utf-8")  # one chunk below validate.min_text_chars
    specs.append(SourceSpec(path=str(text), kind="text", format="text"))
    params = Params(validate_=ValidateParams(sources=tuple(specs), max_reject_share=1.0))
    summary = validate.run(params, out=str(root / "validated"), quarantine=str(root / "q.jsonl"),
                           report=str(root / "report.md"), metrics=str(root / "metrics.json"))
    quarantine = [json.loads(line) for line in (root / "q.jsonl").read_text(encoding="utf-8").splitlines()]
    metrics = json.loads((root / "metrics.json").read_text())
    return {"root": root, "summary": summary, "quarantine": quarantine, "metrics": metrics}


@pytest.mark.parametrize("case,fmt,bad,reason,needle", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_row_is_quarantined_with_reason(row_run, case, fmt, bad, reason, needle):
    path = str(row_run["root"] / f"{case}.jsonl")
    got = [q for q in row_run["quarantine"] if q["source"] == path]
    assert len(got) == 1, got
    q = got[0]
    assert q["row"] == 2 and q["reason"] == reason and q["stage"] == "validate"
    assert q["message"].startswith(f"{path}:2: ") and needle in q["message"], q["message"]
    assert "\n" not in q["message"]
    s = row_run["metrics"]["sources"][path]
    assert (s["read"], s["kept"], s["quarantined"], s["by_reason"]) == (3, 2, 1, {reason: 1})
    if isinstance(bad, (dict, list, str)):  # the original row is kept as it was read
        assert q["original"] == bad


def test_accepted_oddities_and_totals(row_run):
    root, metrics = row_run["root"], row_run["metrics"]
    assert metrics["sources"][str(root / "bom.jsonl")]["kept"] == 2  # BOM skipped, CRLF and blank lines fine
    mapped = metrics["sources"][str(root / "mapped.jsonl")]
    assert (mapped["kept"], mapped["by_reason"]) == (1, {"missing_field": 1})
    mapped_q = [q for q in row_run["quarantine"] if q["source"] == str(root / "mapped.jsonl")][0]
    assert mapped_q["row"] == 2 and "response (as output)" in mapped_q["message"]
    short = [q for q in row_run["quarantine"] if q["source"] == str(root / "short.txt")]
    assert [(q["row"], q["reason"]) for q in short] == [(1, "too_short")]
    # nothing lost: kept + quarantined = read, overall and per source; the kept files hold the kept rows
    assert metrics["kept"] + metrics["quarantined"] == metrics["read"] == row_run["summary"]["read"]
    assert len(row_run["quarantine"]) == metrics["quarantined"] == len(ROW_CASES) + 2
    kept = sum(len((root / "validated" / f"{k}.jsonl").read_text(encoding="utf-8").splitlines())
               for k in validate.KINDS)
    assert kept == metrics["kept"]
    # the quarantine file is valid UTF-8 JSONL even for the lone-surrogate row
    raw = (root / "q.jsonl").read_bytes().decode("utf-8")
    assert "\\ud800" in raw


# ----------------------------------------------------------------------------- file-level errors


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({"instruction": pa.array([], pa.string())})
    pq.write_table(table, path)


ROWS = [GOOD["alpaca"]] * 50


def make_file_case(root: Path, case: str) -> tuple[Path, str, str, str]:
    """Create the case's input; returns (path, kind, format, expected text in the error line)."""
    p = root / case
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
    if case == "missing_path":
        return root / "nope.jsonl", "sft", "alpaca", "nope.jsonl: file not found"
    if case == "directory_for_file":
        (p := root / "dir.jsonl").mkdir()
        return p, "sft", "alpaca", "is a directory"
    if case == "empty_jsonl":
        (p := root / "e.jsonl").write_bytes(b"")
        return p, "sft", "alpaca", "file is empty"
    if case == "whitespace_jsonl":
        (p := root / "w.jsonl").write_bytes(b"\n \n\t\n")
        return p, "sft", "alpaca", "file is empty"
    if case == "empty_json":
        (p := root / "e.json").write_bytes(b"")
        return p, "sft", "alpaca", "file is empty"
    if case == "empty_json_array":
        (p := root / "a.json").write_bytes(b"[]")
        return p, "sft", "alpaca", "file is empty (an empty JSON array)"
    if case == "truncated_gzip_jsonl":
        (p := root / "t.jsonl.gz").write_bytes(_gz(lines)[:-40])
        return p, "sft", "alpaca", "truncated gzip"
    if case == "truncated_gzip_json":
        (p := root / "t.json.gz").write_bytes(_gz(json.dumps(ROWS).encode())[:-20])
        return p, "sft", "alpaca", "truncated gzip"
    if case == "not_gzip":
        (p := root / "n.jsonl.gz").write_bytes(lines)
        return p, "sft", "alpaca", "corrupt gzip"
    if case == "gzip_of_nothing":
        (p := root / "z.jsonl.gz").write_bytes(_gz(b""))
        return p, "sft", "alpaca", "file is empty"
    if case == "latin1_json":
        (p := root / "l.json").write_bytes(b'[{"instruction": "q", "output": "a"},\n{"instruction": "caf\xe9"}]')
        return p, "sft", "alpaca", "line 2: not valid UTF-8"
    if case == "utf16_json":
        (p := root / "u.json").write_bytes(json.dumps(ROWS).encode("utf-16"))
        return p, "sft", "alpaca", "UTF-16"
    if case == "broken_json_array":
        (p := root / "b.json").write_bytes(b'[{"instruction": "q",\n "output": }]')
        return p, "sft", "alpaca", "line 2 column 12: invalid JSON"
    if case == "object_not_array":
        (p := root / "o.json").write_bytes(b'{"data": [{"instruction": "q", "output": "a"}]}')
        return p, "sft", "alpaca", "the rows may be under 'data'"
    if case == "scalar_json":
        (p := root / "s.json").write_bytes(b"42")
        return p, "sft", "alpaca", "expected a JSON array of rows, got number"
    if case == "deeply_nested_json_file":
        (p := root / "d.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
        return p, "sft", "alpaca", "nested too deeply"
    if case == "unknown_extension":
        (p := root / "x.csv").write_bytes(b"instruction,output\nq,a\n")
        return p, "sft", "alpaca", "unknown file type .csv"
    if case == "corrupt_parquet":
        (p := root / "c.parquet").write_bytes(b"PAR1 this is not parquet")
        return p, "sft", "alpaca", "not a readable parquet file"
    if case == "empty_parquet":
        _parquet(p := root / "e.parquet", [])
        return p, "sft", "alpaca", "file is empty (0 rows)"
    if case == "text_empty_folder":
        (p := root / "books").mkdir()
        return p, "text", "text", "folder holds no .txt"
    if case == "text_latin1":
        (p := root / "l.txt").write_bytes(b"fine\nstill fine\ncaf\xe9\n")
        return p, "text", "text", "line 3: not valid UTF-8"
    if case == "text_empty_file":
        (p := root / "e.txt").write_bytes(b"  \n\n")
        return p, "text", "text", "file is empty"
    if case == "text_truncated_gzip":
        (p := root / "t.txt.gz").write_bytes(_gz(b"some words here\n" * 500)[:-30])
        return p, "text", "text", "truncated gzip"
    raise KeyError(case)


FILE_CASES = ["missing_path", "directory_for_file", "empty_jsonl", "whitespace_jsonl", "empty_json",
              "empty_json_array", "truncated_gzip_jsonl", "truncated_gzip_json", "not_gzip", "gzip_of_nothing",
              "latin1_json", "utf16_json", "broken_json_array", "object_not_array", "scalar_json",
              "deeply_nested_json_file", "unknown_extension", "corrupt_parquet", "empty_parquet",
              "text_empty_folder", "text_latin1", "text_empty_file", "text_truncated_gzip"]


def run_cli(tmp: Path, sources: str, capsys) -> tuple[int, str]:
    params = tmp / "params.yaml"
    params.write_text(f"validate:\n  sources:\n{sources}", encoding="utf-8")
    rc = validate.main(["--params", str(params), "--out", str(tmp / "validated"), "--quarantine",
                        str(tmp / "q.jsonl"), "--report", str(tmp / "r.md"), "--metrics", str(tmp / "m.json")])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_file_is_a_one_line_error(tmp_path, capsys, case):
    path, kind, fmt, needle = make_file_case(tmp_path, case)
    # an earlier good output is in place: a failed run must leave it untouched
    (tmp_path / "validated").mkdir()
    (tmp_path / "validated" / "sft.jsonl").write_text("earlier\n", encoding="utf-8")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(GOOD["alpaca"]) + "\n", encoding="utf-8")
    rc, err = run_cli(tmp_path, f"    - {{path: '{good}', kind: sft, format: alpaca}}\n"
                                f"    - {{path: '{path}', kind: {kind}, format: {fmt}}}\n", capsys)
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("tempering validate: error: ") and str(path) in err and needle in err, err
    assert (tmp_path / "validated" / "sft.jsonl").read_text(encoding="utf-8") == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []
    assert not (tmp_path / "q.jsonl").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("sources,needle", [
    ("    - {path: x.jsonl, kind: sft, format: hh}\n", "validate.sources.0: Value error, format 'hh' cannot produce"),
    ("    - {path: x.jsonl, kind: sft, format: alpaca, colour: red}\n", "validate.sources.0.colour: unknown key"),
    ("    - {path: x.jsonl, kind: chat, format: alpaca}\n", "validate.sources.0.kind"),
    ("    - {path: x.jsonl, kind: sft, format: alpaca}\n    - {path: x.jsonl, kind: sft, format: alpaca}\n",
     "x.jsonl is listed twice"),
    ("    []\n", "validate.sources is empty"),
])
def test_bad_source_config_is_a_one_line_error(tmp_path, capsys, sources, needle):
    rc, err = run_cli(tmp_path, sources, capsys)
    assert rc == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err


def test_reject_share_stops_before_the_output(tmp_path, capsys):
    """Too many bad rows: one line naming the file, the share and the main reason; no output."""
    path = tmp_path / "mostly_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD["alpaca"], {"instruction": "q", "output": 1},
                                                            {"instruction": "q", "output": 2}]), encoding="utf-8")
    rc, err = run_cli(tmp_path, f"    - {{path: '{path}', kind: sft, format: alpaca}}\n", capsys)
    assert rc == 2 and err.count("\n") == 1 and "2 of 3 rows rejected" in err and "wrong_type" in err, err
    assert not (tmp_path / "validated").exists()
    assert len((tmp_path / "q.jsonl").read_text(encoding="utf-8").splitlines()) == 2  # the evidence is kept


def test_case_count():
    """The issue asks for at least 30 malformed inputs with their expected outcome."""
    assert len(ROW_CASES) + len(FILE_CASES) >= 30 and len({c[0] for c in ROW_CASES}) == len(ROW_CASES)
    with pytest.raises(TemperingError):
        validate.validate_sources(ValidateParams())
