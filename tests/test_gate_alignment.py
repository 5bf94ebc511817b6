"""The gate's alignment check: on the dpo stage's held-out preference pairs, the exported candidate
is non-inferior to the SFT model in preference accuracy (paired by pair, a tie counts half), in
its own multiplicity family, with the power rule; missing evidence is a refusal, a candidate DPO
never trained is not applicable."""

from __future__ import annotations

import json
import math
import random

import pytest

from tasks.gate import ALIGNMENT_FILE, ALIGNMENT_NAME, decide, load_samples, to_markdown
from tempering import stats
from tempering.config import GateParams, ParamsError, from_dict

from test_gate import BASIC, _ok_record

MARGIN = dict(BASIC, alignment_margin=0.05)


def pairs(sft: list[float], cand: list[float]) -> list[dict]:
    """evaluate's per-pair rows (eval/samples/alignment.jsonl) from margins."""
    return [{"id": f"p{i}", "source": f"preference.jsonl:{i + 1}", "candidate": {"chosen": c - 1.0, "rejected": -1.0},
             "candidate_margin": c, "sft_margin": s, "base_margin": -s, "dpo_margin": s + 0.1, "tokens_match": True}
            for i, (s, c) in enumerate(zip(sft, cand))]


def with_alignment(rows: list[dict] | None, **info):
    """The ok benchmark record (gain + forgetting certified) plus held-out pairs."""
    record, samples = _ok_record()
    entry = {"applicable": True, "pairs": len(rows or []), "problem": None}
    entry.update(info)
    record["alignment"] = entry
    if rows is not None:
        samples = dict(samples, alignment=rows)
    return record, samples


def sft_margins(n: int, right: float = 0.9, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.5, 3.0) if rng.random() < right else -rng.uniform(0.5, 3.0) for _ in range(n)]


def flip(margins: list[float], lose: int, win: int, seed: int = 1) -> list[float]:
    """The candidate: ``lose`` pairs the SFT model got right now wrong, ``win`` wrong ones right."""
    rng = random.Random(seed)
    out = list(margins)
    right = [i for i, m in enumerate(margins) if m > 0]
    wrong = [i for i, m in enumerate(margins) if m < 0]
    for i in rng.sample(right, lose) + rng.sample(wrong, win):
        out[i] = -out[i]
    return out


def alignment_check(verdict):
    found = [c for c in verdict.checks if c.kind == "alignment"]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.mark.parametrize("test", ["bootstrap", "mcnemar"])
def test_a_candidate_that_keeps_the_sft_preferences_passes(test):
    sft = sft_margins(400)
    record, samples = with_alignment(pairs(sft, flip(sft, lose=4, win=3)))
    v = decide(record, samples, GateParams(**MARGIN, test=test))
    assert v.passed, v.reasons
    c = alignment_check(v)
    assert c.benchmark == ALIGNMENT_NAME and c.family == "alignment" and c.passed and c.powered is True
    assert c.n == 400 and c.delta == pytest.approx(-1 / 400)
    assert c.reference == pytest.approx(sum(m > 0 for m in sft) / 400)
    assert c.ci[0] >= -0.05 and c.mde <= 0.05
    assert c.reason.startswith(f"{ALIGNMENT_NAME}: alignment: certified non-inferior") and "vs SFT" in c.reason


def test_a_candidate_that_lost_the_sft_preferences_fails():
    sft = sft_margins(400)
    record, samples = with_alignment(pairs(sft, flip(sft, lose=48, win=4)))  # -0.11
    v = decide(record, samples, GateParams(**MARGIN))
    c = alignment_check(v)
    assert not v.passed and [x.kind for x in v.checks if not x.passed] == ["alignment"]
    assert c.delta == pytest.approx(-0.11) and c.ci[0] < -0.05 and c.powered is True
    assert "not certified" in c.reason and "margin 0.050 is not ruled out" in c.reason
    assert c.reason in v.reasons


def test_too_few_pairs_are_refused_as_underpowered_never_passed():
    """19 pairs (the default run's held-out count) cannot certify 0.05: refused even when the
    candidate prefers exactly what the SFT model prefers on every pair."""
    sft = sft_margins(19)
    record, samples = with_alignment(pairs(sft, sft))
    v = decide(record, samples, GateParams(**MARGIN))
    c = alignment_check(v)
    mde = stats.min_detectable(19, 0.10, 0.025, 0.8)
    assert c.delta == 0.0 and c.p_value == 0.0  # the test alone would certify it ...
    assert c.powered is False and not c.passed and not v.passed  # ... the power rule does not
    assert c.mde == pytest.approx(mde)
    assert c.reason.startswith(f"{ALIGNMENT_NAME}: 19 held-out pairs can certify drops of {mde:.2f} or more; "
                               "margin 0.050 (alignment: underpowered")
    # The count the margin needs does certify it.
    n = stats.required_items(0.05, 0.10, 0.025, 0.8)
    sft = sft_margins(n)
    record, samples = with_alignment(pairs(sft, sft))
    assert decide(record, samples, GateParams(**MARGIN)).passed
    md = to_markdown(v)
    assert "| heldout_pairs | alignment |" in md and "19 held-out preference pairs only" in md


