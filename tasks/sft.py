"""Stage ``sft``: supervised fine-tuning (LoRA by default, or full) on the clean SFT conversations.

    python -m tasks.sft --base models/cpt --data data/clean --out models/sft \
        --checkpoints checkpoints/sft --metrics metrics/sft.json --live dvclive/sft

Every assistant turn is trained and only assistant tokens (with the end-of-turn token) are in the
loss: we render each conversation with the chat template ourselves and locate the assistant spans
(see ``tempering.train.data.tokenize_conversation``); the tokenized set is cached, so a re-run that
only changes e.g. the learning rate does not tokenize again.

``sft.replay`` mixes general rows into training (``tempering.mixing.mix_replay``, shared with
``cpt.replay``): by default the base model's own answers to a general prompt bank (the ``replay``
stage's ``sft.jsonl``), at ``share`` of the rows, so the model rehearses what it already does
while it learns the domain. The mix is recorded in ``--metrics`` and ``meta.json``
(``data.replay``).

``sft.packing`` packs conversations into ``max_length`` blocks (attention kept within each);
``sft.eval_share`` holds out rows for an eval loss at every checkpoint and
``sft.early_stopping_patience`` stops on it (keeping the best checkpoint). ``adapter.method`` may
also be ``prefix`` or ``prompt`` (peft prefix / prompt tuning; not mergeable, so not for dpo/export).

Checkpoints go to ``--checkpoints`` (a DVC ``persist`` output) with a fingerprint of the ``sft``
params, the data and the base model: a re-run after a crash resumes from the last checkpoint when
the fingerprint matches, and starts fresh otherwise. Writes the adapter (peft ``save_pretrained``
plus tokenizer) to ``--out`` atomically, with ``meta.json``; metrics to ``--metrics``; loss curves
to ``--live`` (dvclive, for ``dvc plots show``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tempering import TemperingError
from tempering.cli import stage_main
from tempering.config import Params
from tempering.io import content_id, hash_path, read_jsonl, resolve_model_dir, write_json, write_meta
from tempering.mixing import mix_replay
from tempering.records import TrainRecord, validated

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ("sft", "tracking", "train")


def run(params: Params, base: str, data: str, out: str, checkpoints: str, metrics: str,
        live: str | None = None) -> dict:
    from tempering.train.checkpoints import checkpoint_step, fingerprint, prepare_checkpoints
    from tempering.train.data import load_tokenizer, pack_sft, split_eval, tokenize_sft, tokenizer_hash
    from tempering.train.loop import save_trained, train
    from tempering.train.models import apply_adapter, load_model, snapshot_trainable, use_attention
    from tempering.train.precision import choose_precision, quiet_transformers, setup_torch
    from tempering.train.sft import build_sft_trainer, sft_config

    started = time.time()
    cfg = params.sft
    data_file = Path(data) / "sft.jsonl"
    base_dir = resolve_model_dir(base)
    if not (base_dir / "config.json").exists():
        raise TemperingError(f"{base}: base model folder not found (run the base_model/cpt stages)")
    rows, replay_stats = mix_replay(read_jsonl(data_file), cfg.replay)
    if not rows:
        raise TemperingError(f"{data_file}: no SFT rows to train on")
    # The rows trained on, not just the file: the replay mix changes them (tokenize cache, resume).
    data_hash, base_hash = content_id({"file": hash_path(data_file), "ids": [r["id"] for r in rows]}), \
        hash_path(base_dir)
    fp = fingerprint(cfg, stage_file=__file__, data=data_hash, base=base_hash)
    resume = prepare_checkpoints(checkpoints, fp)

    threads = setup_torch()
    quiet_transformers()
    precision = choose_precision(cfg.precision)
    tokenizer = load_tokenizer(base_dir, cfg.chat_template)
    dataset, data_stats = tokenize_sft(
        rows, tokenizer, max_length=cfg.max_length, data_hash=data_hash,
        tokenizer_id=tokenizer_hash(base_dir), chat_template=cfg.chat_template,
        source=str(data_file))
    train_set, eval_set = split_eval(dataset, cfg.eval_share, cfg.seed)
    data_stats.update({"train_examples": len(train_set), "eval_examples": len(eval_set) if eval_set else 0,
                       "replay": replay_stats})
    if cfg.packing:
        train_set, pack_stats = pack_sft(train_set, cfg.max_length)
        if eval_set is not None:
            eval_set, _ = pack_sft(eval_set, cfg.max_length)
        data_stats["packing"] = pack_stats
    model = load_model(base_dir, method=cfg.adapter.method, precision=precision, section="sft",
                       frozen=cfg.adapter.frozen_dtype)
    attention = use_attention(model, cfg.attention, precision.device, cfg.max_length)
    model = apply_adapter(model, cfg.adapter, seed=cfg.seed)
    before = snapshot_trainable(model)
    args = sft_config(cfg, params.tracking, output_dir=checkpoints,
                      precision=precision, run_name="sft")
    resume_step = checkpoint_step(resume)
    trainer = build_sft_trainer(model, tokenizer, train_set, args, stage="sft",
                                checkpoints=checkpoints, live_dir=live,
                                tracking=params.tracking, resume_step=resume_step,
                                eval_dataset=eval_set, cfg=cfg)
    summary = train(trainer, resume, before)
    save_trained(trainer, tokenizer, out, base=base_hash)

    summary.update({"precision": precision.name, "device": precision.device, "threads": threads, "attention": attention,
                    "data": data_stats, "method": cfg.adapter.method,
                    "wall_time_s": round(time.time() - started, 2)})
    curve = summary.pop("loss_curve")
    eval_curve = summary.pop("eval_loss_curve", None)
    write_meta(out, stage="sft", params=cfg, inputs={"base": base_hash, "data": data_hash},
               started=started, extra={"base_model": str(base), "train": summary, "loss_curve": curve,
                                       "eval_loss_curve": eval_curve, "fingerprint": fp})
    write_json(metrics, validated(TrainRecord, summary, metrics))
    return {"out": out, **{k: summary[k] for k in ("steps", "train_loss_first", "train_loss_last",
                                                   "tokens_per_s", "s_per_step", "weights_changed",
                                                   "resumed_from", "precision")}}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="models/cpt", help="model folder (pointer.json followed)")
    parser.add_argument("--data", default="data/clean", help="folder holding sft.jsonl")
    parser.add_argument("--out", default="models/sft", help="adapter output folder")
    parser.add_argument("--checkpoints", default="checkpoints/sft", help="resumable checkpoints")
    parser.add_argument("--metrics", default="metrics/sft.json")
    parser.add_argument("--live", default=None, help="dvclive folder for loss curves")


def main(argv=None) -> int:
    return stage_main("sft", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
