"""The interpolation rescue's rule (tempering/interpolate.py) and the dev split it reads: which
alpha is kept, and why; the weights it sets; a dev split that overlaps the gate's is refused."""

from __future__ import annotations

import json

import pytest

from tempering import TemperingError
from tempering.config import GateParams, from_dict
from tempering.interpolate import Interpolation, choose, within_limits

GATE = GateParams(max_kl=0.3, max_perplexity_ratio=1.2)


def _pt(alpha, gain, kl_upper, ppl_upper=1.0):
    return {"alpha": alpha, "domain_gain": gain,
            "drift": {"texts": 64, "kl": kl_upper / 2, "kl_upper": kl_upper, "perplexity_ratio": ppl_upper,
                      "perplexity_ratio_upper": ppl_upper}}


def test_the_largest_dev_gain_within_the_limits_is_kept():
    points = [_pt(1.0, 0.50, 0.90), _pt(0.65, 0.42, 0.31), _pt(0.5, 0.40, 0.22), _pt(0.3, 0.20, 0.08)]
    alpha, reason = choose(points, GATE)
    assert alpha == 0.5
    assert "2 of 4 alphas" in reason and "+0.400" in reason


def test_the_perplexity_limit_counts_too():
    points = [_pt(1.0, 0.5, 0.1, ppl_upper=1.5), _pt(0.5, 0.3, 0.05, ppl_upper=1.1)]
    assert choose(points, GATE)[0] == 0.5
    assert within_limits(points[0]["drift"], GATE) is False
    assert within_limits(points[0]["drift"], GATE.model_copy(update={"max_perplexity_ratio": None})) is True


def test_headroom_keeps_a_point_just_inside_the_limit_out():
    """The 2026-12-06 default run: alpha 0.85 at dev KL upper 0.2996 was kept, and the gate,
    re-measuring on its own texts, found 0.309. With 5% headroom (0.285) 0.8 is kept instead."""
    from tempering.interpolate import limits

    points = [_pt(1.0, 0.375, 0.394, 1.157), _pt(0.85, 0.354, 0.2996, 1.139), _pt(0.8, 0.333, 0.271, 1.126),
              _pt(0.7, 0.292, 0.222, 1.120)]
    assert choose(points, GATE)[0] == 0.85
    alpha, reason = choose(points, GATE, headroom=0.05)
    assert alpha == 0.8 and "less 5% headroom" in reason
    assert limits(GATE, 0.05) == pytest.approx((0.285, 1.19))
    assert limits(GATE) == pytest.approx((0.3, 1.2))
    # the perplexity ratio's headroom is taken from its excess over 1
    assert within_limits(_pt(0.5, 0.1, 0.1, 1.195)["drift"], GATE, 0.05) is False
    assert within_limits(_pt(0.5, 0.1, 0.1, 1.195)["drift"], GATE) is True
    # with nothing within even the reduced limits, the least drift is kept and the reason says so
    alpha, reason = choose([_pt(1.0, 0.4, 0.299), _pt(0.9, 0.3, 0.29)], GATE, headroom=0.05)
    assert alpha == 0.9 and "within the gate's limits less 5% headroom" in reason


def test_headroom_is_validated():
    from tempering.config import ParamsError

    assert from_dict({}).export.interpolation.headroom == 0.05
    with pytest.raises(ParamsError, match="headroom"):
        from_dict({"export": {"interpolation": {"headroom": 1.0}}})


def test_a_tie_in_gain_goes_to_the_smaller_alpha():
    points = [_pt(1.0, 0.4, 0.2), _pt(0.8, 0.4, 0.1), _pt(0.5, 0.3, 0.05)]
    assert choose(points, GATE)[0] == 0.8


def test_no_alpha_within_the_limits_keeps_the_least_drift_and_says_so():
    points = [_pt(1.0, 0.5, 1.4), _pt(0.5, 0.3, 0.6), _pt(0.3, 0.1, 0.45)]
    alpha, reason = choose(points, GATE)
    assert alpha == 0.3 and "no alpha keeps dev drift within the gate's limits" in reason


def test_without_dev_drift_texts_the_sweep_says_it_cannot_see_forgetting():
    points = [{"alpha": 1.0, "domain_gain": 0.5, "drift": None}, {"alpha": 0.5, "domain_gain": 0.3, "drift": None}]
    alpha, reason = choose(points, GATE)
    assert alpha == 1.0 and "could not see forgetting" in reason


