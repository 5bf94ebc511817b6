"""The gate is a pure function: a table of cases, paired statistics, and the stage's outputs."""

from __future__ import annotations

import json
import random

import pytest

from tasks.gate import bootstrap_ci, decide, load_samples, mcnemar_ci, paired, to_markdown
from tempering.config import GateParams


def bench(role: str, base: float, cand: float, n: int = 100, production: float | None = None) -> dict:
    out = {"role": role, "n": n, "base": {"acc": base, "acc_norm": base}, "candidate": {"acc": cand, "acc_norm": cand}}
    if production is not None:
        out["production"] = {"acc": production, "acc_norm": production}
    return out


POINT = GateParams(test="none", min_domain_gain=0.10, max_forgetting={"default": 0.05, "arith": 0.20},
                   min_gain_vs_production=None)

# (name, benchmarks, passed, failed check kinds)
CASES = [
    ("gain and no forgetting", {"domain": bench("domain", 0.30, 0.80), "gk": bench("general", 0.9, 0.9)}, True, []),
    ("gain exactly the minimum", {"domain": bench("domain", 0.30, 0.40)}, True, []),
    ("gain too small", {"domain": bench("domain", 0.30, 0.35), "gk": bench("general", 0.9, 0.9)}, False, ["gain"]),
    ("domain got worse", {"domain": bench("domain", 0.50, 0.40)}, False, ["gain"]),
    ("forgot beyond default budget", {"domain": bench("domain", 0.3, 0.9), "gk": bench("general", 0.9, 0.8)}, False,
     ["forgetting"]),
    ("drop exactly the budget", {"domain": bench("domain", 0.3, 0.9), "gk": bench("general", 0.90, 0.85)}, True, []),
    ("named budget is looser", {"domain": bench("domain", 0.3, 0.9), "arith": bench("general", 0.9, 0.75)}, True, []),
    ("named budget still broken", {"domain": bench("domain", 0.3, 0.9), "arith": bench("general", 0.9, 0.6)}, False,
     ["forgetting"]),
    ("general improved", {"domain": bench("domain", 0.3, 0.9), "gk": bench("general", 0.6, 0.9)}, True, []),
    ("both broken", {"domain": bench("domain", 0.3, 0.3), "gk": bench("general", 0.9, 0.5)}, False,
     ["forgetting", "gain"]),
    ("two domains, one short", {"d1": bench("domain", 0.3, 0.9), "d2": bench("domain", 0.3, 0.32)}, False, ["gain"]),
]


@pytest.mark.parametrize("name,benchmarks,passed,failed", CASES, ids=[c[0] for c in CASES])
def test_point_decisions(name, benchmarks, passed, failed):
    verdict = decide({"benchmarks": benchmarks}, None, POINT)
    assert verdict.passed is passed
    assert sorted(c.kind for c in verdict.checks if not c.passed) == sorted(failed)
    assert len(verdict.reasons) == len(failed)
    # Every threshold is reported, passed or not, with its value and delta.
    assert len(verdict.checks) == len(benchmarks)
    for check in verdict.checks:
        b = benchmarks[check.benchmark]
        assert check.delta == pytest.approx(b["candidate"]["acc"] - b["base"]["acc"])
        assert check.benchmark in check.reason


def test_no_domain_benchmark_never_passes():
    verdict = decide({"benchmarks": {"gk": bench("general", 0.9, 0.9)}}, None, POINT)
    assert not verdict.passed
    assert any("no domain benchmark" in r for r in verdict.reasons)


def test_missing_budget_and_scores_are_reasons_not_crashes():
    cfg = GateParams(test="none", max_forgetting={"gk": 0.1})
    record = {"benchmarks": {"domain": bench("domain", 0.2, 0.9), "other": bench("general", 0.9, 0.9),
                             "broken": {"role": "domain", "n": 3, "candidate": {"acc": 0.5}}}}
    verdict = decide(record, None, cfg)
    assert not verdict.passed
    assert any("other: no forgetting budget" in r for r in verdict.reasons)
    assert any("broken: no acc" in r for r in verdict.reasons)


