"""A user's own SFT data and no domain benchmark, configured in params.yaml alone (issue 12 item 5):
the dedup stage holds SFT rows out, SFT never trains on them, evaluate scores the answers' NLL
under candidate and base, and the gate's heldout_nll check is the domain check.

Two sources: the tiny project's own generated SFT files (always), and real public Alpaca rows
(the first 100 of Stanford Alpaca, ../shared/data; skipped where that folder is absent). Kept
cheap: a copy of the session's reproduced tiny project, run up to the report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tiny_project import copy_project, dvc, git_commit

from shared_data import SHARED, need  # noqa: E402

ALPACA = SHARED / "sft" / "alpaca_first100.json.gz"


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# The real-rows variant is a second whole `dvc repro`: `slow`, so it runs in `make test-e2e` (and in
# CI) and keeps the default suite under its 10-minute budget.
@pytest.mark.parametrize("data", ["generated", pytest.param("alpaca_first100", marks=pytest.mark.slow)])
def test_own_sft_data_without_a_domain_benchmark(tiny_project: Path, tmp_path: Path, data: str):
    if data == "alpaca_first100":
        need(ALPACA)
    root = copy_project(tiny_project, tmp_path / data)
    params = yaml.safe_load((root / "params.yaml").read_text())
    sources = [s for s in params["validate"]["sources"] if s["kind"] != "sft" or s["path"].startswith("data/replay/")]
    if data == "generated":
        sources = params["validate"]["sources"]
    else:
        (root / "data" / "own").mkdir(parents=True)
        shutil.copy(ALPACA, root / "data" / "own" / ALPACA.name)
        sources = [{"path": f"data/own/{ALPACA.name}", "kind": "sft", "format": "alpaca"}] + sources
        # The tiny model's 512-token BPE spends ~2x SmolLM2's tokens on English: what validate's
        # truncation check asks a user to do (its error names sft.max_length).
        params["sft"]["max_length"] = 512
        params["validate"]["tokens"]["max_truncation_rate"] = 0.3
    params["validate"]["sources"] = sources
    # No domain benchmark anywhere: only the shipped general ones (and make_data's, in the tiny project).
    ev = params["evaluate"]
    ev["benchmarks"] = [b for b in ev["benchmarks"] if b["role"] != "domain"]
    ev["dev"]["benchmarks"] = []
    ev["generation"]["benchmarks"] = []
    ev["sft_heldout"] = {"examples": 2, "max_new_tokens": 8, "max_length": params["sft"]["max_length"]}
    params["dedup"]["sft_heldout"] = {"enabled": "auto", "share": 0.3, "max_rows": 40, "seed": 0}
    params["gate"].update(min_heldout_nll_gain=0.05, min_heldout_rows=8)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(root, "own data, no domain benchmark")

    dvc(root, "repro", timeout=1500)

    held = _rows(root / "data/clean/sft_heldout.jsonl")
    train = _rows(root / "data/clean/sft.jsonl")
    dedup = json.loads((root / "metrics/dedup.json").read_text())["sft_heldout"]
    assert dedup["enabled"] and "no domain benchmark" in dedup["reason"] and dedup["rows"] == len(held) >= 8
    assert not {r["id"] for r in held} & {r["id"] for r in train}
    if data == "alpaca_first100":
        assert all(r["source"].startswith(f"data/own/{ALPACA.name}:") for r in held)
    sft = json.loads((root / "metrics/sft.json").read_text())
    assert sft["data"]["train_examples"] <= len(train)  # trained on data/clean/sft.jsonl only

    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    assert "domain" not in evaluation["benchmarks"]
    summary = evaluation["sft_heldout"]
    assert summary["rows"] == len(held) - summary["skipped"] and summary["rows"] >= 8
    assert len(summary["examples"]) == 2 and all(e["reference"] for e in summary["examples"])
    per_row = _rows(root / "eval/samples/sft_heldout.jsonl")
    assert len(per_row) == summary["rows"] and {r["id"] for r in per_row} <= {r["id"] for r in held}

    gate = json.loads((root / "metrics/gate.json").read_text())
    checks = [c for c in gate["checks"] if c["kind"] == "heldout_nll"]
    assert len(checks) == 1
    c = checks[0]
    assert c["n"] == summary["rows"] and c["family"] == "gain"
    assert c["delta"] == pytest.approx(summary["nll_gain"], abs=1e-3)
    # Six steps of a random model on the rows: the answers' tokens get far likelier than under the base.
    assert c["passed"] and c["ci"][0] >= 0.05, c["reason"]
    assert not any("nothing shows the candidate is better" in r for r in gate["reasons"])
    assert "Held-out SFT rows" in (root / "reports/report.html").read_text()