def test_without_a_dev_domain_benchmark_the_largest_alpha_within_the_limits():
    points = [_pt(1.0, None, 0.5), _pt(0.6, None, 0.25), _pt(0.3, None, 0.1)]
    alpha, reason = choose(points, GATE)
    assert alpha == 0.6 and "no dev domain benchmark" in reason


def test_interpolation_sets_the_weights_and_refuses_other_shapes(tmp_path):
    import torch

    from tempering.testing import make_tiny_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "a"))
    tuned = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "b", seed=1))
    want_tuned = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    interp = Interpolation(tuned, base)
    interp.set(0.25)
    for name, p in tuned.named_parameters():
        b = dict(base.named_parameters())[name]
        assert torch.allclose(p, b + 0.25 * (want_tuned[name] - b), atol=1e-6)
    interp.set(1.0)
    assert all(torch.equal(p, want_tuned[n]) for n, p in tuned.named_parameters())
    assert interp.delta_norm() > 0

    wider = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "c", hidden=32))
    with pytest.raises(TemperingError, match="tuned shape"):
        Interpolation(wider, base)


@pytest.mark.parametrize("alphas, match", [([], "at least one alpha"), ([1.2], r"in \(0, 1\]"),
                                           ([0.5, 0.5], "duplicate")])
def test_bad_alphas_are_refused_naming_the_key(alphas, match):
    with pytest.raises(TemperingError, match=match) as err:
        from_dict({"export": {"interpolation": {"alphas": alphas}}})
    assert "export.interpolation.alphas" in str(err.value)


def test_a_dev_split_sharing_an_item_or_a_text_with_the_gate_is_refused(tmp_path):
    from tempering.benchmarks import check_dev_disjoint, decontamination_sets

    item = {"id": "q1", "question": "Which  colour?", "choices": ["red", "blue"], "answer": 0}
    (tmp_path / "gate.jsonl").write_text(json.dumps(item) + "\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps(dict(item, id="d1", question="which colour?")) + "\n")
    (tmp_path / "dev_ok.jsonl").write_text(json.dumps(dict(item, id="d1", question="another one?")) + "\n")
    text = {"id": "t", "kind": "text", "source": "hs:1", "text": "a plain text"}
    (tmp_path / "drift.jsonl").write_text(json.dumps(text) + "\n")
    (tmp_path / "drift_dev.jsonl").write_text(json.dumps(dict(text, id="u", source="hs:2")) + "\n")
    (tmp_path / "drift_dev_ok.jsonl").write_text(json.dumps(dict(text, id="u", source="hs:2", text="other")) + "\n")

    def ev(dev_file, dev_drift):
        return from_dict({"evaluate": {
            "benchmarks": [{"name": "g", "path": str(tmp_path / "gate.jsonl"), "role": "general"}],
            "drift": {"path": str(tmp_path / "drift.jsonl")},
            "dev": {"benchmarks": [{"name": "domain", "path": str(tmp_path / dev_file), "role": "domain"}],
                    "drift": {"path": str(tmp_path / dev_drift)}}}}).evaluate

    with pytest.raises(TemperingError, match="item d1 is gate item g:q1"):
        check_dev_disjoint(ev("dev.jsonl", "drift_dev_ok.jsonl"))
    with pytest.raises(TemperingError, match="text u is also a gate drift text"):
        check_dev_disjoint(ev("dev_ok.jsonl", "drift_dev.jsonl"))
    with pytest.raises(TemperingError, match="also a gate benchmark"):
        check_dev_disjoint(ev("gate.jsonl", "drift_dev_ok.jsonl"))
    good = ev("dev_ok.jsonl", "drift_dev_ok.jsonl")
    check_dev_disjoint(good)
    # Training data is decontaminated against the dev split too.
    sets, _ = decontamination_sets(good)
    assert {"g", "drift", "dev_domain", "dev_drift"} <= set(sets)
    assert sets["dev_domain"][0]["question"] == "another one?"


def test_dev_benchmarks_are_local_domain_files():
    with pytest.raises(TemperingError, match="evaluate.dev.benchmarks"):
        from_dict({"evaluate": {"dev": {"benchmarks": [{"name": "x", "path": "x.jsonl", "role": "general"}]}}})
