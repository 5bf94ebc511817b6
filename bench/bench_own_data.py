"""A user's own SFT data and no domain benchmark, configured in params.yaml alone, on the real
SmolLM2: the held-out SFT rows are the domain check (``dedup.sft_heldout``, the gate's
``heldout_nll``).

    .venv/bin/python bench/bench_own_data.py --workspace /tmp/own \
        [--data ../shared/data/sft/code_alpaca_2k.json.gz] [--json bench/results-own-data.json]
    .venv/bin/python bench/bench_own_data.py --workspace /tmp/own --collect-only   # an existing run

``--workspace`` must be a fresh clone of the project (its ``.venv`` linked or built). The script
copies ``--data`` (an alpaca-format file) into ``data/own/``, rewrites ``params.yaml`` the way a
user would (:func:`configure`: the file as the only SFT source besides the replay stage's rows;
no ``role: domain`` benchmark in ``evaluate.benchmarks`` or ``evaluate.dev``; no preference data,
so ``dpo.enabled: false``; one SFT epoch), commits, runs ``dvc repro`` (timed, machine load
before and after), and collects what the held-out check saw: ``metrics/dedup.json``
``sft_heldout``, ``metrics/evaluate.json`` ``sft_heldout`` and drift, and every gate check.
Nothing is extrapolated: each figure is the run's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TEMPERING_SHARED_DATA") or ROOT.parent / "shared" / "data")
DEFAULT_DATA = SHARED / "sft" / "code_alpaca_2k.json.gz"


def configure(root: Path, data: Path) -> dict:
    """params.yaml for own SFT data without a domain benchmark (what the README tells a user)."""
    (root / "data" / "own").mkdir(parents=True, exist_ok=True)
    shutil.copy(data, root / "data" / "own" / data.name)
    p = yaml.safe_load((root / "params.yaml").read_text())
    replay = [s for s in p["validate"]["sources"] if s["path"].startswith("data/replay/")]
    p["validate"]["sources"] = [{"path": f"data/own/{data.name}", "kind": "sft", "format": "alpaca"}] + replay
    ev = p["evaluate"]
    ev["benchmarks"] = [b for b in ev["benchmarks"] if b["role"] != "domain"]
    ev["dev"]["benchmarks"] = []
    ev["generation"]["benchmarks"] = []
    p["dpo"]["enabled"] = False
    p["sft"]["epochs"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return p


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def collect(root: Path) -> dict:
    dedup = _read(root / "metrics/dedup.json") or {}
    ev = _read(root / "metrics/evaluate.json") or {}
    gate = _read(root / "metrics/gate.json") or {}
    export = _read(root / "metrics/export.json") or {}
    sft = _read(root / "metrics/sft.json") or {}
    held = dict(ev.get("sft_heldout") or {})
    examples = held.pop("examples", [])
    return {"dedup_sft_heldout": dedup.get("sft_heldout"), "evaluate_sft_heldout": held, "examples": examples,
            "drift": ev.get("drift"), "benchmarks": {k: {"base": v["base"]["acc"], "candidate": v["candidate"]["acc"],
                                                         "n": v["n"]} for k, v in (ev.get("benchmarks") or {}).items()},
            "gate": {"passed": gate.get("passed"), "reasons": gate.get("reasons"),
                     "checks": [{k: c.get(k) for k in ("benchmark", "kind", "threshold", "candidate", "reference",
                                                       "delta", "ci", "n", "passed", "reason")}
                                for c in gate.get("checks") or []]},
            "export": {"alpha": (export.get("interpolation") or {}).get("chosen"),
                       "reason": (export.get("interpolation") or {}).get("reason")},
            "sft": {k: sft.get(k) for k in ("steps", "wall_time_s", "train_loss_first", "train_loss_last")},
            "stage_s": {name: (_read(root / f"metrics/{name}.json") or {}).get("wall_time_s")
                        for name in ("validate", "dedup", "sft", "export", "evaluate")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, required=True, help="a fresh clone of the project")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an alpaca-format SFT file")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results-own-data.json")
    ap.add_argument("--collect-only", action="store_true", help="read an existing run in --workspace")
    args = ap.parse_args(argv)
    root = args.workspace.resolve()
    record: dict = {"data": str(args.data.name)}
    if not args.collect_only:
        if not args.data.exists():
            raise SystemExit(f"{args.data}: not found (real public SFT rows; ../shared/data/README.md)")
        configure(root, args.data)
        ident = ["-c", "user.email=bench@tempering", "-c", "user.name=bench"]
        subprocess.run(["git", *ident, "commit", "-qam", f"own data: {args.data.name}"], cwd=root, check=True)
        env = dict(os.environ, CI="true", DVC_NO_ANALYTICS="1", WANDB_MODE="offline",
                   PATH=f"{root / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        load0, t0 = os.getloadavg(), time.time()
        proc = subprocess.run([str(root / ".venv" / "bin" / "dvc"), "repro"], cwd=root, env=env)
        record.update(seconds=round(time.time() - t0, 1), load=[load0, os.getloadavg()], rc=proc.returncode)
        if proc.returncode != 0:
            raise SystemExit(f"dvc repro failed ({proc.returncode}) in {root}")
    record.update(collect(root))
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    h, g = record["evaluate_sft_heldout"], record["gate"]
    print(f"held out {h.get('rows')} rows: answer NLL base {h.get('nll_base')} -> candidate {h.get('nll_candidate')} "
          f"(gain {h.get('nll_gain')}); gate passed={g['passed']}")
    for c in g["checks"]:
        print(f"- {'PASS' if c['passed'] else 'FAIL'}: {c['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
