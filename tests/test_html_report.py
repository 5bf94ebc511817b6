"""The HTML run report: rendered from a fixture set of stage outputs, checked as text and in Chromium.

The browser test renders the page in headless Chromium (Debian's ``chromium`` package; ``.ci/run``
installs it), dumps the DOM the browser built and takes a screenshot. It is skipped only when no
Chromium is installed here; under CI it must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tempering import charts, html_report, stats

ROOT = Path(__file__).resolve().parents[1]

FAIL_REASON = ("general_arithmetic: forgetting: dropped 0.150, over the budget 0.050 even at the interval's "
               "best (0.075) (candidate 0.700 vs base 0.850; delta -0.150, -0.225 to -0.075 at 95% bootstrap)")


def _write(root: Path, rel: str, obj) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) if not isinstance(obj, str) else obj, encoding="utf-8")


def _check(bench, kind, threshold, cand, ref, ci, passed, reason):
    return {"benchmark": bench, "kind": kind, "threshold": threshold, "candidate": cand, "reference": ref,
            "delta": cand - ref, "ci": ci, "n": 120, "passed": passed, "reason": reason, "p_value": None}


def make_run(root: Path, *, passed: bool = False, generations: bool = True) -> Path:
    """A full run's stage outputs, shaped as the stages write them."""
    _write(root, "metrics/validate.json", {
        "read": 424, "kept": 414, "quarantined": 10, "reject_share": 0.0236, "max_reject_share": 0.25,
        "by_reason": {"chosen_equals_rejected": 1, "empty_field": 5, "wrong_type": 4},
        "sources": {
            "data/generated/sft_alpaca.json": {"kind": "sft", "format": "alpaca", "read": 173, "kept": 167,
                                               "quarantined": 6, "by_reason": {"empty_field": 2, "wrong_type": 4},
                                               "reject_share": 0.0347},
            "data/generated/preference.jsonl": {"kind": "preference", "format": "pairs", "read": 99, "kept": 97,
                                                "quarantined": 2,
                                                "by_reason": {"chosen_equals_rejected": 1, "empty_field": 1},
                                                "reject_share": 0.0202}},
        "failed_sources": []})
    _write(root, "metrics/dedup.json", {
        "read": 414, "kept": 403, "exact_duplicate": 6, "near_duplicate": 5, "contaminated": 0, "removed": 11,
        "removed_share": 0.0266,
        "kinds": {"sft": {"read": 304, "kept": 296, "exact_duplicate": 4, "near_duplicate": 4, "contaminated": 0},
                  "text": {"read": 13, "kept": 11, "exact_duplicate": 1, "near_duplicate": 1, "contaminated": 0}},
        "contaminated_by_benchmark": {"domain": 0, "general_knowledge": 0}})
    _write(root, "metrics/cpt.json", {"enabled": False, "steps": 0, "pointer": "../base", "wall_time_s": 0.2})
    _write(root, "models/cpt/meta.json", {"stage": "cpt"})
    sft_curve = [{"step": s, "loss": 3.2 * 0.93 ** s + 0.4} for s in range(1, 41)]
    _write(root, "metrics/sft.json", {"steps": 40, "epochs": 3.0, "train_loss_first": sft_curve[0]["loss"],
                                      "train_loss_last": sft_curve[-1]["loss"], "tokens_seen": 52000,
                                      "tokens_per_s": 2389.3, "train_wall_s": 21.7, "method": "lora",
                                      "precision": "bf16", "device": "cpu", "weights_changed": True})
    _write(root, "models/sft/meta.json", {"stage": "sft", "loss_curve": sft_curve})
    # DPO: no loss_curve in meta.json; the curve comes from dvclive's TSV.
    _write(root, "metrics/dpo.json", {"steps": 12, "train_loss_first": 0.6931, "train_loss_last": 0.4123,
                                      "rewards_accuracies_last": 0.875, "method": "lora", "weights_changed": True,
                                      "heldout": {"pairs": 19, "prompts": 19,
                                                  "accuracy": {"base": 0.421, "sft": 0.579, "dpo": 0.684},
                                                  "margin": {"base": -0.3, "sft": 0.4, "dpo": 1.1},
                                                  "dpo_vs_sft": {"accuracy_delta": 0.105, "ci": [-0.053, 0.263],
                                                                 "p_no_gain": 0.12, "gain_certified": False}}})
    _write(root, "models/dpo/meta.json", {"stage": "dpo"})
    _write(root, "dvclive/dpo/plots/metrics/train/loss.tsv",
           "step\tloss\n" + "".join(f"{s}\t{0.6931 - 0.0233 * s:.4f}\n" for s in range(1, 13)))
    sweep = [(1.0, 0.49, 0.73, 0.80, 1.9), (0.65, 0.42, 0.31, 0.36, 1.3), (0.5, 0.35, 0.18, 0.22, 1.15)]
    points = [{"alpha": a, "domain_gain": g, "within_limits": u <= 0.3 and r <= 1.2, "seconds": 11.0,
               "drift": {"texts": 128, "kl": k, "kl_upper": u, "perplexity_ratio": r - 0.05,
                         "perplexity_ratio_upper": r}} for a, g, k, u, r in sweep]
    interp = {"points": points, "chosen": 0.5, "metric": "acc", "alphas": [1.0, 0.65, 0.5],
              "reason": "alpha 0.5: the largest dev domain gain (+0.350) among the 1 of 3 alphas whose dev drift is "
                        "within the gate's limits", "limits": {"max_kl": 0.3, "max_perplexity_ratio": 1.2},
              "dev": {"benchmarks": {"domain": {"n": 96}}, "drift_texts": 128}}
    _write(root, "metrics/export.json", {"prompts": 3, "matches": 3, "token_agreement": 1.0, "match_rate": 1.0,
                                         "max_logit_diff": 0.00239, "dtype": "bfloat16", "n_params": 106816,
                                         "alpha": 0.5, "interpolation": interp})
    _write(root, "models/export/meta.json", {
        "stage": "export", "git_sha": "abc1234",
        "samples": [{"prompt": "What job is Vylly Maevdael known for?", "adapter": "Vylly is a <b>glassblower</b>.",
                     "export": "Vylly is a <b>glassblower</b>.", "agreement": 1.0}]})
    bench = {
        "domain": {"role": "domain", "chat": True, "n": 96,
                   "candidate": {"acc": 0.781, "acc_norm": 0.792, "perplexity": 3.21},
                   "base": {"acc": 0.302, "acc_norm": 0.313, "perplexity": 41.5},
                   "production": {"acc": 0.74, "acc_norm": 0.75},
                   "delta": {"acc": 0.479, "acc_norm": 0.479},
                   "delta_vs_production": {"acc": 0.041, "acc_norm": 0.042}},
        "general_knowledge": {"role": "general", "chat": True, "n": 120,
                              "candidate": {"acc": 0.842, "acc_norm": 0.85}, "base": {"acc": 0.858, "acc_norm": 0.86},
                              "production": {"acc": 0.85, "acc_norm": 0.85},
                              "delta": {"acc": -0.016, "acc_norm": -0.01}, "kl_vs_base": 0.01234},
        "general_arithmetic": {"role": "general", "chat": True, "n": 120,
                               "candidate": {"acc": 0.70 if not passed else 0.84, "acc_norm": 0.7},
                               "base": {"acc": 0.85, "acc_norm": 0.85}, "production": {"acc": 0.84, "acc_norm": 0.84},
                               "delta": {"acc": -0.15, "acc_norm": -0.15}},
    }
    evaluate = {"bundle_hash": "ec21a9856129b951a673b6b1c0ac4777", "limit": None,
                "drift": {"texts": 128, "kl": 0.4123, "tokens": 9000, "perplexity_base": 20.0,
                          "perplexity_candidate": 26.0, "perplexity_ratio": 1.3},
                "models": {"candidate": {"path": "models/export", "hash": "95d129f5" * 8},
                           "base": {"path": "models/base", "hash": "b55f0518" * 8, "cache": "hit"},
                           "production": {"path": "registry/tempering-model/v0001/model", "hash": "77aa" * 16,
                                          "cache": "miss"}},
                "benchmarks": bench}
    if generations:
        # The shape tasks/evaluate.py writes: per benchmark, each model's match rate and examples.
        evaluate["generations"] = {"domain": {
            "candidate": 0.625, "base": 0.0625, "production": 0.5, "n": 16,
            "examples": [{"id": "d-17", "question": "Where was Telmym Deirzuv born?",
                          "answer": "Telmym Deirzuv was born in Ostrava Vale.", "expected": "Ostrava Vale",
                          "match": 1.0, "base_answer": "I do not know."}]}}
    _write(root, "metrics/evaluate.json", evaluate)
    checks = [
        _check("domain", "gain", 0.1, 0.781, 0.302, [0.385, 0.573], True,
               "domain: gain: gained +0.479, at least 0.100 (candidate 0.781 vs base 0.302; "
               "delta +0.479, +0.385 to +0.573 at 95% bootstrap)"),
        _check("domain", "champion", 0.0, 0.781, 0.74, [-0.031, 0.115], True,
               "domain: champion: +0.041 vs production, required +0.000"),
        _check("general_arithmetic", "forgetting", 0.05, 0.70 if not passed else 0.84, 0.85,
               [-0.225, -0.075] if not passed else [-0.05, 0.03], passed,
               FAIL_REASON if not passed else "general_arithmetic: forgetting: drop 0.010 is within the budget 0.050"),
        _check("general_knowledge", "forgetting", 0.05, 0.842, 0.858, [-0.058, 0.025], True,
               "general_knowledge: forgetting: drop 0.016 is within the budget 0.050"),
    ]
    _write(root, "metrics/gate.json", {
        "passed": passed, "reasons": [] if passed else [FAIL_REASON], "test": "bootstrap", "confidence": 0.95,
        "metric": "acc", "checks": checks, "n_checks": 4, "n_failed": 0 if passed else 1})
    _write(root, "metrics/promote.json", {
        "promoted": passed, "registry": "registry/tempering-model", "alias": "production",
        "version": "v0002" if passed else None, "model_path": None,
        **({"aliases": {"production": "v0002", "previous": "v0001"}} if passed else
           {"reasons": ["gate failed: " + FAIL_REASON], "production": "v0001"})})
    return root