def test_champion_challenger():
    cfg = GateParams(test="none", min_gain_vs_production=0.0)
    better = {"domain": bench("domain", 0.3, 0.9, production=0.8)}
    worse = {"domain": bench("domain", 0.3, 0.7, production=0.8)}
    assert decide({"benchmarks": better}, None, cfg).passed
    v = decide({"benchmarks": worse}, None, cfg)
    assert not v.passed and [c.kind for c in v.checks if not c.passed] == ["champion"]
    # No production model scored (first promotion): no champion check at all.
    first = decide({"benchmarks": {"domain": bench("domain", 0.3, 0.9)}}, None, cfg)
    assert first.passed and {c.kind for c in first.checks} == {"gain"}


# ----------------------------------------------------------------------------- paired statistics


def items(correct: list[int]) -> list[dict]:
    return [{"doc_id": i, "acc": float(c), "acc_norm": float(c)} for i, c in enumerate(correct)]


def sampled_record(per_model: dict[str, dict[str, list[int]]], roles: dict[str, str]) -> tuple[dict, dict]:
    samples = {m: {b: items(v) for b, v in bs.items()} for m, bs in per_model.items()}
    benchmarks = {}
    for b, role in roles.items():
        entry = {"role": role, "n": len(per_model["candidate"][b])}
        for m in per_model:
            acc = sum(per_model[m][b]) / len(per_model[m][b])
            entry[m] = {"acc": acc, "acc_norm": acc}
        benchmarks[b] = entry
    return {"benchmarks": benchmarks}, samples


def test_pairing_uses_shared_items_only():
    xs, ys = paired(items([1, 0, 1]), [{"doc_id": 2, "acc": 0.0}, {"doc_id": 0, "acc": 1.0}], "acc")
    assert xs == [1.0, 1.0] and ys == [1.0, 0.0]


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = random.Random(0)
    small = [rng.choice([-1, 0, 0, 1, 1]) for _ in range(50)]
    large = small * 16
    lo_s, hi_s = bootstrap_ci(small, 0.95, 2000, 0)
    lo_l, hi_l = bootstrap_ci(large, 0.95, 2000, 0)
    mean = sum(small) / len(small)
    assert lo_s < mean < hi_s and lo_l < mean < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 2
    assert bootstrap_ci([0, 0, 0], 0.95, 500, 0) == (0.0, 0.0)


def test_mcnemar_interval_and_p_value():
    # candidate right on 30 items the reference missed, wrong on 5 it got: clearly better.
    xs = [1] * 30 + [0] * 5 + [1] * 40 + [0] * 25
    ys = [0] * 30 + [1] * 5 + [1] * 40 + [0] * 25
    (lo, hi), p = mcnemar_ci(xs, ys, 0.95)
    assert lo > 0 and hi > lo and p < 0.001
    (lo0, hi0), p0 = mcnemar_ci(ys, ys, 0.95)
    assert (lo0, hi0) == (0.0, 0.0) and p0 == 1.0


@pytest.mark.parametrize("test", ["bootstrap", "mcnemar"])
def test_same_model_scored_twice_is_never_rejected(test):
    """Identical per-item results: every forgetting and champion check passes at any noise level."""
    rng = random.Random(1)
    cfg = GateParams(test=test, min_domain_gain=0.0, min_gain_vs_production=0.0, max_forgetting={"default": 0.0})
    for _ in range(5):
        gk = [rng.randint(0, 1) for _ in range(40)]
        dom = [rng.randint(0, 1) for _ in range(40)]
        record, samples = sampled_record(
            {"candidate": {"gk": gk, "domain": dom}, "base": {"gk": gk, "domain": dom},
             "production": {"gk": gk, "domain": dom}}, {"gk": "general", "domain": "domain"})
        verdict = decide(record, samples, cfg)
        assert verdict.passed, verdict.reasons
        assert {c.kind for c in verdict.checks} == {"gain", "forgetting", "champion"}


