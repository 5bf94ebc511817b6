"""Callbacks: what watches a training run from inside the Trainer's loop.

Owns :class:`GuardCallback` (the NaN guard: a non-finite loss or weights stop the run with a
one-line error before that step is checkpointed; the exact loss of every optimizer step recorded
in the trainer state, so it survives a resume; the session's step, token and time origin as a
:class:`Timing` value), :class:`LiveCallback` (dvclive curves for ``dvc plots``),
:func:`setup_wandb` (W&B: offline by default, never prompts) and :func:`stage_callbacks` (the
callbacks a stage adds: dvclive, early stopping, the :data:`EXTRA_CALLBACKS` test hook).
Subclasses transformers' ``TrainerCallback``; no trl.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from tempering import TemperingError
from tempering.train.checkpoints import valid_checkpoints

# Test hook: extra transformers callbacks appended to every trainer a stage builds (fault injection).
EXTRA_CALLBACKS: list = []


@dataclass(frozen=True)
class Timing:
    """Where this session of a run started and when it ended: the step and token counts it
    resumed from, and its wall-clock start and end (``time.time()``; None when it did not run)."""

    step0: int
    tokens0: int
    t0: float | None
    t_end: float | None


class GuardCallback(TrainerCallback):
    """Stop with a TemperingError when a step's loss is non-finite (:meth:`check_loss`, called by
    the trainer's ``training_step``) or it leaves non-finite trainable weights, *before* the
    Trainer saves a checkpoint for that step (on_step_end runs before the save). Each finite
    step's exact loss goes into ``state.log_history`` as ``{"step", "step_loss"}`` there too (the
    logged "loss" is a window mean every logging_steps)."""

    def __init__(self, stage: str, checkpoints: str):
        self.stage, self.checkpoints = stage, checkpoints
        self.model = None
        self.t0 = None
        self.tokens0 = 0
        self.step0 = 0
        self.t_end = None
        self._step_losses: dict[int, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.t0 = time.time()
        self.tokens0 = state.num_input_tokens_seen
        self.step0 = state.global_step

    def check_loss(self, step: int, value: float) -> None:
        """One micro-batch's loss of optimizer step ``step``: raise when non-finite, else add it
        (micro-batch losses are already scaled for gradient accumulation: their sum is the step loss)."""
        if not math.isfinite(value):
            raise TemperingError(nan_message(self.stage, step, self.checkpoints, f"loss is {value}"))
        self._step_losses[step] = self._step_losses.get(step, 0.0) + value

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch

        model = model or self.model
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if params:
            with torch.no_grad():  # one device sync per step, not one per tensor
                ok = torch.stack([torch.isfinite(p).all() for _, p in params]).all().item()
            if not ok:
                name = next(n for n, p in params if not torch.isfinite(p).all())
                raise TemperingError(nan_message(self.stage, state.global_step, self.checkpoints,
                                                 f"weights became non-finite ({name})"))
        step = state.global_step
        if step in self._step_losses:
            state.log_history.append({"step": step, "step_loss": self._step_losses.pop(step)})

    def on_train_end(self, args, state, control, **kwargs):
        self.t_end = time.time()

    def restored(self, state) -> None:
        """A finished run was loaded instead of trained: this session ran no step, in no time."""
        self.step0, self.tokens0 = state.global_step, state.num_input_tokens_seen
        self.t0 = self.t_end = time.time()

    def timing(self) -> Timing:
        return Timing(step0=self.step0, tokens0=self.tokens0, t0=self.t0, t_end=self.t_end)


def nan_message(stage: str, step: int, checkpoints: str, what: str) -> str:
    good = valid_checkpoints(checkpoints)
    kept = f"last good checkpoint kept: {good[-1]}" if good else "no checkpoint saved yet"
    return (f"{stage}: training diverged at step {step}: {what}; lower {stage}.learning_rate or raise "
            f"{stage}.warmup_ratio ({kept})")


class LiveCallback(TrainerCallback):
    """Step-indexed training curves under ``<dir>/plots/metrics`` (what dvc.yaml's plots read).

    On a resume the curves up to the checkpoint are kept: trimmed to it when the folder is there,
    and logged again from the checkpoint's trainer state when it is not (DVC removes a stage's
    outputs before running it, so after a crash the folder is gone; a run that crashed after its
    last step resumes with nothing left to train and would otherwise leave no curves, and DVC would
    fail the stage on the missing output)."""

    def __init__(self, live_dir: str, resume_step: int | None):
        self.dir = Path(live_dir)
        self.resume_step = resume_step
        self.live = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from dvclive import Live

        kept = self.resume_step is not None and (self.dir / "plots" / "metrics").exists()
        if kept:
            _trim_live(self.dir, self.resume_step)
        self.live = Live(dir=str(self.dir), resume=kept, save_dvc_exp=False, dvcyaml=None, report=None)
        if self.resume_step is not None and not kept:
            for entry in state.log_history:  # the checkpoint's trainer state: every log up to it
                if isinstance(entry.get("step"), int) and entry["step"] <= self.resume_step:
                    self._log(entry, entry["step"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is not None and logs:
            self._log(logs, state.global_step)

    def _log(self, logs: dict, step: int) -> None:
        values = {k: float(v) for k, v in logs.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                  and k not in {"epoch", "total_flos", "step"} and not k.startswith("train_")}
        if not values:
            return
        self.live.step = step
        for key, value in values.items():
            self.live.log_metric(f"train/{key}", value)
        self.live.make_summary()

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.end()
            self.live = None


def _trim_live(live_dir: Path, max_step: int) -> None:
    """Drop dvclive rows logged after the checkpoint we resume from (they will be logged again)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        with open(tsv, newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        i = rows[0].index("step")
        keep = [rows[0]] + [r for r in rows[1:] if len(r) > i and r[i].isdigit() and int(r[i]) <= max_step]
        with open(tsv, "w", newline="") as fh:
            csv.writer(fh, delimiter="\t", lineterminator="\n").writerows(keep)


def setup_wandb(tracking, run_name: str) -> bool:
    """Configure W&B from ``tracking``; returns whether the trainer reports to it. Never prompts:
    offline by default, online only with credentials, ``WANDB_MODE=disabled`` in the env wins."""
    mode = tracking.wandb
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return False
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            raise TemperingError("tracking.wandb: online needs WANDB_API_KEY (or `wandb login`); "
                                 "use offline and `wandb sync` later")
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_DIR", str(Path.cwd()))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ["WANDB_PROJECT"] = tracking.project
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    os.environ.setdefault("WANDB_WATCH", "false")
    return True


def stage_callbacks(live_dir: str | None, tracking, resume_step: int | None, cfg=None) -> list:
    """The callbacks a stage adds to its trainer (the trainer adds its own :class:`GuardCallback`
    first): dvclive curves when ``tracking.dvclive``, early stopping on the held-out loss when
    ``cfg`` holds out an eval split with a patience, then :data:`EXTRA_CALLBACKS`."""
    cbs = []
    if live_dir and tracking.dvclive:
        cbs.append(LiveCallback(live_dir, resume_step))
    if cfg is not None and getattr(cfg, "eval_share", 0) > 0 and getattr(cfg, "early_stopping_patience", 0) > 0:
        from transformers import EarlyStoppingCallback

        cbs.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience,
                                         early_stopping_threshold=cfg.early_stopping_threshold))
    return cbs + list(EXTRA_CALLBACKS)
