"""The training loop around a trainer: what every tempering trainer shares, and running it.

Owns :class:`TemperingTrainerMixin` (the overrides the SFT and DPO trainers share: the NaN guard
on every micro-batch loss, length-grouped samplers from our ``length`` column, loading a finished
run instead of training it, and :meth:`~TemperingTrainerMixin.facts`, the session's timing as a
value), :func:`trainer_arguments` (params section -> the ``TrainingArguments`` fields SFT and DPO
share), :func:`train` (resume, metrics every stage reports) and :func:`save_trained`.

transformers only (trl's trainers mix this in, in :mod:`tempering.train.sft` and
:mod:`tempering.train.dpo`); every private transformers method overridden or called here is
pinned by ``tests/test_train_boundaries.py``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tempering.io import atomic_path
from tempering.train.callbacks import GuardCallback, LiveCallback, Timing, setup_wandb
from tempering.train.checkpoints import is_finished
from tempering.train.models import trainable_parameters, weights_changed
from tempering.train.precision import Precision


@dataclass(frozen=True)
class TrainFacts:
    """What a trainer knows about its session beyond ``trainer.state``: where the session
    started and ended (:class:`~tempering.train.callbacks.Timing`) and, for DPO with precomputed
    reference log-probs, the last reference set's ``{"key", "hit", "seconds"}``."""

    timing: Timing
    ref_logps_cache: dict | None = None


class TemperingTrainerMixin:
    """Mixed into TRL's trainers (``class TemperingSFTTrainer(TemperingTrainerMixin, SFTTrainer)``).

    Constructor options (keywords, before the trainer's own): ``stage`` and ``checkpoints`` (for
    the NaN message), ``callbacks`` (the trainer puts its :class:`GuardCallback` first)."""

    def __init__(self, *args, stage: str, checkpoints: str, callbacks=(), **kwargs):
        self.guard = GuardCallback(stage, checkpoints)
        super().__init__(*args, callbacks=[self.guard, *callbacks], **kwargs)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        # global_step counts finished optimizer steps: this micro-batch belongs to the next one.
        self.guard.check_loss(self.state.global_step + 1, float(loss.detach().float().item()))
        return loss

    def _get_train_sampler(self, train_dataset=None):
        # Length grouping from our precomputed "length" column (the Trainer drops unused
        # columns before building the sampler, and DPO rows have no input_ids to infer from).
        full = self.train_dataset
        if (self.args.train_sampling_strategy == "group_by_length" and full is not None
                and "length" in getattr(full, "column_names", ())):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=list(full["length"]))
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        # The same for held-out DPO pairs (eval_share), whose rows have no input_ids either.
        full = self.eval_dataset
        if (self.args.train_sampling_strategy == "group_by_length" and eval_dataset is not None
                and "input_ids" not in getattr(eval_dataset, "column_names", ("input_ids",))
                and full is not None and "length" in getattr(full, "column_names", ())
                and len(full) == len(eval_dataset)):
            import torch
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.eval_batch_size, lengths=list(full["length"]),
                                        generator=torch.Generator().manual_seed(self.args.seed))
        return super()._get_eval_sampler(eval_dataset)

    def restore_finished(self, checkpoint: str | os.PathLike) -> None:
        """Load a finished run's last checkpoint (its best one under ``load_best_model_at_end``)
        and state, as training would have ended."""
        from transformers.trainer_callback import TrainerState

        self.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best and Path(best).exists():
            self._load_from_checkpoint(best)  # what the finished run ended with
        else:
            self._load_from_checkpoint(str(checkpoint))
        self.guard.restored(self.state)
        for cb in self.callback_handler.callbacks:  # curves as training would have written them
            if isinstance(cb, LiveCallback):
                cb.on_train_begin(self.args, self.state, self.control)
                cb.on_train_end(self.args, self.state, self.control)

    def facts(self) -> TrainFacts:
        return TrainFacts(timing=self.guard.timing())


def trainer_arguments(cfg, tracking, *, output_dir: str, precision: Precision, run_name: str, **extra) -> dict:
    """A TrainParams section -> the ``TrainingArguments`` fields ``SFTConfig`` and ``DPOConfig``
    share (``extra`` overrides them); also configures W&B (:func:`setup_wandb`)."""
    report = ["wandb"] if setup_wandb(tracking, run_name) else []
    evaluate = getattr(cfg, "eval_share", 0.0) > 0
    early = evaluate and getattr(cfg, "early_stopping_patience", 0) > 0
    common = dict(
        output_dir=str(output_dir),
        run_name=run_name,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps (transformers 5)
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # never hide a NaN loss behind an average
        # Eval loss on the held-out split at every checkpoint; with early stopping the best
        # checkpoint is kept (save_total_limit never deletes it) and loaded at the end.
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.save_steps if evaluate else None,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        report_to=report,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device == "cpu",
        # TRL defaults to True: the forward runs twice (~1.3-1.5x slower), only worth it for memory.
        gradient_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=0,
        dataloader_pin_memory=precision.device == "cuda",
        train_sampling_strategy="group_by_length",  # similar lengths per batch = little padding
        include_num_input_tokens_seen="non_padding",
        max_length=cfg.max_length,
        pad_to_multiple_of=None,
        push_to_hub=False,
        save_only_model=False,  # optimizer + scheduler + RNG states are needed to resume exactly
        disable_tqdm=_quiet(),
    )
    common.update(extra)
    return common


