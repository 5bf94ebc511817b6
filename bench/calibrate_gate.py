"""A/A calibration of the gate, its noise floor, and a sabotage ladder on real per-item records.

    .venv/bin/python bench/calibrate_gate.py --model models/export --base models/base \
        --seeds 20 --json bench/results-gate.json

With the default bundle of ``params.yaml`` (the same item counts ``evaluate`` plans):

1. **A/A.** The base judged against itself, and the candidate scored twice (two independent
   scorings, at batch sizes ``evaluate.batch_size`` and about half of it, so padding and bf16
   rounding differ) and judged against itself, each with ``--seeds`` gate seeds and both paired
   tests. Counted: rejections in the no-forgetting and champion families (the gain check is
   expected to fail: A is not better than A). The design requires 0.
2. **Noise floor.** Per benchmark, the largest |delta| and the discordant share between the two
   scorings; the drift statistics of a model against itself. Printed next to the default run's
   drift (``metrics/evaluate.json``, when present).
3. **Sabotage ladder.** From the base's real per-item results on each general benchmark: a
   candidate that loses 2, 5, 8, 12 and 20 points (with 3% of items won back, so the discordance is
   realistic), judged at the planned n; the gate's decision per row next to the design's
   prediction (the normal lower bound at the family's Holm level).

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
    out = {"runs": 0, "rejections": 0, "rejected_checks": [], "gain_failures": 0}
    for seed in range(seeds):
        for test in ("bootstrap", "mcnemar"):
            cfg = gate.model_copy(update={"seed": seed, "test": test})
            verdict = decide(record, dict(samples, drift=drift), cfg)
            out["runs"] += 1
            bad = [c for c in verdict.checks if c.kind != "gain" and not c.passed]
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
        # The design: a certified non-inferiority needs the normal lower bound at the family's
        # worst-case (Bonferroni) level to clear -budget, and n powered for the budget.
        se = math.sqrt(max(check.discordance - check.delta ** 2, 0.0) / n)
        lower = check.delta - stats.z(1 - alpha / family) * se
        rows.append({"benchmark": name, "n": n, "drop": drop, "delta": check.delta, "discordance": check.discordance,
                     "ci": check.ci, "p_value": check.p_value, "mde": check.mde, "powered": check.powered,
                     "design_certifies": bool(lower >= -budget and check.powered), "gate_passed": check.passed,
                     "reason": check.reason})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/export")
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--evaluation", default="metrics/evaluate.json", help="the default run's record (drift)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None, help="cap items per benchmark (smoke runs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from tasks.evaluate import bundle, drift_records, drift_summary, drift_texts, load_model, score_all
    from tempering import backend, env
    from tempering.config import load_params

    env.setup(offline=True)
    backend.setup_torch()
    started = time.time()
    params = load_params(args.params, [f"evaluate.limit={args.limit}"] if args.limit else [])
    cfg, gate = params.evaluate, params.gate
    cfg = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"n": 0})})
    info = bundle(cfg, gate)
    roles = {name: spec.role for name, spec in info["specs"].items()}
    texts = drift_texts(cfg)
    result: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "seeds": args.seeds,
                    "bundle_hash": info["hash"], "n": {k: v["n"] for k, v in info["benchmarks"].items()},
                    "load_start": os.getloadavg()}

    pairs = {}
    for label, folder in (("base", args.base), ("candidate", args.model)):
        model, tok = load_model(Path(folder))
        t0 = time.time()
        first = score_all(model, tok, info, cfg)["mc"]
        if label == "base":
            second = first  # the base against itself: the same per-item results
        else:
            half = cfg.model_copy(update={"batch_size": max(1, cfg.batch_size // 2 + 1)})
            second = score_all(model, tok, info, half)["mc"]
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
    for row in result["ladder"]:
        print(f"  {row['benchmark']:>14} n={row['n']} drop {row['drop']:.2f}: delta {row['delta']:+.3f} "
              f"disc {row['discordance']:.3f} -> gate {'certified' if row['gate_passed'] else 'REFUSED'}, "
              f"design {'certifies' if row['design_certifies'] else 'refuses'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