def test_a_tie_counts_half():
    sft = [1.0] * 300 + [-1.0] * 100
    cand = [0.0] * 300 + [-1.0] * 100  # no preference left on the pairs SFT got right
    record, samples = with_alignment(pairs(sft, cand))
    c = alignment_check(decide(record, samples, GateParams(**MARGIN)))
    assert c.candidate == pytest.approx(0.375) and c.reference == pytest.approx(0.75)
    assert c.delta == pytest.approx(-0.375) and not c.passed


def test_alignment_is_its_own_family():
    """Holm over the alignment family alone (one check): its adjusted p is its p, whatever the
    no-forgetting family holds."""
    sft = sft_margins(400)
    record, samples = with_alignment(pairs(sft, flip(sft, lose=12, win=6)))
    v = decide(record, samples, GateParams(**MARGIN))
    c = alignment_check(v)
    assert c.p_adjusted == pytest.approx(c.p_value) and c.p_value is not None
    assert {x.family for x in v.checks} == {"gain", "no-forgetting", "alignment"}


@pytest.mark.parametrize("case, words", [
    ("no entry", "no held-out preference evidence"),
    ("problem", "dpo.heldout_share is 0.0: no preference pairs were held out"),
    ("no rows", "eval/samples/alignment.jsonl) are missing"),
    ("empty", "no held-out pairs were scored"),
    ("nan", "a margin is not finite"),
    ("no field", "has no usable sft_margin"),
    ("repeated", "ids are missing or repeated"),
    ("count", "the record says 41 held-out pairs but 40 were scored"),
    ("tokens", "the margins do not pair"),
])
def test_missing_or_broken_evidence_when_dpo_trained_is_refused(case, words):
    sft = sft_margins(40)
    rows = pairs(sft, sft)
    if case == "no entry":
        record, samples = _ok_record()
    elif case == "problem":
        record, samples = with_alignment(None, pairs=0,
                                         problem="dpo.heldout_share is 0.0: no preference pairs were held out")
    elif case == "no rows":
        record, samples = with_alignment(None, pairs=40)
    elif case == "empty":
        record, samples = with_alignment([])
    else:
        if case == "nan":
            rows[3]["candidate_margin"] = float("nan")
        elif case == "no field":
            del rows[5]["sft_margin"]
        elif case == "repeated":
            rows[2]["id"] = rows[1]["id"]
        elif case == "tokens":
            rows[7]["tokens_match"] = False
        record, samples = with_alignment(rows, **({"pairs": 41} if case == "count" else {}))
    v = decide(record, samples, GateParams(**dict(MARGIN, alignment_margin=0.3)))  # 40 pairs certify 0.3
    c = alignment_check(v)
    assert not v.passed and c is not None and not c.passed and c.p_value is None
    assert words in c.reason and c.reason.startswith(f"{ALIGNMENT_NAME}: alignment: not certified: ")
    assert [r for r in v.reasons] == [c.reason]  # the benchmark checks still pass


def test_40_clean_pairs_certify_a_wide_margin():
    """The same 40 pairs as above, intact, pass at a margin they can certify (the refusals above
    are about the evidence, not the count)."""
    sft = sft_margins(40)
    record, samples = with_alignment(pairs(sft, sft))
    v = decide(record, samples, GateParams(**dict(MARGIN, alignment_margin=0.3)))
    assert v.passed, v.reasons


@pytest.mark.parametrize("margin", [0.05, None])
def test_no_dpo_training_is_not_applicable_and_says_so(margin):
    record, samples = _ok_record()
    record["alignment"] = {"applicable": False, "reason": "dpo.enabled is false: the SFT model passed through untrained"}
    v = decide(record, samples, GateParams(**dict(BASIC, alignment_margin=margin)))
    assert v.passed, v.reasons
    assert alignment_check(v) is None
    assert v.not_checked == (f"{ALIGNMENT_NAME} (alignment): not applicable: dpo.enabled is false: the SFT model "
                             "passed through untrained; the candidate makes no alignment claim",)
    assert any(line.startswith("No alignment claim is checked: DPO did not train") for line in v.certifies)
    md = to_markdown(v)
    assert "## Not checked" in md and "the candidate makes no alignment claim" in md


