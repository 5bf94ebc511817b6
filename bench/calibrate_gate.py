"""A/A calibration of the gate, its noise floor, and a sabotage ladder on real per-item records.

    .venv/bin/python bench/calibrate_gate.py --model models/export --base models/base \
        --seeds 20 --json bench/results-gate.json

With the default bundle of ``params.yaml`` (the same item counts ``evaluate`` plans):

1. **A/A.** The base judged against itself, and the candidate scored twice (the evaluate stage's
   scoring, from its cache when the run left one, and a fresh one at about half the batch size /
   batch tokens, so batches, padding and bf16 rounding differ) and judged against itself, each with ``--seeds`` gate seeds and both paired
   tests. Counted: rejections in the no-forgetting and champion families (the gain check is
   expected to fail: A is not better than A). The design requires 0.
2. **Noise floor.** Per benchmark, the largest |delta| and the discordant share between the two
   scorings; the drift statistics of a model against itself. Printed next to the default run's
   drift (``metrics/evaluate.json``, when present).
3. **Sabotage ladder.** From the base's real per-item results on each general benchmark: a
   candidate that loses 2, 5, 8, 12 and 20 points (with 3% of items won back, so the discordance is
   realistic), judged alone at the planned n; the gate's decision per row next to the design's
   prediction (the normal lower bound at 0.025, the level of a check judged alone or last in its
   Holm family; and at 0.025 / family, the first in it).

``--limit N`` caps every benchmark (smoke runs; the ladder then speaks for N items only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LADDER = (0.02, 0.05, 0.08, 0.12, 0.20)


def _record(per_model: dict[str, dict[str, list[dict]]], roles: dict[str, str]) -> tuple[dict, dict]:
    benchmarks = {}
    for name, role in roles.items():
        entry = {"role": role, "n": len(per_model["candidate"][name])}
        for who, per in per_model.items():
            rows = per[name]
            acc = sum(r["acc"] for r in rows) / len(rows)
            entry[who] = {"acc": acc, "acc_norm": sum(r["acc_norm"] for r in rows) / len(rows)}
        benchmarks[name] = entry
    return {"benchmarks": benchmarks, "models": {w: {"hash": w} for w in per_model}}, per_model


def judge_aa(mc_a: dict, mc_b: dict, roles: dict, drift: list[dict], gate, seeds: int) -> dict:
    """Rejections of A (``mc_a``) judged against A' (``mc_b``) as base and as production."""
    from tasks.gate import decide

    per = {"candidate": {n: mc_a[n]["samples"] for n in roles}, "base": {n: mc_b[n]["samples"] for n in roles},
           "production": {n: mc_b[n]["samples"] for n in roles}}
    record, samples = _record(per, roles)
    out = {"runs": 0, "rejections": 0, "rejected_checks": [], "gain_failures": 0, "underpowered": 0}
    for seed in range(seeds):
        for test in ("bootstrap", "mcnemar"):
            # The A/A records hold benchmark items only (no held-out preference pairs).
            cfg = gate.model_copy(update={"seed": seed, "test": test, "alignment_margin": None})
            verdict = decide(record, dict(samples, drift=drift), cfg)
            out["runs"] += 1
            # Rejections by noise; a check refused because its n cannot certify the budget is a
            # design fact (counted apart: none at the planned n), not a noise rejection.
            bad = [c for c in verdict.checks if c.kind != "gain" and not c.passed and c.powered is not False]
            out["underpowered"] += sum(1 for c in verdict.checks if c.powered is False)
            out["rejections"] += len(bad)
            out["rejected_checks"] += [c.reason for c in bad][:3]
            out["gain_failures"] += sum(1 for c in verdict.checks if c.kind == "gain" and not c.passed)
    return out


