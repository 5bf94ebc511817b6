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


def test_workspace_run_is_a_record_its_share_is_not_rerun_and_params_come_back(bench, tmp_path, monkeypatch):
    """--workspace reads the run already there (at params.yaml's share) instead of re-running it;
    dvc exp run -S leaves the last share in params.yaml, and the script writes the file back; the
    JSON says when, where and with which params it was measured."""
    params = "sft:\n  epochs: 3\n  replay: {share: 0.35, source: data/replay/sft.jsonl, seed: 0}\ndpo:\n  epochs: 1\n"
    (tmp_path / "params.yaml").write_text(params)

    def metrics(share):
        (tmp_path / "metrics").mkdir(exist_ok=True)
        points = [{"alpha": 1.0, "domain_gain": share, "within_limits": True,
                   "drift": {"kl": 0.1, "kl_upper": 0.2, "perplexity_ratio": 1.1, "perplexity_ratio_upper": 1.2}}]
        (tmp_path / "metrics/export.json").write_text(json.dumps({"interpolation": {"points": points, "chosen": 1.0}}))
        (tmp_path / "metrics/sft.json").write_text(json.dumps({"steps": 7}))

    calls = []

    def fake_dvc(*args, root):
        calls.append(args[-1])
        share = float(args[-1].split("=")[1])
        (tmp_path / "params.yaml").write_text(params.replace("share: 0.35", f"share: {share}"))
        metrics(share)
        return 0, "ok"

    metrics(0.35)
    monkeypatch.setattr(bench, "run_dvc", fake_dvc)
    out = tmp_path / "r.json"
    assert bench.main(["--shares", "0.2", "0.35", "0", "--workspace", "--root", str(tmp_path), "--json", str(out)]) == 0
    assert calls == ["sft.replay.share=0.2", "sft.replay.share=0.0"]
    assert (tmp_path / "params.yaml").read_text() == params
    result = json.loads(out.read_text())
    assert [(r["share"], r["source"]) for r in result["records"]] == [(0.0, "experiment"), (0.2, "experiment"),
                                                                      (0.35, "workspace")]
    assert result["records"][2]["interpolation"]["points"][0]["domain_gain"] == 0.35
    assert result["params"]["sft.epochs"] == 3 and result["params"]["dpo.epochs"] == 1
    assert result["params"]["dpo.beta"] is None and result["date"].endswith("UTC") and "--workspace" in result["command"]
    from tempering import html_report
    assert len(html_report.FrontierSweep.from_dict(result).runs) == 3   # what the report reads


def test_a_run_without_interpolation_points_is_refused(bench, tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/export.json").write_text(json.dumps({"interpolation": {"enabled": False}}))
    with pytest.raises(SystemExit, match="no interpolation points"):
        bench.read_record(0.1, tmp_path, "export")