def test_a_null_margin_measures_but_does_not_check():
    sft = sft_margins(40)
    record, samples = with_alignment(pairs(sft, [-m for m in sft]))  # would fail every pair
    v = decide(record, samples, GateParams(**BASIC))  # alignment_margin defaults to null
    assert v.passed and alignment_check(v) is None
    assert v.not_checked == (f"{ALIGNMENT_NAME} (alignment): 40 held-out preference pairs measured, not checked "
                             "(gate.alignment_margin is null)",)
    # ... and a record without any alignment entry (older evaluate runs) says nothing at all
    record, samples = _ok_record()
    assert decide(record, samples, GateParams(**BASIC)).not_checked == ()


def test_the_stage_reads_the_per_pair_file(tmp_path):
    from tasks.gate import run

    sft = sft_margins(400)
    record, samples = with_alignment(pairs(sft, flip(sft, lose=4, win=3)))
    (tmp_path / "evaluate.json").write_text(json.dumps(record))
    for model in ("candidate", "base"):
        (tmp_path / "samples" / model).mkdir(parents=True)
        for b, rows in samples[model].items():
            (tmp_path / "samples" / model / f"{b}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "samples" / ALIGNMENT_FILE).write_text("".join(json.dumps(r) + "\n" for r in samples["alignment"]))
    assert set(load_samples(tmp_path / "samples")) == {"candidate", "base", "alignment"}
    params = from_dict({"gate": dict(MARGIN)})
    out = run(params, evaluation=str(tmp_path / "evaluate.json"), samples=str(tmp_path / "samples"),
              report=str(tmp_path / "gate.md"), metrics=str(tmp_path / "gate.json"))
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert out["passed"] is True and gate["n_checks"] == 3
    c = next(c for c in gate["checks"] if c["kind"] == "alignment")
    assert c["family"] == "alignment" and c["n"] == 400 and math.isfinite(c["p_adjusted"])
    assert "| heldout_pairs | alignment |" in (tmp_path / "gate.md").read_text()
    # Without the per-pair file the same record is refused.
    (tmp_path / "samples" / ALIGNMENT_FILE).unlink()
    out = run(params, evaluation=str(tmp_path / "evaluate.json"), samples=str(tmp_path / "samples"),
              report=str(tmp_path / "gate.md"), metrics=str(tmp_path / "gate.json"))
    assert out["passed"] is False and any("alignment.jsonl) are missing" in r for r in out["reasons"])


@pytest.mark.parametrize("value", [0, -0.1, 1.5])
def test_a_bad_margin_names_the_key(value):
    with pytest.raises(ParamsError, match=r"gate.alignment_margin"):
        from_dict({"gate": {"alignment_margin": value}})


def test_the_project_checks_alignment():
    from pathlib import Path

    from tempering.config import load_params

    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml").gate.alignment_margin == 0.05


def test_the_html_report_lists_the_alignment_check(tmp_path):
    """The report's check listing: the alignment check's row, its dot and interval on the delta
    chart with the threshold at minus the margin, and the not-applicable line when there is one."""
    import html
    import re

    from tempering import charts, html_report

    from test_html_report import _section, make_run

    root = make_run(tmp_path)
    gate = json.loads((root / "metrics/gate.json").read_text())
    reason = "heldout_pairs: alignment: certified non-inferior: delta +0.000, lower end -0.031 >= -0.050"
    gate["checks"].append({"benchmark": ALIGNMENT_NAME, "kind": "alignment", "threshold": 0.05, "candidate": 0.95,
                           "reference": 0.95, "delta": 0.0, "ci": [-0.031, 0.031], "n": 400, "passed": True,
                           "reason": reason, "p_value": 0.001, "family": "alignment"})
    gate["not_checked"] = [f"{ALIGNMENT_NAME} (alignment): not applicable: dpo.enabled is false"]
    (root / "metrics/gate.json").write_text(json.dumps(gate))
    section = _section(html_report.render(root, generated_at="T"), "gate")
    assert f"{ALIGNMENT_NAME} · alignment" in section and html.escape(reason, quote=False) in section
    assert section.count('class="delta pass"') == 4
    assert "not applicable: dpo.enabled is false" in section
    assert charts.threshold_line("alignment", 0.05) == -0.05
    assert re.search(r"<title>threshold 0\.050</title>", section)
