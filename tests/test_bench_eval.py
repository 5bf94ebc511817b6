"""bench/bench_eval.py's tolerance sweep replays the scorer's own near-tie rule."""

from __future__ import annotations

from types import SimpleNamespace

from bench_loader import load_bench


def _request(doc: int, idx: int, choice: str):
    return SimpleNamespace(task_name="t", doc_id=doc, idx=idx, args=("context", choice), doc={})


def test_tolerance_sweep_rescores_what_the_scorer_rescores():
    """Item 0: choices a and b tie, c cannot win (not re-scored); item 1 is decided. Re-scoring
    the two contenders gives the exact decisions."""
    bench = load_bench("bench_eval")
    requests = [_request(0, 0, " a"), _request(0, 1, " b"), _request(0, 2, " cccc"),
                _request(1, 0, " a"), _request(1, 1, " b")]
    bf16 = [(-1.0, False), (-1.1, False), (-9.0, False), (-1.0, False), (-5.0, False)]
    exact = [(-1.2, False), (-1.0, False), (-9.1, False), (-1.0, False), (-5.0, False)]
    off, on = bench.tolerance_sweep(requests, bf16, exact, [0.0, 0.15])
    assert off["rescored_requests"] == 0 and off["same_decision_share"] < 1.0  # bf16 alone flips item 0
    assert on["rescored_requests"] == 2 and on["same_decision_share"] == 1.0