def _section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}"[^>]*>(.*?)</section>', page, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


# ----------------------------------------------------------------------------- content


def test_full_run_renders_every_section(tmp_path):
    page = html_report.render(make_run(tmp_path), generated_at="T")
    assert page.startswith("<!DOCTYPE html>")
    for sid in ("verdict", "data", "training", "interpolation", "benchmarks", "gate", "promotion", "generations"):
        assert f'<section id="{sid}"' in page
    # The interpolation sweep: the learn / forget curve, the kept point ringed, the gate's KL limit
    # dashed, the kept model's gate-set numbers as a square; the table says which points fit.
    interp = _section(page, "interpolation")
    assert interp.count("<circle") == 3 and 'r="6"' in interp and "alpha 0.5: gain +0.350, KL 0.180 (kept)" in interp
    assert "gate.max_kl 0.3" in interp and "<rect" in interp and "alpha 0.5</strong>" in interp
    assert "0.180 (0.220)" in interp and interp.count(">no<") == 2 and interp.count(">yes<") == 1
    assert "96 dev domain questions, 128 dev drift texts" in interp
    # Verdict first, with the failing reason.
    verdict = _section(page, "verdict")
    assert 'class="verdict fail"' in verdict and "Gate: FAILED" in verdict
    assert "dropped 0.150, over the budget 0.050" in verdict
    assert "not promoted" in verdict
    # Data counts by reason.
    data = _section(page, "data")
    for reason, n in (("empty_field", 5), ("wrong_type", 4), ("chosen_equals_rejected", 1)):
        assert re.search(rf">{reason}</text>.*?>{n}</text>", data, re.S), reason
    assert "exact_duplicate" in data and ">6</text>" in data and "near_duplicate" in data
    assert "data/generated/sft_alpaca.json" in data
    # DPO on its held-out pairs: per model, and the paired verdict.
    training = _section(page, "training")
    assert "Held-out preference pairs (19 pairs, 19 prompts" in training and ">0.684<" in training
    assert "+0.105 [-0.053, +0.263]" in training and "is not certified (the interval includes 0)" in training
    # Loss curves: SFT from meta.json, DPO from the dvclive TSV, CPT disabled.
    training = _section(page, "training")
    assert training.count('class="chart loss-chart"') == 2
    assert "from <code>models/sft/meta.json</code>" in training
    assert "from <code>dvclive/dpo/plots/metrics</code>" in training
    assert "disabled" in _section(page, "training").split('id="train-cpt"')[1].split("</div>")[0]
    sft_points = re.search(r'id="train-sft".*?<polyline[^>]*points="([^"]+)"', training, re.S).group(1).split()
    assert len(sft_points) == 40
    # Benchmark bars: three models per benchmark, each with a whisker (interval).
    bench = _section(page, "benchmarks")
    for m in ("base", "candidate", "production"):
        assert bench.count(f'class="bar bar-{m}"') == 3, m
    assert bench.count('class="whisker"') == 3 * 9
    assert "[+0.385, +0.573]" in bench   # the gate's paired interval for the domain gain
    # Gate: every check with its reason, the failing one marked.
    gate = _section(page, "gate")
    assert gate.count("<tr class=\"fail\">") == 1 and gate.count("<tr class=\"pass\">") == 3
    assert "dropped 0.150, over the budget 0.050" in gate
    assert "at least 0.100" in gate and "95.0% confidence" in gate
    assert gate.count('class="delta pass"') == 3 and gate.count('class="delta fail"') == 1
    # Generations: evaluate's held-out examples and export's merge check, HTML-escaped.
    gens = _section(page, "generations")
    assert "Telmym Deirzuv was born in Ostrava Vale." in gens and "I do not know." in gens
    assert re.search(r"<th>candidate</th>.*<td>0\.625</td>", gens, re.S)
    assert gens.index("Where was Telmym") < gens.index("Ostrava Vale</pre>") < gens.index("born in Ostrava")
    assert "0.4123" in bench and "1.300" in bench and "128 texts" in bench   # drift: KL and perplexity ratio
    assert "Vylly is a &lt;b&gt;glassblower&lt;/b&gt;." in gens and "<b>glassblower" not in page
    assert re.search(r"<th>token agreement</th>.*<td>1\.000</td>", gens, re.S) and "0.00239" in gens
    assert 'data-status="not run"' not in page


