"""bench/bench_own_data.py: the params a user without a domain benchmark writes, and what it reads back."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from bench_loader import load_bench
from tempering.config import load_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench():
    return load_bench("bench_own_data")


def test_configure_leaves_no_domain_benchmark_and_a_valid_config(bench, tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    data = tmp_path / "mine.json.gz"
    with gzip.open(data, "wt") as fh:
        json.dump([{"instruction": "say hi", "input": "", "output": "hi"}], fh)
    bench.configure(tmp_path, data)
    p = load_params(tmp_path / "params.yaml")
    assert (tmp_path / "data/own/mine.json.gz").exists()
    assert [s.path for s in p.validate_.sources if s.kind == "sft"][0] == "data/own/mine.json.gz"
    assert not any(b.role == "domain" for b in p.evaluate.benchmarks) and not p.evaluate.dev.benchmarks
    assert p.dedup.sft_heldout.enabled == "auto" and p.dpo.enabled is False
    assert not any(s.kind == "preference" for s in p.validate_.sources)


def test_collect_reads_the_heldout_check(bench, tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps(
        {"sft_heldout": {"rows": 3, "nll_gain": 0.4, "examples": [{"id": "a"}]}, "benchmarks": {}}))
    (tmp_path / "metrics/gate.json").write_text(json.dumps(
        {"passed": False, "reasons": ["x"], "checks": [{"benchmark": "sft_heldout", "kind": "heldout_nll",
                                                         "passed": False, "reason": "x"}]}))
    out = bench.collect(tmp_path)
    assert out["evaluate_sft_heldout"] == {"rows": 3, "nll_gain": 0.4} and out["examples"] == [{"id": "a"}]
    assert out["gate"]["checks"][0]["kind"] == "heldout_nll" and out["gate"]["passed"] is False