def noise_floor(mc_a: dict, mc_b: dict, roles: dict) -> dict:
    out = {}
    for name in roles:
        a = {r["doc_id"]: r["acc"] for r in mc_a[name]["samples"]}
        b = {r["doc_id"]: r["acc"] for r in mc_b[name]["samples"]}
        both = sorted(set(a) & set(b))
        disc = sum(1 for i in both if a[i] != b[i]) / max(1, len(both))
        out[name] = {"n": len(both), "delta": (sum(a[i] for i in both) - sum(b[i] for i in both)) / max(1, len(both)),
                     "discordance": disc}
    return out


def ladder(base_rows: list[dict], name: str, gate, family: int) -> list[dict]:
    """A graded sabotage ladder on real per-item results of the base."""
    from tasks.gate import decide
    from tempering import stats

    n = len(base_rows)
    base = [int(r["acc"]) for r in base_rows]
    right = [i for i, v in enumerate(base) if v]
    wrong = [i for i, v in enumerate(base) if not v]
    alpha = stats.one_sided_alpha(gate.confidence)
    budget = gate.max_forgetting.get(name, gate.max_forgetting.get("default"))
    rows = []
    for drop in LADDER:
        rng = random.Random(int(drop * 1000))
        win = min(len(wrong), round(0.03 * n))
        lose = min(len(right), win + round(drop * n))
        cand = list(base)
        for i in rng.sample(right, lose):
            cand[i] = 0
        for i in rng.sample(wrong, win):
            cand[i] = 1
        c_rows = [{"doc_id": r["doc_id"], "acc": float(v), "acc_norm": float(v)} for r, v in zip(base_rows, cand)]
        b_rows = [{"doc_id": r["doc_id"], "acc": float(v), "acc_norm": float(v)} for r, v in zip(base_rows, base)]
        record, samples = _record({"candidate": {name: c_rows}, "base": {name: b_rows}}, {name: "general"})
        cfg = gate.model_copy(update={"max_kl": None, "max_perplexity_ratio": None})
        check = next(c for c in decide(record, samples, cfg).checks if c.kind == "forgetting")
        # The design: certified when the normal lower bound clears -budget (and n is powered for
        # the budget). Judged alone (as here), or as the last of its Holm family with every other
        # check certified, the level is alpha; as the first of the family it is alpha / family.
        se = math.sqrt(max(check.discordance - check.delta ** 2, 0.0) / n)

        def certifies(level: float) -> bool:
            return bool(check.delta - stats.z(1 - level) * se >= -budget and check.powered)

        rows.append({"benchmark": name, "n": n, "drop": drop, "delta": check.delta, "discordance": check.discordance,
                     "ci": check.ci, "p_value": check.p_value, "mde": check.mde, "powered": check.powered,
                     "design_certifies": certifies(alpha), "design_certifies_first_in_family": certifies(alpha / family),
                     "gate_passed": check.passed, "reason": check.reason})
    return rows


def _print_ladder(rows: list[dict]) -> None:
    print("| benchmark | drop | n | delta | discordant | 95% interval | p | design (alone / last in family) "
          "| design (first in family) | gate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['drop']:.2f} | {r['n']} | {r['delta']:+.3f} | {r['discordance']:.3f} "
              f"| [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['p_value']:.2g} "
              f"| {'certifies' if r['design_certifies'] else 'refuses'} "
              f"| {'certifies' if r['design_certifies_first_in_family'] else 'refuses'} "
              f"| {'certified' if r['gate_passed'] else 'REFUSED'} |")