def _quiet() -> bool:
    """Progress bars off in CI (CI=true) and when TQDM_DISABLE is set."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or bool(os.environ.get("TQDM_DISABLE"))


def train(trainer, resume_from: Path | None, before: dict) -> dict:
    """Run training (resuming when given a checkpoint); return the metrics every stage reports.
    ``trainer`` is a :class:`TemperingTrainerMixin` trainer; its :meth:`~TemperingTrainerMixin.facts`
    say where this session started (and, for DPO, what the reference cache did)."""
    started = time.time()
    if resume_from is not None and is_finished(resume_from):
        # The run already reached its last step (the stage died after training, or DVC re-ran it):
        # load that checkpoint instead of training. (transformers would train one extra step here.)
        trainer.restore_finished(resume_from)
        output = None
    else:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.time() - started
    state = trainer.state
    facts = trainer.facts()
    timing = facts.timing
    session_steps = state.global_step - timing.step0
    train_time = (timing.t_end or time.time()) - (timing.t0 or started)
    session_tokens = state.num_input_tokens_seen - timing.tokens0
    losses_by_step = {h["step"]: float(h["step_loss"]) for h in state.log_history if "step_loss" in h}
    if not losses_by_step:  # a checkpoint from elsewhere: fall back to the logged window means
        losses_by_step = {h["step"]: float(h["loss"]) for h in state.log_history if "loss" in h and "step" in h}
    ordered = [losses_by_step[k] for k in sorted(losses_by_step)]
    last = ordered[-1] if ordered else float("nan")
    model = trainer.model
    metrics = {
        "steps": state.global_step,
        "session_steps": session_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "epochs": round(float(state.epoch or 0.0), 4),
        "train_loss_first": ordered[0] if ordered else None,
        "train_loss_last": last,
        "train_loss_mean": (sum(ordered) / len(ordered)) if ordered else None,
        "train_loss_session_mean": float(output.training_loss) if output and session_steps else None,
        "final_loss_finite": math.isfinite(last),
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_s": round(session_tokens / train_time, 2) if train_time > 0 and session_tokens else None,
        "s_per_step": round(train_time / session_steps, 4) if session_steps else None,
        "train_wall_s": round(wall, 2),
        "trainable_params": trainable_parameters(model),
        "weights_changed": weights_changed(model, before),
        "loss_curve": [{"step": k, "loss": losses_by_step[k]} for k in sorted(losses_by_step)],
    }
    extra_keys = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                  "mean_token_accuracy")
    for key in extra_keys:
        vals = [float(h[key]) for h in state.log_history if key in h]
        if vals:
            name = key.replace("/", "_")
            metrics[f"{name}_last"] = vals[-1]
            metrics[f"{name}_mean"] = sum(vals) / len(vals)
    evals = [(h["step"], float(h["eval_loss"])) for h in state.log_history if "eval_loss" in h]
    if evals:
        metrics["eval_loss_curve"] = [{"step": k, "eval_loss": v} for k, v in evals]
        metrics["eval_loss_last"] = evals[-1][1]
        metrics["eval_loss_best"] = min(v for _, v in evals)
        metrics["best_checkpoint"] = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
        planned = state.max_steps or 0
        metrics["stopped_early"] = bool(planned and state.global_step < planned)
    if facts.ref_logps_cache is not None:
        metrics["ref_logps_cache"] = dict(facts.ref_logps_cache)
    return metrics


def save_trained(trainer, tokenizer, out: str | os.PathLike, *, base: str) -> None:
    """Adapter (or full model) + tokenizer, written atomically; the folder names no path.

    peft writes where the base model was loaded from (an absolute path, so wherever this clone
    sits) into ``adapter_config.json`` (``base_model_name_or_path``) and into the ``README.md``
    model card it generates. The folder's content hash (:func:`tempering.io.hash_path`) then
    differed between clones of the same run, and with it every key built on it (DPO's reference
    log-prob cache, the checkpoint fingerprints, evaluate's score cache through export). So:

    - the generated ``README.md`` is not kept: it is peft's blank template ("More Information
      Needed") holding only that path, tags and peft's version; the stage's ``meta.json``
      records the lineage, and export writes the model card of what a user gets.
    - ``base_model_name_or_path`` becomes ``base``: the content hash of the model the adapter goes
      on, as the stage's ``meta.json`` records it under ``inputs`` (DPO's: ``<base>+<sft>``, the
      SFT adapter merged into the base). A hash and not a path,
      because a path is only right in one clone (and for DPO no folder holds the model its
      adapter goes on: base + SFT merged). tempering never reads the field: it loads an adapter
      onto a base it passes itself (:func:`~tempering.train.models.merge_adapter`).
    """
    model = trainer.model
    is_peft = hasattr(model, "peft_config")
    if not is_peft:  # a full model: readers generate with it
        model.config.use_cache = True
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if is_peft:
            (tmp / "README.md").unlink(missing_ok=True)
            config_file = tmp / "adapter_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

