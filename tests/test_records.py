"""Typed metric records (tempering/records.py): what the stages write is what the report reads.

Round trip: every committed metrics file of the default run (and the report's fixture run) reads
into its record and comes back with the same keys and values, byte for byte once written by
``write_json``. A file of the wrong shape is refused with a message naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tempering import records
from tempering.io import write_json

from test_html_report import make_run

ROOT = Path(__file__).resolve().parents[1]
FILES = {"gate": records.GateRecord, "promote": records.PromoteRecord, "export": records.ExportRecord,
         "evaluate": records.EvaluateRecord, "cpt": records.TrainRecord, "sft": records.TrainRecord,
         "dpo": records.TrainRecord, "dedup": records.DedupRecord, "validate": records.ValidateRecord}


def _round_trip(path: Path, record: type[records.Record], tmp_path: Path) -> records.Record:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    rec = record.from_dict(data, str(path))
    assert rec.to_dict() == data
    out = write_json(tmp_path / path.name, records.validated(record, data, str(path)))
    if text.endswith("\n") and text.startswith("{\n  "):   # written by write_json: the same bytes back
        assert out.read_text(encoding="utf-8") == text
    return rec


def test_committed_default_run_round_trips(tmp_path):
    seen = 0
    for name, record in FILES.items():
        path = ROOT / "metrics" / f"{name}.json"
        if path.exists():
            _round_trip(path, record, tmp_path)
            seen += 1
    assert seen >= 6, "the committed default run's metrics are missing"
    gate = records.GateRecord.from_dict(json.loads((ROOT / "metrics/gate.json").read_text()))
    assert gate.checks and all(isinstance(c, records.GateCheck) for c in gate.checks)
    assert gate.n_checks == len(gate.checks) and gate.reasons == tuple(json.loads(
        (ROOT / "metrics/gate.json").read_text())["reasons"])
    ev = records.EvaluateRecord.from_dict(json.loads((ROOT / "metrics/evaluate.json").read_text()))
    for group in ev.generations.values():
        assert isinstance(group, records.GenerationGroup) and group.n >= len(group.examples) > 0
        assert set(group.rates) <= {"base", "candidate", "production"}


def test_fixture_run_round_trips(tmp_path):
    run = make_run(tmp_path / "run")
    for name, record in FILES.items():
        rec = _round_trip(run / "metrics" / f"{name}.json", record, tmp_path)
        if name == "dpo":
            assert rec.heldout.accuracy["dpo"] == 0.684 and rec.heldout.ci == (-0.053, 0.263)
        if name == "export":
            assert [p.alpha for p in rec.interpolation.points] == [1.0, 0.65, 0.5] and rec.interpolation.chosen == 0.5
    meta = records.ExportMeta.from_dict(json.loads((run / "models/export/meta.json").read_text()))
    assert meta.git_sha == "abc1234" and len(meta.samples) == 1


@pytest.mark.parametrize("record, data, message", [
    (records.GateRecord, {"checks": []}, "metrics/gate.json: passed: missing (expected a bool)"),
    (records.GateRecord, {"passed": True, "checks": "garbage"}, "metrics/gate.json: checks: expected a list, got str"),
    (records.GateRecord, {"passed": True, "checks": [{"benchmark": "b", "kind": "gain", "passed": "yes"}]},
     "metrics/gate.json: checks[0].passed: expected a bool, got str 'yes'"),
    (records.GateRecord, {"passed": True, "checks": [{"benchmark": "b", "kind": "gain", "passed": True, "ci": [1]}]},
     "metrics/gate.json: checks[0].ci: expected [low, high] numbers"),
    (records.EvaluateRecord, {"benchmarks": {"domain": {"candidate": {"acc": "0.5"}}}},
     "metrics/evaluate.json: benchmarks.domain.candidate.acc: expected a number, got str '0.5'"),
    (records.EvaluateRecord, {"generations": [{"question": "q"}]},
     "metrics/evaluate.json: generations: expected an object, got list"),
    (records.EvaluateRecord, {"generations": {"domain": {"candidate": 0.5, "n": 4}}},
     "metrics/evaluate.json: generations.domain.examples: missing (expected a list)"),
    (records.EvaluateRecord, {"generations": {"domain": {"candidate": 0.5, "n": 4, "examples": ["text"]}}},
     "metrics/evaluate.json: generations.domain.examples[0]: expected an object, got str"),
    (records.PromoteRecord, {"promoted": True, "aliases": {"production": 2}},
     "metrics/promote.json: aliases.production: expected a version string, got int"),
    (records.ExportRecord, {"interpolation": {"points": [{"domain_gain": 0.1}]}},
     "metrics/export.json: interpolation.points[0].alpha: missing (expected a number)"),
    (records.TrainRecord, {"heldout": {"accuracy": {"dpo": "high"}}}, "metrics/dpo.json: heldout.accuracy.dpo"),
    (records.GateRecord, ["not", "an", "object"], "metrics/gate.json: (top level): expected an object, got list"),
])
def test_malformed_files_are_refused_naming_file_and_field(record, data, message):
    source = "metrics/dpo.json" if record is records.TrainRecord else None
    with pytest.raises(records.RecordError) as err:
        record.from_dict(data, source)
    assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(records.RecordError):
        records.validated(record, data, source or record.FILE)


def test_records_are_frozen_and_to_dict_is_a_copy():
    data = {"passed": False, "reasons": ["r"], "checks": []}
    rec = records.GateRecord.from_dict(data)
    with pytest.raises(AttributeError):
        rec.passed = True
    out = rec.to_dict()
    out["reasons"].append("x")
    assert rec.to_dict() == data and data["reasons"] == ["r"]


def test_stages_write_through_their_records():
    """Each stage whose metrics the report reads writes them through the record (not a copy of the shape)."""
    for stage, record in (("gate", "GateRecord"), ("evaluate", "EvaluateRecord"), ("export", "ExportRecord"),
                          ("promote", "PromoteRecord")):
        src = (ROOT / "tasks" / f"{stage}.py").read_text()
        assert f"validated({record}," in src, stage
        assert "write_json(metrics, result)" not in src and "write_json(metrics, summary)" not in src, stage
