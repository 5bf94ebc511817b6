"""A model's scores on the full shipped benchmarks (every item of each file in benchmarks/).

    .venv/bin/python bench/base_scores.py --model models/base --json bench/results-base-scores.json

The benchmarks are the general entries of ``evaluate.benchmarks`` in ``params.yaml`` with their
limits lifted (all items, drift-text items included), scored exactly as the evaluate stage scores
them (lm-eval's prompts, ``evaluate.backend``, ``evaluate.precision``). Prints acc and acc_norm
with a 95% Wilson interval per benchmark, and the time it took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tempering.stats import wilson  # noqa: E402  (the report's interval, one owner)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names (default: every general one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from tempering.scorecard import bundle, load_model, multiple_choice
    from tempering import env
    from tempering.train.precision import setup_torch
    from tempering.config import load_params

    env.setup(offline=True)
    setup_torch()
    params = load_params(args.params)
    cfg = params.evaluate
    specs = tuple(s.model_copy(update={"limit": None}) for s in cfg.benchmarks
                  if s.role == "general" and (args.only is None or s.name in args.only))
    cfg = cfg.model_copy(update={"benchmarks": specs, "limit": None,
                                 "drift": cfg.drift.model_copy(update={"path": None})})
    info = bundle(cfg, params.gate)
    model, tok = load_model(Path(args.model))
    started = time.time()
    scores = multiple_choice(model, tok, info, cfg)
    wall = time.time() - started
    out = {"model": args.model, "backend": cfg.backend, "precision": cfg.precision, "wall_s": round(wall, 1),
           "load": os.getloadavg(), "benchmarks": {}}
    print(f"{'benchmark':>14} {'n':>6} {'acc':>6} {'95% interval':>16} {'acc_norm':>9}")
    for name, res in scores.items():
        lo, hi = wilson(res["acc"], res["n"])
        out["benchmarks"][name] = {"n": res["n"], "acc": res["acc"], "acc_norm": res["acc_norm"], "acc_ci": [lo, hi]}
        print(f"{name:>14} {res['n']:>6} {res['acc']:>6.3f} [{lo:.3f}, {hi:.3f}] {res['acc_norm']:>9.3f}")
    print(f"scored in {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
