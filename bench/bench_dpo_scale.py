"""DPO's delta on its own scale: ``merged = base + a * (sft - base) + b * (dpo - sft)``.

    .venv/bin/python bench/bench_dpo_scale.py [--workspace .] [--a 1 0.7 0.5] [--b 1 0.6 0.3 0] \
        [--pairs-every 3] [--json bench/results-dpo-scale.json]

The export stage scales the whole trained delta with one alpha (``export.interpolation``): SFT's
and DPO's parts together. This bench asks whether two scales do better: SFT's delta at ``a``,
DPO's (the DPO policy minus the SFT model) at ``b``. Run it in a workspace whose ``models/`` hold a
finished dpo stage (``models/cpt``, ``models/sft``, ``models/dpo`` with ``heldout.jsonl``). For
every (a, b) it scores, with the export stage's own code and ``params.yaml``'s settings:

- the dev split (``evaluate.dev``): dev domain gain over the base, dev KL and perplexity ratio with
  their upper interval ends, and whether the point is within the gate's limits
  (:func:`tempering.interpolate.dev_point`, exactly as the export sweep scores an alpha);
- every ``--pairs-every``-th held-out preference pair (``models/dpo/heldout.jsonl``): the share
  the model prefers the chosen answer on (:func:`tempering.preference.completion_logps`, bf16
  autocast as the dpo stage scores them), beside the SFT model's and the DPO policy's own.

(a, b) = (1, 1) is the model as trained, (1, 0) the SFT model, (a, a) the export's alpha = a. The
JSON records the git SHA, UTC date, command, the params the numbers depend on, and each point's
seconds; the script prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tempering.io import git_sha, write_json  # noqa: E402


def combine(w0: dict, w1: dict, w2: dict, a: float, b: float) -> dict:
    """``w0 + a * (w1 - w0) + b * (w2 - w1)`` per tensor name (float32)."""
    return {n: w0[n] + a * (w1[n] - w0[n]) + b * (w2[n] - w1[n]) for n in w0}


def preference_accuracy(scores) -> float:
    """The share of pairs whose chosen answer has the higher summed log-probability."""
    return sum(c > r for c, r in scores) / len(scores)


def measure(workspace: Path, a_grid, b_grid, pairs_every: int, log=print) -> dict:
    import torch

    from tasks.export import _adapter_model, _merged
    from tempering import benchmarks, interpolate, preference, scorecard
    from tempering.config import load_params
    from tempering.io import resolve_model_dir
    from tempering.train.data import load_tokenizer
    from tempering.train.models import load_merged
    from tempering.train.precision import Precision, choose_precision, setup_torch

    setup_torch()
    params = load_params(workspace / "params.yaml")
    base_dir = resolve_model_dir(workspace / "models/cpt")
    sft, dpo = workspace / "models/sft", workspace / "models/dpo"
    tok = load_tokenizer(dpo if (dpo / "tokenizer_config.json").exists() else sft)
    model = _merged(_adapter_model(base_dir, sft, dpo)).eval()
    names = dict(model.named_parameters())
    sft_model = load_merged(base_dir, [sft]).eval()
    base_model = load_merged(base_dir, []).eval()
    w0 = {n: p.detach().float().clone() for n, p in base_model.named_parameters() if n in names}
    w1 = {n: p.detach().float().clone() for n, p in sft_model.named_parameters() if n in names}
    w2 = {n: p.detach().float().clone() for n, p in names.items()}
    del sft_model
    ev, gate = params.evaluate, params.gate
    dev_cfg = benchmarks.dev_view(ev)
    dev_info = scorecard.bundle(dev_cfg, gate) if dev_cfg.benchmarks else None
    drift_rows = benchmarks.drift_texts(dev_cfg)
    base_mc = scorecard.multiple_choice(base_model, load_tokenizer(base_dir), dev_info, dev_cfg) if dev_info else {}
    base_lp = scorecard.base_logprobs(base_model, tok, drift_rows, dev_cfg) if drift_rows else None
    rows = preference.read_heldout(dpo / preference.HELDOUT_FILE)[::max(1, pairs_every)]
    precision = choose_precision("auto") if choose_precision("auto").bf16 else Precision("fp32", "cpu", "no bf16")
    stored = {who: preference_accuracy([(r["logp"][who]["chosen"], r["logp"][who]["rejected"]) for r in rows])
              for who in ("base", "sft", "dpo")}
    log(f"{len(rows)} held-out pairs: base {stored['base']:.3f}, SFT {stored['sft']:.3f}, DPO {stored['dpo']:.3f}")
    points = []
    for a in a_grid:
        for b in b_grid:
            t0 = time.time()
            weights = combine(w0, w1, w2, a, b)
            with torch.no_grad():
                for n, p in names.items():
                    p.copy_(weights[n])
            del weights
            pt = interpolate.dev_point(a, model, tok, dev_info, dev_cfg, base_mc, drift_rows, base_lp, gate,
                                       gate.metric, params.export.interpolation.headroom)
            scores = preference.completion_logps(model, tok, rows, max_length=params.dpo.max_length,
                                                 max_prompt_length=params.dpo.max_prompt_length, precision=precision)
            d = pt["drift"] or {}
            rec = {"a": a, "b": b, "dev_domain_gain": pt["domain_gain"], "kl": d.get("kl"),
                   "kl_upper": d.get("kl_upper"), "perplexity_ratio": d.get("perplexity_ratio"),
                   "perplexity_ratio_upper": d.get("perplexity_ratio_upper"), "within_limits": pt["within_limits"],
                   "preference_accuracy": preference_accuracy(scores), "seconds": round(time.time() - t0, 1)}
            points.append(rec)
            log(json.dumps(rec))
    recorded = {k: getattr(params.dpo, k) for k in ("epochs", "learning_rate", "beta", "heldout_share")}
    return {"git_sha": git_sha(workspace), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv), "workspace": str(workspace), "params": {"dpo": recorded,
            "gate.max_kl": gate.max_kl, "gate.max_perplexity_ratio": gate.max_perplexity_ratio},
            "pairs": len(rows), "stored_accuracy": stored, "points": points}


def table(result: dict) -> str:
    lines = ["| a (SFT) | b (DPO) | dev domain gain | dev KL (upper) | dev perplexity ratio (upper) | within limits "
             "| held-out preference accuracy |", "|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['a']:g} | {p['b']:g} | {p['dev_domain_gain']:+.3f} | {p['kl']:.3f} ({p['kl_upper']:.3f}) "
                     f"| {p['perplexity_ratio']:.3f} ({p['perplexity_ratio_upper']:.3f}) "
                     f"| {'yes' if p['within_limits'] else 'no'} | {p['preference_accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=".", help="a workspace with a finished dpo stage")
    parser.add_argument("--a", type=float, nargs="+", default=[1.0, 0.7, 0.5], help="scales of SFT's delta")
    parser.add_argument("--b", type=float, nargs="+", default=[1.0, 0.6, 0.3, 0.0], help="scales of DPO's delta")
    parser.add_argument("--pairs-every", type=int, default=3, help="score every n-th held-out pair")
    parser.add_argument("--json", default="bench/results-dpo-scale.json")
    args = parser.parse_args(argv)
    result = measure(Path(args.workspace).resolve(), args.a, args.b, args.pairs_every)
    write_json(args.json, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