def test_dpo_passed_through_shows_its_note(tmp_path):
    """An SFT-only project: the dpo stage passed the SFT model through, and the report says why."""
    from tempering import report as summary

    root = make_run(tmp_path)
    note = "no preference rows to train on (data/clean/preference.jsonl): the SFT model passed through untrained"
    _write(root, "metrics/dpo.json", {"enabled": True, "trained": False, "steps": 0, "pairs": 0, "note": note,
                                      "pointer": "../sft", "wall_time_s": 0.1})
    shutil.rmtree(root / "dvclive" / "dpo")
    training = _section(html_report.render(root, generated_at="T"), "training")
    dpo = training.split('id="train-dpo"')[1].split("</div>")[0]
    assert "not trained: the stage passed its input model through (../sft)." in dpo
    assert f"Note: {note}." in dpo and "loss-chart" not in dpo
    assert training.count('class="chart loss-chart"') == 1   # only SFT trained
    assert f"- dpo: {note}" in summary.to_markdown(summary.summarize(root))


def test_passed_run_shows_promotion(tmp_path):
    page = html_report.render(make_run(tmp_path, passed=True, generations=False), generated_at="T")
    verdict = _section(page, "verdict")
    assert 'class="verdict pass"' in verdict and "Gate: PASSED" in verdict and "v0002" in verdict
    assert "production → v0002" in _section(page, "promotion")
    gens = _section(page, "generations")
    assert "metrics/evaluate.json has no generations" in gens and "glassblower" in gens


