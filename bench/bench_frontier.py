"""The learn / forget trade-off: replay share crossed with the interpolation grid, as DVC experiments.

    .venv/bin/python bench/bench_frontier.py [--shares 0 0.05 0.2 0.35] [--target export] \
        [--workspace] [--json bench/results-frontier.json]

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

``--workspace`` adds the run already in the workspace (its ``metrics/export.json``, at the share
``params.yaml`` sets) as one more record without re-running it; a share equal to that one is then
not run again. The JSON records where and when it was measured (git SHA, UTC date, the training
params the curves depend on), and the run report plots it (the interpolation section reads
``bench/results-frontier.json``: one curve per share).

``dvc exp run -S`` leaves the last share in ``params.yaml``; the script writes the file back as it
found it when it ends. The workspace's outputs are then the last experiment's: ``dvc checkout``
(or ``dvc exp apply``) brings back whichever run you want.

Everything is timed by the experiment itself (each stage's ``wall_time_s``); nothing is
extrapolated. Machine load (os.getloadavg) is recorded before and after each experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tempering.dag import run_dvc  # noqa: E402
from tempering.io import read_json_or_none  # noqa: E402


_read = read_json_or_none  # the project's one lenient reader


# The params the curves depend on, recorded with the sweep (dotted paths into params.yaml).
RECORDED_PARAMS = ("sft.replay", "sft.epochs", "sft.learning_rate", "dpo.enabled", "dpo.epochs", "dpo.beta",
                   "replay.temperature", "export.interpolation.alphas", "gate.max_kl", "gate.max_perplexity_ratio")


def recorded_params(root: Path) -> dict:
    """The :data:`RECORDED_PARAMS` as ``params.yaml`` in ``root`` sets them (missing ones: None)."""
    params = yaml.safe_load((root / "params.yaml").read_text()) if (root / "params.yaml").exists() else {}
    out = {}
    for dotted in RECORDED_PARAMS:
        value = params
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        out[dotted] = value
    return out


def git_sha(root: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def read_record(share: float, root: Path, target: str) -> dict:
    """One share's record from the workspace's metrics (as the last run left them)."""
    export = _read(root / "metrics/export.json") or {}
    sft = _read(root / "metrics/sft.json") or {}
    if not (export.get("interpolation") or {}).get("points"):
        raise SystemExit(f"{root / 'metrics/export.json'}: no interpolation points (share {share}): "
                         "was export run with export.interpolation on?")
    record = {"share": share, "interpolation": export.get("interpolation"), "export_s": export.get("wall_time_s"),
              "sft": {k: sft.get(k) for k in ("steps", "wall_time_s", "train_loss_last")},
              "sft_replay": (sft.get("data") or {}).get("replay")}
    if target == "evaluate":
        ev = _read(root / "metrics/evaluate.json") or {}
        record["evaluate"] = {"benchmarks": {n: {"delta": b.get("delta")} for n, b in (ev.get("benchmarks") or {}).items()},
                              "drift": ev.get("drift")}
    return record


def one(share: float, target: str, root: Path) -> dict:
    """Run one share as a DVC experiment and read its record back."""
    load0 = os.getloadavg()
    t0 = time.time()
    code, out = run_dvc("exp", "run", target, "-S", f"sft.replay.share={share}", root=root)
    seconds = time.time() - t0
    if code != 0:
        tail = [ln for ln in out.splitlines() if ln.strip()][-5:]
        raise SystemExit(f"dvc exp run (share {share}) failed: " + " | ".join(tail))
    return {**read_record(share, root, target), "source": "experiment", "seconds": round(seconds, 1),
            "load": [load0, os.getloadavg()]}


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
    parser.add_argument("--workspace", action="store_true",
                        help="add the run already in the workspace (at params.yaml's share) without re-running it")
    parser.add_argument("--json", default=None, help="write every record here")
    args = parser.parse_args(argv)
    root = Path(args.root)
    params_file = root / "params.yaml"
    saved = params_file.read_text() if params_file.exists() else None
    header = {"git_sha": git_sha(root), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "bench/bench_frontier.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "params": recorded_params(root)}
    records = []
    shares = list(args.shares)
    if args.workspace:
        current = float((header["params"].get("sft.replay") or {}).get("share", 0.0))
        records.append({**read_record(current, root, args.target), "source": "workspace"})
        shares = [s for s in shares if abs(s - current) > 1e-12]
        print(f"share {current:g}: the workspace's run, kept alpha {records[-1]['interpolation'].get('chosen')}")
    try:
        for share in shares:
            rec = one(share, args.target, root)
            records.append(rec)
            print(f"share {share:g}: {rec['seconds']:.0f} s, kept alpha {(rec['interpolation'] or {}).get('chosen')}",
                  flush=True)
            if args.json:  # after every experiment: a long sweep keeps what it measured
                write_results(Path(args.json), header, records)
    finally:
        if saved is not None and params_file.read_text() != saved:
            params_file.write_text(saved)  # dvc exp run -S left the last share there
    if args.json:
        write_results(Path(args.json), header, records)
    print(table(sorted(records, key=lambda r: r["share"])))
    return 0


def write_results(path: Path, header: dict, records: list[dict]) -> None:
    """The sweep so far, sorted by share (what the report plots), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**header, "records": sorted(records, key=lambda r: r["share"])}, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
