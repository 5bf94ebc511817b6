"""Stage ``cpt``: optional continued pre-training on the clean raw-text corpus.

    python -m tasks.cpt --base models/base --data data/clean --out models/cpt \
        --checkpoints checkpoints/cpt --metrics metrics/cpt.json

``cpt.enabled: false`` (default): the base model passes through. ``--out`` gets a ``pointer.json``
(``{"model": "<base, relative to --out>"}``) and ``meta.json``, no weights; readers follow it
with ``tempering.io.resolve_model_dir``.

``cpt.enabled: true``: LoRA (or full) training on ``text.jsonl`` packed into ``cpt.block_size``
token blocks (EOS between documents, loss on every token), then the adapter is merged (in
float32) and ``--out`` gets a full HF folder (weights in ``cpt.dtype``, tokenizer, chat template)
plus ``meta.json``. Checkpoints and resume work as in ``tasks.sft``. ``--live`` (optional) writes
dvclive curves.

``cpt.replay: {share, source, seed}`` mixes general text into training against forgetting, with
the same function as ``sft.replay`` (``tempering.mixing.mix_replay``): every non-replay row, plus
replay rows (the clean text rows whose ``source`` is ``cpt.replay.source``) making up ``share`` of
the rows, a seeded choice when there are more. By default the replay rows are the base model's
own free-running samples (the ``replay`` stage's ``text.jsonl``, generated only when CPT is
enabled with a share above 0). ``share: 0`` leaves them out. The mix (rows wanted, used, the
share reached and its share of the characters) is in ``--metrics`` and ``meta.json``
(``data.replay``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tempering import TemperingError
from tempering.cli import stage_main
from tempering.config import Params
from tempering.io import (POINTER_FILE, atomic_path, content_id, hash_path, read_json, read_jsonl,
                          resolve_model_dir, write_json, write_meta)
from tempering.mixing import mix_replay
from tempering.records import TrainRecord, validated

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ("cpt", "tracking", "train")


def _base_meta(base_dir: Path) -> dict:
    """The base model's own provenance, carried forward so export can name the original source."""
    meta = base_dir / "meta.json"
    if not meta.exists():
        return {}
    raw = read_json(meta)
    return {k: raw[k] for k in ("stage", "source", "n_params", "params", "git_sha", "finished_at") if k in raw}


def _pass_through(params: Params, base: str, base_dir: Path, out: str, checkpoints: str, metrics: str,
                  started: float, base_hash: str) -> dict:
    from tempering.train.checkpoints import fingerprint, prepare_checkpoints

    # Old checkpoints of an enabled run are stale now: the fingerprint differs, so they go.
    prepare_checkpoints(checkpoints, fingerprint(params.cpt, base=base_hash))
    target = os.path.relpath(Path(base).resolve(), Path(out).resolve())
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_json(tmp / POINTER_FILE, {"model": Path(target).as_posix()})
    write_meta(out, stage="cpt", params=params.cpt, inputs={"base": base_hash}, started=started,
               extra={"enabled": False, "pointer": Path(target).as_posix(), "base_model": str(base),
                      "base_meta": _base_meta(base_dir)})
    summary = {"enabled": False, "steps": 0, "pointer": Path(target).as_posix(),
               "wall_time_s": round(time.time() - started, 2)}
    write_json(metrics, validated(TrainRecord, summary, metrics))
    return {"out": out, **summary}


