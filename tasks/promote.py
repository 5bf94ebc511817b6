"""Stage ``promote``: register the exported model when the gate passed; otherwise say why not.

    python -m tasks.promote --model models/export --gate metrics/gate.json \
        --evaluation metrics/evaluate.json --samples eval/samples --data data/clean \
        --metrics metrics/promote.json

When ``--gate`` says passed, the model folder is copied into the registry
(``promote.registry``/``promote.model_name``) as a new immutable version holding the model (with
its model card), the metrics, the gate report and the lineage (data hashes, params of every
training stage, git SHA, base and parent model), and the ``promote.alias`` alias moves to it
atomically (the old target becomes ``previous``). A model whose exact weights are already a
version is not copied again: the alias moves to that version.

The verdict must name the model it judged: a verdict whose candidate hash is not the hash of
``--model`` is refused with an error (a stale or foreign verdict never registers a model).

When the gate failed, the registry is not touched and ``--metrics`` records ``promoted: false``
with the gate's reasons: a failed gate is a result, not a crash (exit status 0).

Mirrors (never the source of truth): a W&B model artifact with the same alias when
``tracking.wandb`` is ``online``; a GTO-style git tag when ``promote.git_tag`` is true.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tempering import TemperingError
from tempering.cli import stage_main
from tempering.config import Params
from tempering.io import git_sha, hash_path, read_json, resolve_model_dir, write_json
from tempering.records import PromoteRecord, validated
from tempering.registry import Registry, git_tag, mirror_wandb

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ("promote", "tracking")


def lineage(model_dir: Path, data: str | None, parent: str | None) -> dict:
    """Where the model came from: the stages' meta.json chain, data hashes, git SHA, and the
    production version it replaces (``parent``)."""
    meta = read_json(model_dir / "meta.json") if (model_dir / "meta.json").exists() else {}
    data_hashes = dict(meta.get("data_hashes") or {})
    if data and Path(data).is_dir():
        data_hashes.update({f"clean/{p.name}": hash_path(p) for p in sorted(Path(data).glob("*.jsonl"))})
    return {"git_sha": git_sha(), "data": data_hashes, "parent": parent,
            "base_model": (meta.get("lineage") or {}).get("base_model"),
            "stages": meta.get("lineage"), "export": {k: meta.get(k) for k in ("inputs", "check", "n_params")}}


def run(params: Params, model: str, gate: str, evaluation: str, metrics: str, data: str | None = None,
        samples: str | None = None) -> dict:
    started = time.time()
    cfg = params.promote
    verdict = read_json(gate)
    reg = Registry(cfg.registry, cfg.model_name)
    result = {"promoted": False, "registry": str(Path(cfg.registry) / cfg.model_name), "alias": cfg.alias,
              "version": None, "model_path": None, "gate_passed": bool(verdict.get("passed"))}
    if not verdict.get("passed"):
        result["reasons"] = ["gate failed: " + r for r in verdict.get("reasons") or ["(no reason recorded)"]]
        result["production"] = reg.aliases().get(cfg.alias)
        write_json(metrics, validated(PromoteRecord, result, metrics))
        return {"promoted": False, "reasons": result["reasons"]}

    model_dir = resolve_model_dir(model)
    if not (model_dir / "config.json").exists():
        raise TemperingError(f"{model}: exported model not found (run the export stage)")
    model_hash = hash_path(model_dir)
    judged = (verdict.get("candidate") or {}).get("hash")
    if judged != model_hash:
        raise TemperingError(f"{gate}: the verdict judged candidate {judged or '(no hash recorded)'} but {model} is "
                             f"{model_hash}: refusing to register a model the gate did not judge "
                             "(re-run evaluate and gate: dvc repro)")
    existing = next((v for v in reg.versions() if reg.record(v).get("model_hash") == model_hash), None)
    if existing:
        reg.set_alias(cfg.alias, existing, reason="gate passed (same weights as an existing version)")
        version, reused = existing, True
    else:
        record = {"model_hash": model_hash, "metrics": read_json(evaluation), "gate": verdict,
                  "lineage": lineage(model_dir, data, reg.aliases().get(cfg.alias)), "params": params.model_dump(mode="json", by_alias=True)}
        version = reg.register(model_dir, record, alias=cfg.alias, samples_dir=samples,
                               reason="gate passed")
        reused = False
    mirrors = {}
    if params.tracking.wandb == "online":
        mirrors["wandb"] = mirror_wandb(reg, version, cfg.alias, params.tracking.project)
    if cfg.git_tag:
        mirrors["git_tag"] = git_tag(version, cfg.model_name, cfg.alias)
    result.update({"promoted": True, "version": version, "reused_version": reused,
                   "model_path": str(reg.model_path(version)), "model_hash": model_hash,
                   "aliases": reg.aliases(), "mirrors": mirrors,
                   "wall_time_s": round(time.time() - started, 2)})
    write_json(metrics, validated(PromoteRecord, result, metrics))
    return {"promoted": True, "version": version, "model_path": result["model_path"]}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/export", help="exported model folder")
    parser.add_argument("--gate", default="metrics/gate.json", help="the gate stage's verdict")
    parser.add_argument("--evaluation", default="metrics/evaluate.json")
    parser.add_argument("--samples", default=None, help="per-item results kept with the version")
    parser.add_argument("--data", default=None, help="training data folder (hashed into the lineage)")
    parser.add_argument("--metrics", default="metrics/promote.json")


def main(argv=None) -> int:
    return stage_main("promote", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