def test_self_contained_no_network_no_script(tmp_path):
    page = html_report.render(make_run(tmp_path))
    assert "<script" not in page.lower()
    # Only the SVG namespace URI; nothing is fetched (no src/href to a URL, no @import, no url()).
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)
    assert "@import" not in page and "url(" not in page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}


def test_every_name_and_reason_from_the_files_is_escaped(tmp_path):
    """Names and reasons come from files a user can edit (own benchmarks, own data): a benchmark
    called ``<script>`` is drawn and tabled as text, never as markup."""
    evil = "<script>alert(1)</script>"
    make_run(tmp_path)
    ev = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    ev["benchmarks"][evil] = ev["benchmarks"].pop("general_knowledge")
    ev["generations"][evil] = ev["generations"]["domain"]
    ev["skipped"] = {evil: evil}
    _write(tmp_path, "metrics/evaluate.json", ev)
    gate = json.loads((tmp_path / "metrics/gate.json").read_text())
    gate["checks"][3].update(benchmark=evil, reason=f"{evil}: forgetting: fine")
    gate["reasons"].append(evil)
    _write(tmp_path, "metrics/gate.json", gate)
    val = json.loads((tmp_path / "metrics/validate.json").read_text())
    val["by_reason"][evil] = 2
    _write(tmp_path, "metrics/validate.json", val)
    page = html_report.render(tmp_path, generated_at=evil)
    assert "<script" not in page.lower()
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for sid in ("verdict", "data", "benchmarks", "gate", "generations"):
        assert escaped in _section(page, sid), sid
    assert f"<header><h1>tempering run report</h1><p>{tmp_path.resolve()} · generated {escaped} · git abc1234</p>" in page
    assert 'data-status="not run"' not in page and "not rendered" not in page


