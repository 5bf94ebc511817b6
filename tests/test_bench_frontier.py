"""bench/bench_frontier.py: one `dvc exp run` per replay share, the records it reads back, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_loader import load_bench


@pytest.fixture
def bench():
    return load_bench("bench_frontier")


def test_each_share_is_an_experiment_and_the_table_has_every_alpha(bench, tmp_path, monkeypatch):
    calls = []

    def fake_dvc(*args, root):
        calls.append(args)
        share = float(args[-1].split("=")[1])
        points = [{"alpha": a, "domain_gain": 0.5 * a - share, "within_limits": a < 1,
                   "drift": {"kl": a, "kl_upper": a + 0.1, "perplexity_ratio": 1 + a, "perplexity_ratio_upper": 1.1 + a}}
                  for a in (1.0, 0.5)]
        (Path(root) / "metrics").mkdir(exist_ok=True)
        (Path(root) / "metrics/export.json").write_text(json.dumps({"interpolation": {"points": points, "chosen": 0.5}}))
        (Path(root) / "metrics/sft.json").write_text(json.dumps({"steps": 7, "data": {"replay": {"share": share}}}))
        return 0, "ok"

    monkeypatch.setattr(bench, "run_dvc", fake_dvc)
    out = tmp_path / "r.json"
    assert bench.main(["--shares", "0", "0.2", "--root", str(tmp_path), "--json", str(out)]) == 0
    assert calls == [("exp", "run", "export", "-S", "sft.replay.share=0.0"),
                     ("exp", "run", "export", "-S", "sft.replay.share=0.2")]
    records = json.loads(out.read_text())["records"]
    assert [r["share"] for r in records] == [0.0, 0.2] and records[1]["sft_replay"] == {"share": 0.2}
    table = bench.table(records)
    assert table.count("\n") == 1 + 4
    assert "| 0.2 | 0.5 | +0.050 | 0.500 (0.600) | 1.500 (1.600) | yes | **kept** |" in table


def test_a_failed_experiment_stops_with_dvc_s_last_lines(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_dvc", lambda *a, root: (1, "x\nERROR: failed to reproduce 'sft'"))
    with pytest.raises(SystemExit, match="failed to reproduce 'sft'"):
        bench.main(["--shares", "0", "--root", str(tmp_path)])