def test_noise_sized_drop_passes_with_an_interval_but_fails_on_points():
    # 60 items, candidate loses 4 and wins 1 relative to the base: a 0.05 drop, budget 0.02.
    base = [1] * 50 + [0] * 10
    cand = [0] * 4 + [1] * 46 + [1] + [0] * 9
    dom_b, dom_c = [0] * 30 + [1] * 30, [1] * 60
    record, samples = sampled_record({"candidate": {"gk": cand, "domain": dom_c}, "base": {"gk": base, "domain": dom_b}},
                                     {"gk": "general", "domain": "domain"})
    budget = {"default": 0.02}
    point = decide(record, samples, GateParams(test="none", max_forgetting=budget))
    boot = decide(record, samples, GateParams(test="bootstrap", max_forgetting=budget))
    mcn = decide(record, samples, GateParams(test="mcnemar", max_forgetting=budget))
    assert not point.passed and "over the budget" in point.reasons[0]
    assert boot.passed and mcn.passed
    gk = next(c for c in boot.checks if c.benchmark == "gk")
    assert gk.ci[0] < -0.02 < gk.ci[1]


def test_a_real_drop_fails_even_with_an_interval():
    base = [1] * 90 + [0] * 10
    cand = [0] * 40 + [1] * 50 + [0] * 10          # forgot 40 of 90
    record, samples = sampled_record(
        {"candidate": {"gk": cand, "domain": [1] * 100}, "base": {"gk": base, "domain": [0] * 50 + [1] * 50}},
        {"gk": "general", "domain": "domain"})
    for test in ("bootstrap", "mcnemar"):
        verdict = decide(record, samples, GateParams(test=test))
        assert not verdict.passed
        failed = [c for c in verdict.checks if not c.passed]
        assert [c.kind for c in failed] == ["forgetting"]
        assert "gk: forgetting: dropped 0.400" in failed[0].reason


def test_gain_must_be_measurably_above_zero():
    # +0.15 observed on 20 items (5 wins, 2 losses): the interval reaches 0, so not promoted.
    base = [0] * 5 + [1] * 2 + [1] * 6 + [0] * 7
    cand = [1] * 5 + [0] * 2 + [1] * 6 + [0] * 7
    record, samples = sampled_record({"candidate": {"d": cand}, "base": {"d": base}}, {"d": "domain"})
    verdict = decide(record, samples, GateParams(test="bootstrap", min_domain_gain=0.10))
    assert not verdict.passed
    assert "not measurably above 0" in verdict.reasons[0]
    assert decide(record, None, GateParams(test="none", min_domain_gain=0.10)).passed


def test_stage_writes_metrics_and_report(tmp_path):
    from tasks.gate import run
    from tempering.config import from_dict

    record, samples = sampled_record({"candidate": {"gk": [1, 1, 0, 1] * 10, "domain": [1] * 40},
                                      "base": {"gk": [1, 1, 0, 1] * 10, "domain": [0] * 40}},
                                     {"gk": "general", "domain": "domain"})
    (tmp_path / "evaluate.json").write_text(json.dumps(record))
    for model, per in samples.items():
        (tmp_path / "samples" / model).mkdir(parents=True)
        for b, rows in per.items():
            (tmp_path / "samples" / model / f"{b}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert set(load_samples(tmp_path / "samples")) == {"candidate", "base"}
    params = from_dict({})
    out = run(params, evaluation=str(tmp_path / "evaluate.json"), samples=str(tmp_path / "samples"),
              report=str(tmp_path / "gate.md"), metrics=str(tmp_path / "gate.json"))
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert out["passed"] is gate["passed"] is True
    assert gate["n_checks"] == 2 and gate["n_failed"] == 0
    assert all(c["ci"] is not None for c in gate["checks"])
    md = (tmp_path / "gate.md").read_text()
    assert md.startswith("# Gate: PASSED") and "| gk | forgetting |" in md


def test_markdown_lists_every_failed_reason():
    verdict = decide({"benchmarks": CASES[9][1]}, None, POINT)
    md = to_markdown(verdict)
    assert md.startswith("# Gate: FAILED")
    for reason in verdict.reasons:
        assert reason in md
