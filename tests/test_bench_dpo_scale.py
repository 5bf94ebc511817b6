"""bench/bench_dpo_scale.py: the two-scale weights and what the table reports."""

from __future__ import annotations

import pytest

from bench_loader import load_bench

bench = load_bench("bench_dpo_scale")


def test_two_scales_reduce_to_the_models_and_to_the_exports_alpha():
    import torch

    g = torch.Generator().manual_seed(0)
    w0, w1, w2 = ({"x": torch.randn(3, 4, generator=g)} for _ in range(3))
    assert torch.allclose(bench.combine(w0, w1, w2, 1.0, 1.0)["x"], w2["x"])  # as trained
    assert torch.allclose(bench.combine(w0, w1, w2, 1.0, 0.0)["x"], w1["x"])  # the SFT model
    assert torch.allclose(bench.combine(w0, w1, w2, 0.0, 0.0)["x"], w0["x"])  # the base
    # a == b is export's single alpha: base + alpha * (tuned - base)
    assert torch.allclose(bench.combine(w0, w1, w2, 0.6, 0.6)["x"], torch.lerp(w0["x"], w2["x"], 0.6), atol=1e-6)
    # b scales DPO's part alone
    half = bench.combine(w0, w1, w2, 1.0, 0.5)["x"]
    assert torch.allclose(half - w1["x"], 0.5 * (w2["x"] - w1["x"]), atol=1e-6)


def test_accuracy_and_table():
    assert bench.preference_accuracy([(-1.0, -2.0), (-3.0, -2.0), (-1.0, -1.0), (0.0, -5.0)]) == pytest.approx(0.5)
    point = {"a": 0.7, "b": 0.3, "dev_domain_gain": 0.354, "kl": 0.242, "kl_upper": 0.277, "perplexity_ratio": 1.244,
             "perplexity_ratio_upper": 1.283, "within_limits": False, "preference_accuracy": 0.152}
    text = bench.table({"points": [point]})
    assert "| 0.7 | 0.3 | +0.354 | 0.242 (0.277) | 1.244 (1.283) | no | 0.152 |" in text
