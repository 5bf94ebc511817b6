"""bench/bench_eval.py's tolerance sweep replays the scorer's own near-tie rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench_loader import load_bench


def _request(doc: int, idx: int, choice: str):
    return SimpleNamespace(task_name="t", doc_id=doc, idx=idx, args=("context", choice), doc={})


def test_tolerance_sweep_rescores_what_the_scorer_rescores():
    """Item 0: choices a and b tie, c cannot win (not re-scored); item 1 is decided. Re-scoring
    the two contenders gives the exact decisions, at the cost of item 0's context once plus the
    two continuations."""
    bench = load_bench("bench_eval")
    requests = [_request(0, 0, " a"), _request(0, 1, " b"), _request(0, 2, " cccc"),
                _request(1, 0, " a"), _request(1, 1, " b")]
    bf16 = [(-1.0, False), (-1.1, False), (-9.0, False), (-1.0, False), (-5.0, False)]
    exact = [(-1.2, False), (-1.0, False), (-9.1, False), (-1.0, False), (-5.0, False)]
    context, tokens = [10, 10, 10, 7, 7], [1, 1, 4, 1, 1]
    off, on = bench.tolerance_sweep(requests, bf16, exact, [0.0, 0.15], context, tokens)
    assert off["rescored_requests"] == 0 and off["same_decision_share"] < 1.0  # bf16 alone flips item 0
    assert on["rescored_requests"] == 2 and on["same_decision_share"] == 1.0
    assert on["rescored_tokens"] == 10 + 1 + 1


def test_tolerance_sweep_bounds_grow_with_continuation_tokens():
    """Item 1's margin of 0.3 is safe for one-token answers at 0.1 (bounds 0.1 each) and a
    near-tie for 16-token answers (bounds 0.4 each)."""
    bench = load_bench("bench_eval")
    requests = [_request(1, 0, " a"), _request(1, 1, " b")]
    bf16 = exact = [(-1.0, False), (-1.3, False)]
    short, = bench.tolerance_sweep(requests, bf16, exact, [0.1], [5, 5], [1, 1])
    long_, = bench.tolerance_sweep(requests, bf16, exact, [0.1], [5, 5], [16, 16])
    assert short["rescored_requests"] == 0 and long_["rescored_requests"] == 2


def test_pair_error_is_in_the_rules_unit():
    """One pair of one-token choices with errors +0.1 and -0.1 needs a tolerance of 0.1 (per
    sqrt(token), as in nats); as four-token choices it needs half that per sqrt(token)."""
    bench = load_bench("bench_eval")
    requests = [_request(0, 0, " a"), _request(0, 1, " b")]
    bf16 = [(-1.0, False), (-2.0, False)]
    exact = [(-1.1, False), (-1.9, False)]
    one = bench.pair_error(requests, bf16, exact, [1, 1])
    four = bench.pair_error(requests, bf16, exact, [4, 4])
    assert one["max"] == pytest.approx(0.1) and one["nats"]["max"] == pytest.approx(0.1)
    assert four["max"] == pytest.approx(0.05) and four["nats"]["max"] == pytest.approx(0.1)


def test_flat_sweep_replays_the_old_rule():
    """scaled=False: the tolerance in nats for every choice, whatever its length (the 16-token
    pair of the test above is then safe at 0.1), with the re-scoring cost still in real tokens."""
    bench = load_bench("bench_eval")
    requests = [_request(1, 0, " a"), _request(1, 1, " b")]
    bf16 = exact = [(-1.0, False), (-1.3, False)]
    flat, = bench.tolerance_sweep(requests, bf16, exact, [0.1], [5, 5], [16, 16], scaled=False)
    tied, = bench.tolerance_sweep(requests, bf16, exact, [0.2], [5, 5], [16, 16], scaled=False)
    assert flat["rescored_requests"] == 0 and tied["rescored_tokens"] == 5 + 16 + 16