def run(params: Params, base: str, data: str, out: str, checkpoints: str, metrics: str,
        live: str | None = None) -> dict:
    started = time.time()
    cfg = params.cpt
    base_dir = resolve_model_dir(base)
    if not (base_dir / "config.json").exists():
        raise TemperingError(f"{base}: base model folder not found (run the base_model stage)")
    base_hash = hash_path(base_dir)
    if not cfg.enabled:
        return _pass_through(params, base, base_dir, out, checkpoints, metrics, started, base_hash)

    import torch

    from tempering.train.checkpoints import checkpoint_step, fingerprint, prepare_checkpoints
    from tempering.train.data import load_tokenizer, pack_text, split_eval
    from tempering.train.loop import train
    from tempering.train.models import apply_adapter, load_model, merged_float32, snapshot_trainable, use_attention
    from tempering.train.precision import choose_precision, quiet_transformers, setup_torch
    from tempering.train.sft import build_sft_trainer, sft_config

    data_file = Path(data) / "text.jsonl"
    rows, replay_stats = mix_replay(read_jsonl(data_file), cfg.replay)
    if not rows:
        raise TemperingError(f"{data_file}: cpt.enabled is true but there are no text rows to train on"
                             + (f" (only replay rows of {cfg.replay.source}, which are mixed into other text)"
                                if replay_stats["available"] else ""))
    # The rows trained on, not just the file: the replay mix changes them (resume fingerprint).
    data_hash = content_id({"file": hash_path(data_file), "ids": [r["id"] for r in rows]})
    fp = fingerprint(cfg, stage_file=__file__, data=data_hash, base=base_hash)
    resume = prepare_checkpoints(checkpoints, fp)

    threads = setup_torch()
    quiet_transformers()
    precision = choose_precision(cfg.precision)
    tokenizer = load_tokenizer(base_dir)
    dataset, data_stats = pack_text(rows, tokenizer, cfg.block_size, source=str(data_file))
    train_set, eval_set = split_eval(dataset, cfg.eval_share, cfg.seed)
    data_stats.update({"train_blocks": len(train_set), "eval_blocks": len(eval_set) if eval_set else 0,
                       "replay": replay_stats})
    model = load_model(base_dir, method=cfg.adapter.method, precision=precision, section="cpt",
                       frozen=cfg.adapter.frozen_dtype)
    attention = use_attention(model, cfg.attention, precision.device, cfg.block_size)
    model = apply_adapter(model, cfg.adapter, seed=cfg.seed)
    before = snapshot_trainable(model)
    args = sft_config(cfg, params.tracking, output_dir=checkpoints,
                      precision=precision, run_name="cpt", max_length=cfg.block_size)
    resume_step = checkpoint_step(resume)
    trainer = build_sft_trainer(model, tokenizer, train_set, args, stage="cpt",
                                checkpoints=checkpoints, live_dir=live,
                                tracking=params.tracking, resume_step=resume_step,
                                eval_dataset=eval_set, cfg=cfg)
    summary = train(trainer, resume, before)

    # Merge in float32 (the frozen base may be stored in bf16 while training:
    # see tempering.train.models.frozen_dtype).
    merged = merged_float32(trainer.model, base_dir)
    merged = merged.to(getattr(torch, cfg.dtype))
    merged.config.dtype = cfg.dtype
    merged.config.use_cache = True
    with atomic_path(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    summary.update({"enabled": True, "precision": precision.name, "device": precision.device, "attention": attention,
                    "threads": threads, "data": data_stats, "method": cfg.adapter.method,
                    "wall_time_s": round(time.time() - started, 2)})
    curve = summary.pop("loss_curve")
    eval_curve = summary.pop("eval_loss_curve", None)
    write_meta(out, stage="cpt", params=cfg, inputs={"base": base_hash, "data": data_hash},
               started=started, extra={"enabled": True, "base_model": str(base), "train": summary,
                                       "loss_curve": curve, "eval_loss_curve": eval_curve, "fingerprint": fp,
                                       "base_meta": _base_meta(base_dir)})
    write_json(metrics, validated(TrainRecord, summary, metrics))
    return {"out": out, **{k: summary[k] for k in ("enabled", "steps", "train_loss_first", "train_loss_last",
                                                   "tokens_per_s", "weights_changed", "resumed_from")}}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="models/base", help="base model folder")
    parser.add_argument("--data", default="data/clean", help="folder holding text.jsonl")
    parser.add_argument("--out", default="models/cpt", help="output model folder (or pointer)")
    parser.add_argument("--checkpoints", default="checkpoints/cpt", help="resumable checkpoints")
    parser.add_argument("--metrics", default="metrics/cpt.json")
    parser.add_argument("--live", default=None, help="dvclive folder for loss curves (optional)")


def main(argv=None) -> int:
    return stage_main("cpt", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