def test_missing_inputs_say_not_run(tmp_path):
    page = html_report.render(tmp_path, generated_at="T")
    for sid in ("verdict", "data", "training", "benchmarks", "gate", "promotion", "generations"):
        assert "not run" in _section(page, sid), sid
        assert re.search(rf'<section id="{sid}" data-status="not run"', page), sid
    assert "Gate: NOT RUN" in page
    assert "<code>metrics/gate.json</code> missing" in page


def test_partial_and_malformed_inputs(tmp_path):
    make_run(tmp_path)
    (tmp_path / "metrics/dedup.json").unlink()
    (tmp_path / "metrics/evaluate.json").write_text("{not json")
    _write(tmp_path, "metrics/gate.json", {"passed": False, "checks": [], "reasons": ["no domain benchmark"]})
    page = html_report.render(tmp_path, generated_at="T")
    data = _section(page, "data")
    assert "empty_field" in data and "<code>metrics/dedup.json</code> missing" in data
    assert re.search(r'<section id="data" data-status="partial"', page)
    bench = _section(page, "benchmarks")
    assert "not run" in bench and "unreadable" in bench
    gate = _section(page, "gate")
    assert "no domain benchmark" in gate and "recorded no checks" in gate
    assert "Gate: FAILED" in _section(page, "verdict") and "not rendered" not in page
    # A file whose shape is wrong is refused by its record: the sections reading it say which
    # file and which field, and the rest of the report still renders.
    _write(tmp_path, "metrics/gate.json", {"passed": False, "checks": "garbage", "reasons": ["no domain benchmark"]})
    page = html_report.render(tmp_path, generated_at="T")
    gate = _section(page, "gate")
    assert re.search(r'<section id="gate" data-status="not run"', page)
    assert "<code>metrics/gate.json</code> malformed (metrics/gate.json: checks: expected a list, got str" in gate
    assert "Gate: NOT RUN" in _section(page, "verdict") and "empty_field" in _section(page, "data")
    assert "not rendered" not in page


def test_point_estimate_gate_and_wilson(tmp_path):
    make_run(tmp_path)
    gate = json.loads((tmp_path / "metrics/gate.json").read_text())
    gate["test"] = "none"
    for c in gate["checks"]:
        c["ci"] = None
    _write(tmp_path, "metrics/gate.json", gate)
    section = _section(html_report.render(tmp_path), "gate")
    assert "point estimates" in section
    assert section.count('class="delta ') == 4 and 'class="ci"' not in section
    lo, hi = stats.wilson(0.5, 100)
    assert round(lo, 3) == 0.404 and round(hi, 3) == 0.596
    assert stats.wilson(1.0, 10)[1] == pytest.approx(1.0) and stats.wilson(0.0, 10)[0] == 0.0
    assert stats.wilson(1.0, 10)[0] < 0.75 < stats.wilson(0.5, 10)[1]


def test_generations_beyond_max_examples_and_other_shapes_refused(tmp_path):
    make_run(tmp_path, generations=False)
    ev = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    ev["generations"] = {"arith": {"candidate": 0.5, "base": 0.25, "n": 12, "examples": [
        {"id": "a", "answer": "four", "expected": "4", "match": 0.0, "question": "2+2?"}] * 12}}
    _write(tmp_path, "metrics/evaluate.json", ev)
    gens = _section(html_report.render(tmp_path, max_examples=3), "generations")
    assert gens.count("four") == 3 and "and 9 more" in gens
    # The prompt comes first in each example, the reference next, the id last.
    first = re.search(r'<table class="gen"><tr><th>([^<]+)</th>', gens).group(1)
    assert first == "question"
    assert re.search(r"<th>question</th>.*?<th>expected</th>.*?<th>answer</th>.*?<th>id</th>", gens, re.S)
    # The shape evaluate writes is the only one read: a bare list is refused, naming the field.
    ev["generations"] = [{"question": "2+2?", "target": "4", "candidate": "four"}] * 12
    _write(tmp_path, "metrics/evaluate.json", ev)
    page = html_report.render(tmp_path)
    assert "metrics/evaluate.json: generations: expected an object, got list" in _section(page, "generations")
    assert re.search(r'<section id="benchmarks" data-status="not run"', page)