def _ladder_only(args) -> int:
    from tempering.config import load_params
    from tempering import stats

    params = load_params(args.params)
    gate = params.gate
    general = [s for s in params.evaluate.benchmarks if s.role == "general"]
    family = len(general) + sum(x is not None for x in (gate.max_kl, gate.max_perplexity_ratio))
    budget = gate.max_forgetting.get(args.ladder_name, gate.max_forgetting.get("default"))
    n = stats.required_items(budget, gate.planning_discordance,
                             stats.planning_alpha(gate.confidence, gate.multiplicity, family), gate.power)
    records = [json.loads(line) for line in Path(args.ladder_only).read_text().splitlines() if line.strip()]
    if len(records) < n:
        raise SystemExit(f"{args.ladder_only}: {len(records)} records, the planned n is {n}")
    rows = ladder(records[:n], args.ladder_name, gate, family)
    _print_ladder(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"ladder": rows, "family": family}, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/export")
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--evaluation", default="metrics/evaluate.json", help="the default run's record (drift)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None, help="cap items per benchmark (smoke runs)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-rescore", action="store_true",
                        help="judge each model against its cached scoring only (no fresh second scoring)")
    parser.add_argument("--ladder-only", default=None, metavar="RECORDS.jsonl",
                        help="only the sabotage ladder, from these per-item records of the base "
                             "(e.g. tests/data/base_arc_easy.jsonl), at the default bundle's planned n")
    parser.add_argument("--ladder-name", default="arc_easy", help="the benchmark those records are of")
    args = parser.parse_args(argv)
    if args.ladder_only:
        return _ladder_only(args)

    from tasks.evaluate import cached_scores
    from tempering.benchmarks import drift_texts
    from tempering.scorecard import bundle, drift_records, drift_summary, load_model, multiple_choice
    from tempering import env
    from tempering.train.precision import setup_torch
    from tempering.config import load_params
    from tempering.io import hash_path

    env.setup(offline=True)
    setup_torch()
    started = time.time()
    params = load_params(args.params, [f"evaluate.limit={args.limit}"] if args.limit else [])
    cfg, gate = params.evaluate, params.gate
    info = bundle(cfg, gate)
    roles = {name: spec.role for name, spec in info["specs"].items()}
    texts = drift_texts(cfg)
    result: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "seeds": args.seeds,
                    "bundle_hash": info["hash"], "n": {k: v["n"] for k, v in info["benchmarks"].items()},
                    "load_start": os.getloadavg()}

    pairs = {}
    for label, folder in (("base", args.base), ("candidate", args.model)):
        t0 = time.time()
        # The first scoring is the evaluate stage's own (its cache, when the run left one) ...
        first = cached_scores(Path(folder), cfg, info, hash_path(folder))[0]["mc"]
        model, tok = load_model(Path(folder))
        if label == "base" or args.no_rescore:
            second = first  # against itself: the same per-item results
        else:
            # ... the second a fresh one with other batches: other padding, other bf16 rounding.
            other = {"batch_size": max(1, cfg.batch_size // 2 + 1)}
            if hasattr(cfg, "batch_tokens"):
                other["batch_tokens"] = max(64, cfg.batch_tokens // 2 + 64)
            second = multiple_choice(model, tok, info, cfg.model_copy(update=other))
        drift = drift_records(model, model, tok, texts, cfg) if texts else []
        pairs[label] = {"scoring_s": round(time.time() - t0, 1), "noise": noise_floor(first, second, roles),
                        "drift": drift_summary(drift) if drift else {},
                        "aa": judge_aa(first, second, roles, drift, gate, args.seeds)}
        if label == "base":
            base_mc = first
        del model
    result["aa"] = pairs

    general = sorted(n for n, r in roles.items() if r == "general")
    family = len(general) + (sum(x is not None for x in (gate.max_kl, gate.max_perplexity_ratio)) if texts else 0)
    result["ladder"] = [row for name in general for row in ladder(base_mc[name]["samples"], name, gate, family)]
    if Path(args.evaluation).is_file():
        record = json.loads(Path(args.evaluation).read_text())
        result["default_run"] = {"drift": record.get("drift"),
                                 "deltas": {k: (b.get("delta") or {}).get(gate.metric)
                                            for k, b in (record.get("benchmarks") or {}).items()}}
    result["load_end"] = os.getloadavg()
    result["wall_s"] = round(time.time() - started, 1)

    print(f"A/A over {args.seeds} seeds x 2 tests:")
    for label, p in pairs.items():
        print(f"  {label} vs itself: {p['aa']['rejections']} rejections in {p['aa']['runs']} gate runs; "
              f"drift {p['drift']}; noise {p['noise']}")
    print("Sabotage ladder (gate decision vs design):")
    _print_ladder(result["ladder"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
