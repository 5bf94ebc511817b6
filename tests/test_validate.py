"""tasks.validate: great-expectations checks, quarantine bookkeeping, report, reject-share failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import make_data, validate
from tempering import TemperingError
from tempering.config import Params, SourceSpec, ValidateParams

GENERATED_SOURCES = [
    ("sft_alpaca.json", "sft", "alpaca"),
    ("sft_messages.jsonl", "sft", "messages"),
    ("preference.jsonl", "preference", "pairs"),
    ("corpus.txt", "text", "text"),
]


def params_for(sources, **kw) -> Params:
    specs = tuple(SourceSpec(path=str(p), kind=k, format=f) for p, k, f in sources)
    return Params(validate_=ValidateParams(sources=specs, **kw))


def run_stage(tmp: Path, params: Params) -> dict:
    return validate.run(params, out=str(tmp / "validated"), quarantine=str(tmp / "q.jsonl"),
                        report=str(tmp / "report.md"), metrics=str(tmp / "metrics.json"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v") / "generated"
    make_data.run(Params(), out=str(out))
    return out


@pytest.fixture(scope="module")
def validated(generated, tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("vout")
    summary = run_stage(tmp, params_for([(generated / f, k, fmt) for f, k, fmt in GENERATED_SOURCES]))
    return tmp, summary


def test_generated_data_invariants_and_planted_defects(generated, validated):
    tmp, summary = validated
    manifest = json.loads((generated / "manifest.json").read_text())
    metrics = json.loads((tmp / "metrics.json").read_text())
    quarantine = read_jsonl(tmp / "q.jsonl")
    kept = {k: read_jsonl(tmp / "validated" / f"{k}.jsonl") for k in validate.KINDS}

    # kept + quarantined = read, per source and in total
    for path, s in metrics["sources"].items():
        assert s["kept"] + s["quarantined"] == s["read"] > 0
        assert s["quarantined"] == sum(1 for q in quarantine if q["source"] == path)
        assert s["kept"] == sum(1 for rows in kept.values() for r in rows if r["source"].rsplit(":", 1)[0] == path)
    assert metrics["kept"] + metrics["quarantined"] == metrics["read"] == summary["read"]

    # exactly the planted validate-level defects are quarantined, with the planted reason
    planted = {(str(generated / d["file"]), d["row"]): d["defect"] for d in manifest["dirty"]
               if d["caught_by"] == "validate"}
    got = {(q["source"], q["row"]): q["reason"] for q in quarantine}
    assert got == planted
    for q in quarantine:
        assert q["stage"] == "validate" and q["message"].startswith(f"{q['source']}:{q['row']}: ")
        assert q["reasons"][0] == q["reason"] and "original" in q
    # output folder: exactly the three kinds + meta.json
    assert sorted(p.name for p in (tmp / "validated").iterdir()) == ["meta.json", "preference.jsonl", "sft.jsonl",
                                                                    "text.jsonl"]
    assert all(kept.values())
    report = (tmp / "report.md").read_text()
    assert "| `" + str(generated / "sft_alpaca.json") + "` | sft | alpaca |" in report
    assert "wrong_type" in report and "FAILED" not in report


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


SFT_CASES = [
    (msgs(("user", "q"), ("assistant", "a")), None),
    (msgs(("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")), None),
    (msgs(("user", "q"), ("bot", "a")), "unknown_role"),
    (msgs(("user", "q"), ("user", "q again"), ("assistant", "a")), "bad_role_order"),
    (msgs(("user", "q"), ("assistant", "a"), ("system", "s")), "bad_role_order"),
    (msgs(("assistant", "a"), ("user", "q")), "bad_role_order"),
    (msgs(("user", "q")), "bad_role_order"),
    (msgs(("user", "q"), ("assistant", "   ")), "empty_field"),
    (msgs(("user", "bell\x07"), ("assistant", "a")), "control_chars"),
    (msgs(("user", "q"), ("assistant", "bad \ufffd decode")), "control_chars"),
    (msgs(("user", "tab\tand\nnewline ok"), ("assistant", "a")), None),
    (msgs(("user", "q"), ("assistant", "x" * 101)), "too_long"),
]


def test_sft_checks(tmp_path):
    path = write(tmp_path / "sft.jsonl", [row for row, _ in SFT_CASES])
    kept, quarantine, metrics, _ = validate.validate_sources(
        params_for([(path, "sft", "messages")], max_chars=100).validate_)
    got = {q["row"]: q for q in quarantine}
    for i, (_, reason) in enumerate(SFT_CASES, 1):
        assert got.get(i, {}).get("reason") == reason, (i, got.get(i))
    assert len(kept["sft"]) == sum(1 for _, r in SFT_CASES if r is None)
    assert "two consecutive user turns" in got[4]["message"]
    assert "system turn after the first" in got[5]["message"]
    assert "messages[1].role 'bot'" in got[3]["message"]
    assert "messages[1].content (assistant) is empty" in got[8]["message"]
    assert "U+0007" in got[9]["message"]
    assert metrics["sources"][str(path)]["by_reason"]["bad_role_order"] == 4


def test_row_failing_several_checks_gets_all_reasons(tmp_path):
    path = write(tmp_path / "sft.jsonl", [msgs(("user", "q\x01"), ("user", ""))])
    _, quarantine, _, _ = validate.validate_sources(params_for([(path, "sft", "messages")]).validate_)
    assert quarantine[0]["reason"] == "bad_role_order"
    assert quarantine[0]["reasons"] == ["bad_role_order", "empty_field", "control_chars", "too_short"]


def test_preference_and_text_checks(tmp_path):
    prefs = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "same", "rejected": " same "},
        {"prompt": "q", "chosen": "", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "chosen": "good", "rejected": "bad"},
    ]
    ppath = write(tmp_path / "p.jsonl", prefs)
    tpath = tmp_path / "t.txt"
    tpath.write_text("short\n\n" + "x" * 30 + "\n\n\n" + "long enough paragraph " * 5, encoding="utf-8")
    kept, quarantine, _, _ = validate.validate_sources(
        params_for([(ppath, "preference", "pairs"), (tpath, "text", "text")], min_text_chars=50,
                   text_chunk_chars=100).validate_)
    reasons = {(Path(q["source"]).name, q["row"]): q["reason"] for q in quarantine}
    assert reasons == {("p.jsonl", 2): "chosen_equals_rejected", ("p.jsonl", 3): "empty_field",
                       ("p.jsonl", 4): "bad_role_order", ("t.txt", 1): "too_short"}
    assert len(kept["preference"]) == 1 and len(kept["text"]) == 1


def test_allowed_roles_param(tmp_path):
    path = write(tmp_path / "sft.jsonl", [msgs(("user", "q"), ("assistant", "a"), ("tool", "t"))])
    _, q, _, _ = validate.validate_sources(params_for([(path, "sft", "messages")]).validate_)
    assert q[0]["reason"] == "unknown_role"
    kept, q, _, _ = validate.validate_sources(
        params_for([(path, "sft", "messages")], allowed_roles=("system", "user", "assistant", "tool")).validate_)
    assert not q and len(kept["sft"]) == 1


def test_reject_share_failure_keeps_the_evidence(tmp_path):
    rows = [{"instruction": "q", "output": "a"}] * 3 + [{"instruction": "q", "output": 1}] * 2
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(TemperingError) as exc:
        run_stage(tmp_path, params_for([(path, "sft", "alpaca")], max_reject_share=0.25))
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "2 of 5 rows rejected" in msg and "wrong_type" in msg
    assert len(read_jsonl(tmp_path / "q.jsonl")) == 2
    assert "FAILED" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["failed_sources"] == [str(path)]
    assert not (tmp_path / "validated").exists()  # nothing for later stages to train on
    # the same data passes with a looser limit
    summary = run_stage(tmp_path, params_for([(path, "sft", "alpaca")], max_reject_share=0.5))
    assert summary["kept"] == 3 and (tmp_path / "validated" / "sft.jsonl").exists()


def test_file_errors_and_config_errors(tmp_path):
    with pytest.raises(TemperingError, match="nope.json: file not found"):
        validate.validate_sources(params_for([(tmp_path / "nope.json", "sft", "alpaca")]).validate_)
    with pytest.raises(TemperingError, match="validate.sources is empty"):
        validate.validate_sources(ValidateParams())


def test_cli_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "t.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    params = tmp_path / "params.yaml"
    params.write_text(f"validate:\n  sources:\n    - {{path: {bad}, kind: sft, format: alpaca}}\n", encoding="utf-8")
    rc = validate.main(["--params", str(params), "--out", "v", "--quarantine", "q.jsonl", "--report", "r.md",
                        "--metrics", "m.json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "t.jsonl.gz" in err and "gzip" in err and "Traceback" not in err