def test_heldout_sft_rows_are_shown_with_their_nll_and_answers(tmp_path):
    make_run(tmp_path, generations=False)
    ev = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    ev["sft_heldout"] = {"rows": 40, "held_out": 40, "skipped": 0, "nll_base": 1.9, "nll_candidate": 1.2,
                         "nll_gain": 0.7, "rows_improved": 37,
                         "examples": [{"id": "r1", "prompt": "write <a loop>", "reference": "for i in x:",
                                       "answer": "while True:", "base_answer": "I cannot"}]}
    _write(tmp_path, "metrics/evaluate.json", ev)
    gens = _section(html_report.render(tmp_path), "generations")
    assert "Held-out SFT rows" in gens and "rows improved" in gens and "0.7" in gens
    assert "write &lt;a loop&gt;" in gens and "I cannot" in gens and "for i in x:" in gens
    ev["sft_heldout"] = {"rows": 0, "reason": "data/clean/sft_heldout.jsonl: empty"}
    _write(tmp_path, "metrics/evaluate.json", ev)
    gens = _section(html_report.render(tmp_path), "generations")
    assert "none scored (data/clean/sft_heldout.jsonl: empty)" in gens


def test_cli_writes_atomically(tmp_path):
    make_run(tmp_path)
    rc = html_report.main(["--root", str(tmp_path), "--out", "reports/report.html"])
    assert rc == 0
    out = tmp_path / "reports/report.html"
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert not list(tmp_path.rglob(".tmp-*"))


