"""The learn / forget trade-off: replay share crossed with the interpolation grid, as DVC experiments.

    .venv/bin/python bench/bench_frontier.py [--shares 0 0.05 0.2 0.35] [--target export] \
        [--json bench/results-frontier.json]

Run it in a clone of the project whose data stages are reproduced (or let the first experiment
reproduce them): for each replay share it runs

    dvc exp run <target> -S sft.replay.share=<share>

(``--target export`` by default: the DAG up to the export stage, whose interpolation sweep scores
every alpha of ``export.interpolation.alphas`` on the dev split; ``--target evaluate`` adds the
gate's own numbers of the kept model, at ~9 more minutes per share). Everything else is
``params.yaml`` as committed. After each experiment the workspace holds its results: the script
reads ``metrics/export.json`` ``interpolation`` (per alpha: dev domain gain, dev KL and perplexity
ratio with their upper bounds) and ``metrics/sft.json`` (steps, the replay rows used), and, with
``--target evaluate``, ``metrics/evaluate.json``. It writes every record to ``--json`` and prints
one markdown table (share x alpha) for BENCHMARKS.md, in the manner of the learn-vs-forget Pareto
plots of Biderman et al. 2024 ("LoRA Learns Less and Forgets Less"). Each experiment is also in
``dvc exp show``.

Everything is timed by the experiment itself (each stage's ``wall_time_s``); nothing is
extrapolated. Machine load (os.getloadavg) is recorded before and after each experiment.
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

from tempering.dag import run_dvc  # noqa: E402
from tempering.io import read_json_or_none  # noqa: E402


_read = read_json_or_none  # the project's one lenient reader


def one(share: float, target: str, root: Path) -> dict:
    load0 = os.getloadavg()
    t0 = time.time()
    code, out = run_dvc("exp", "run", target, "-S", f"sft.replay.share={share}", root=root)
    seconds = time.time() - t0
    if code != 0:
        tail = [ln for ln in out.splitlines() if ln.strip()][-5:]
        raise SystemExit(f"dvc exp run (share {share}) failed: " + " | ".join(tail))
    export = _read(root / "metrics/export.json") or {}
    sft = _read(root / "metrics/sft.json") or {}
    record = {"share": share, "seconds": round(seconds, 1), "load": [load0, os.getloadavg()],
              "interpolation": export.get("interpolation"), "export_s": export.get("wall_time_s"),
              "sft": {k: sft.get(k) for k in ("steps", "wall_time_s", "train_loss_last")},
              "sft_replay": (sft.get("data") or {}).get("replay")}
    if target == "evaluate":
        ev = _read(root / "metrics/evaluate.json") or {}
        record["evaluate"] = {"benchmarks": {n: {"delta": b.get("delta")} for n, b in (ev.get("benchmarks") or {}).items()},
                              "drift": ev.get("drift")}
    return record


def table(records: list[dict]) -> str:
    lines = ["| replay share | alpha | dev domain gain | dev KL (upper) | dev perplexity ratio (upper) | within the gate's limits | kept |",
             "|---|---|---|---|---|---|---|"]
    for rec in records:
        interp = rec.get("interpolation") or {}
        for p in interp.get("points") or []:
            d = p.get("drift") or {}
            lines.append(
                f"| {rec['share']:g} | {p['alpha']:g} | {p['domain_gain']:+.3f} | {d.get('kl', float('nan')):.3f} "
                f"({d.get('kl_upper', float('nan')):.3f}) | {d.get('perplexity_ratio', float('nan')):.3f} "
                f"({d.get('perplexity_ratio_upper', float('nan')):.3f}) | {'yes' if p.get('within_limits') else 'no'} | "
                f"{'**kept**' if p['alpha'] == interp.get('chosen') else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.05, 0.2, 0.35])
    parser.add_argument("--target", default="export", choices=["export", "evaluate"])
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--json", default=None, help="write every record here")
    args = parser.parse_args(argv)
    records = []
    for share in args.shares:
        rec = one(share, args.target, Path(args.root))
        records.append(rec)
        print(f"share {share:g}: {rec['seconds']:.0f} s, kept alpha {(rec['interpolation'] or {}).get('chosen')}",
              flush=True)
        if args.json:  # after every experiment: a long sweep keeps what it measured
            Path(args.json).write_text(json.dumps({"records": records}, indent=1) + "\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