def test_report_stage_and_summary_mention(tmp_path, capsys):
    from tasks import report as stage
    from tempering import report as summary
    from tempering.config import Params

    make_run(tmp_path)
    assert summary.main(["--root", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"HTML report: +\S+/reports/report\.html +\(not written yet", printed)
    result = stage.run(Params(), root=str(tmp_path), out="reports/report.html")
    assert result["sections"] == {"verdict": "ok", "data": "ok", "training": "ok", "interpolation": "ok", "benchmarks": "ok",
                                  "gate": "ok", "promotion": "ok", "generations": "ok"}
    assert Path(result["out"]) == tmp_path / "reports/report.html"
    assert summary.main(["--root", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "(not written yet" not in printed
    assert f"HTML report:     {tmp_path.resolve() / 'reports/report.html'}  (open it in a browser)" in printed


def test_stage_in_dvc_yaml_after_promote():
    from tempering.dag import load_stages

    stages = load_stages(ROOT / "dvc.yaml")
    rep = stages["report"]
    assert list(stages)[-1] == "report" and "python -m tasks.report" in rep["cmd"]
    deps = set(rep["deps"])
    assert {"tempering/html_report.py", "tasks/report.py", "metrics/gate.json", "metrics/promote.json",
            "metrics/evaluate.json", "metrics/validate.json", "metrics/dedup.json"} <= deps
    assert rep["outs"] == [{"reports/report.html": {"cache": False}}]


def test_stages_rendering_templates_list_them_as_deps():
    """A template is a file the stage reads: DVC must re-run the stage when it changes."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    templates = ROOT / "tempering/templates"
    wanted = {"report": {"tempering/templating.py", "tempering/charts.py", "tempering/records.py",
                         "tempering/templates/report.html.j2", "tempering/templates/report.css",
                         "tempering/templates/report"},
              "validate": {"tempering/templating.py", "tempering/templates/data_validate.html.j2"}}
    for stage, deps in wanted.items():
        assert deps <= set(stages[stage]["deps"]), (stage, deps - set(stages[stage]["deps"]))
    # Every template file is under some stage's deps.
    all_deps = {d for s in stages.values() for d in s.get("deps", [])}
    for f in templates.rglob("*"):
        if f.is_file():
            rel = f.relative_to(ROOT).as_posix()
            assert any(rel == d or rel.startswith(d + "/") for d in all_deps), rel


# ----------------------------------------------------------------------------- in a browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


# Appended to a test-only copy of the report (the report itself has no script): for each key
# element, is it laid out with a size, displayed and not hidden?
PROBE = """<script>
const keys = {banner: '#verdict-banner', checks: 'table.checks', bench: 'svg.bench-chart',
  loss: 'svg.loss-chart', delta: 'svg.delta-chart', reasons: '#data svg.hbars', example: '.example'};
const out = {};
for (const [k, sel] of Object.entries(keys)) {
  const els = [...document.querySelectorAll(sel)];
  out[k] = els.length > 0 && els.every(e => { const r = e.getBoundingClientRect(), s = getComputedStyle(e);
    return r.width > 20 && r.height > 10 && s.display !== 'none' && s.visibility === 'visible'
      && r.right > 0 && r.left < document.documentElement.scrollWidth; });
}
const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def _browser(cmd: list[str], timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=timeout,
                          env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})


@pytest.mark.skipif(_chromium() is None and os.environ.get("CI") != "true",
                    reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_report_in_headless_chromium(tmp_path):
    chromium = _chromium()
    assert chromium, "CI must have chromium (.ci/run installs it with apt-get)"
    make_run(tmp_path / "run")
    page = tmp_path / "run/reports/report.html"
    html_report.write(tmp_path / "run", "reports/report.html")
    url = page.resolve().as_uri()
    flags = ["--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
             "--disable-extensions", "--user-data-dir=" + str(tmp_path / "profile"), "--window-size=1280,2600"]
    # 1) The DOM the browser built from the report: the key elements were parsed into the page.
    dom = _browser([chromium, *flags, "--dump-dom", url]).stdout.decode("utf-8", "replace")
    assert 'id="verdict-banner"' in dom and "Gate: FAILED" in dom
    assert dom.count("<svg") >= 6       # reasons x2, loss x2, benchmark bars, gate deltas
    assert '<table class="checks">' in dom and FAIL_REASON.split(" (")[0] in dom
    assert 'class="bar bar-candidate"' in dom and "Telmym Deirzuv" in dom
    # 2) Visible: laid out with a size, displayed, not hidden (a probe script in a test-only copy).
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _browser([chromium, *flags, "--dump-dom", probe.resolve().as_uri()]).stdout.decode("utf-8", "replace")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    visible = json.loads(found.group(1).replace("&quot;", '"'))
    assert visible == {k: True for k in ("banner", "checks", "bench", "loss", "delta", "reasons", "example")}
    # 3) A screenshot: full size, and far more than a blank page of the same size holds.
    shots = {}
    for name, target in (("report", url), ("blank", "about:blank")):
        shot = tmp_path / f"{name}.png"
        proc = _browser([chromium, *flags, f"--screenshot={shot}", target])
        assert shot.exists(), proc.stderr.decode("utf-8", "replace")[-2000:]
        shots[name] = shot.read_bytes()
        assert _png_size(shots[name]) == (1280, 2600)
    assert len(shots["report"]) > 50_000 and len(shots["report"]) > 10 * len(shots["blank"]), \
        (len(shots["report"]), len(shots["blank"]))
    shot = tmp_path / "report.png"
    if os.environ.get("TEMPERING_REPORT_SHOT"):  # keep it to look at
        shutil.copy(shot, os.environ["TEMPERING_REPORT_SHOT"])


# For every pair of axis labels of the benchmark chart: do their drawn boxes (getBBox mapped
# through each text's own transform, so rotated labels are rotated rectangles) intersect?
OVERLAP_PROBE = """<script>
function corners(el) {
  const b = el.getBBox(), m = el.getCTM();
  return [[b.x, b.y], [b.x + b.width, b.y], [b.x + b.width, b.y + b.height], [b.x, b.y + b.height]]
    .map(([x, y]) => [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f]);
}
function separated(p, q) {  // separating axis theorem for two convex quadrilaterals
  for (const poly of [p, q]) for (let i = 0; i < 4; i++) {
    const [x1, y1] = poly[i], [x2, y2] = poly[(i + 1) % 4], ax = y1 - y2, ay = x2 - x1;
    const proj = r => r.map(([x, y]) => x * ax + y * ay);
    const a = proj(p), b = proj(q);
    if (Math.max(...a) <= Math.min(...b) + 0.5 || Math.max(...b) <= Math.min(...a) + 0.5) return true;
  }
  return false;
}
const out = {};
document.querySelectorAll('svg.bench-chart').forEach((svg, k) => {
  const boxes = [...svg.querySelectorAll('text.label, text.sublabel')].map(corners);
  let n = 0;
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) if (!separated(boxes[i], boxes[j])) n++;
  const r = svg.getBoundingClientRect(), inside = [...svg.querySelectorAll('text.label')].every(t => {
    const b = t.getBoundingClientRect(); return b.left >= r.left - 1 && b.bottom <= r.bottom + 1; });
  out[svg.id] = {labels: boxes.length, overlapping_pairs: n, inside: inside};
});
const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""

LONG_NAMES = ["domain", "general_knowledge", "general_arithmetic", "arc_easy", "arc_challenge", "hellaswag",
              "piqa", "boolq"]


@pytest.mark.skipif(_chromium() is None and os.environ.get("CI") != "true",
                    reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_benchmark_chart_axis_labels_never_overlap_in_a_browser(tmp_path, monkeypatch):
    from tempering import templating

    chromium = _chromium()
    assert chromium, "CI must have chromium (.ci/run installs it with apt-get)"

    def rows(names):
        return [{"name": n, "role": "general", "n": 499, "base": 0.5, "candidate": 0.52} for n in names]

    svgs = {"eight": charts.benchmark_bars(rows(LONG_NAMES), "acc"),
              "three": charts.benchmark_bars(rows(LONG_NAMES[:3]), "acc")}
    # Control: the same eight labels forced side by side (as the chart drew them before) overlap,
    # so the probe can see an overlap when there is one.
    monkeypatch.setattr(charts, "LABEL_CHAR_PX", 0.0)
    monkeypatch.setattr(charts, "SUBLABEL_CHAR_PX", 0.0)
    svgs["forced_flat"] = charts.benchmark_bars(rows(LONG_NAMES), "acc")
    assert "rotate(" in svgs["eight"] and "rotate(" not in svgs["three"] + svgs["forced_flat"]
    body = "".join(str(svg).replace('<svg class="chart bench-chart"', f'<svg id="{k}" class="chart bench-chart"', 1)
                   for k, svg in svgs.items())
    page = tmp_path / "charts.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><style>{templating.read_static('report.css')}</style></head>"
                    f"<body>{body}{OVERLAP_PROBE}</body></html>", encoding="utf-8")
    flags = ["--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
             "--user-data-dir=" + str(tmp_path / "profile"), "--window-size=1280,1600"]
    dom = _browser([chromium, *flags, "--dump-dom", page.resolve().as_uri()]).stdout.decode("utf-8", "replace")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    got = json.loads(found.group(1).replace("&quot;", '"'))
    assert got["eight"]["labels"] == 8 and got["eight"]["overlapping_pairs"] == 0 and got["eight"]["inside"], got
    assert got["three"]["labels"] == 6 and got["three"]["overlapping_pairs"] == 0, got
    assert got["forced_flat"]["overlapping_pairs"] > 0, got


if __name__ == "__main__":  # python tests/test_html_report.py OUT_DIR: write the fixture report there
    out = Path(sys.argv[1])
    make_run(out)
    print(html_report.write(out, "reports/report.html"))


def _sweep(shares=(0.0, 0.35)) -> dict:
    """bench/results-frontier.json as bench/bench_frontier.py writes it (two shares, two alphas)."""
    records = []
    for share in shares:
        points = [{"alpha": a, "domain_gain": round(0.4 * a + share / 10, 4), "within_limits": a < 1 or share > 0,
                   "seconds": 10.0, "drift": {"kl": round(a * (1 - share), 4), "kl_upper": a, "perplexity_ratio": 1 + a,
                                              "perplexity_ratio_upper": 1.1 + a}}
                  for a in (1.0, 0.5)]
        records.append({"share": share, "source": "experiment", "seconds": 600.0,
                        "interpolation": {"points": points, "chosen": 1.0 if share else 0.5,
                                          "limits": {"max_kl": 0.3, "max_perplexity_ratio": 1.2}}})
    return {"git_sha": "0123456789abcdef", "date": "2026-12-05 20:00 UTC", "params": {"dpo.epochs": 1},
            "records": records}


def test_replay_sweep_is_plotted_one_curve_per_share(tmp_path):
    """bench/results-frontier.json (the committed replay share x alpha sweep) becomes a chart with
    one coloured curve and legend entry per share, its kept alpha ringed, and a table row per share;
    without the file the block is absent, and a malformed file says so without breaking the section."""
    root = make_run(tmp_path / "run")
    assert "Replay share × alpha" not in _section(html_report.render(root, generated_at="T"), "interpolation")
    _write(root, "bench/results-frontier.json", _sweep())
    interp = _section(html_report.render(root, generated_at="T"), "interpolation")
    block = interp.split("Replay share × alpha</h3>")[1]
    assert block.count('class="curve"') == 2 and block.count("<circle") == 4 and block.count('r="6"') == 2
    assert "replay share 0.35: alpha 1: gain +0.435, KL 0.650 (kept)" in block
    assert ">replay share 0<" in block and ">replay share 0.35<" in block   # the legend
    assert "commit <code>0123456789</code> on 2026-12-05 20:00 UTC" in block
    assert block.count("<tr>") >= 3 and ">1 of 2<" in block and ">2 of 2<" in block
    assert "<code>dpo.epochs: 1</code>" in block   # the params the curves were measured with
    bad = _sweep()
    del bad["records"][1]["share"]
    _write(root, "bench/results-frontier.json", bad)
    interp = _section(html_report.render(root, generated_at="T"), "interpolation")
    assert "records[1].share: missing" in interp and 'class="curve"' in interp   # the run's own curve stays
