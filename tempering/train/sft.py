"""Supervised fine-tuning (and continued pre-training) through TRL's ``SFTTrainer``.

Owns :func:`sft_config` (a TrainParams section -> ``SFTConfig``; TRL's dataset preparation,
packing and padding-free off: :mod:`tempering.train.data` tokenizes and packs),
:class:`TemperingSFTTrainer` (``trl.SFTTrainer`` with the shared overrides of
:class:`~tempering.train.loop.TemperingTrainerMixin` and, on CPU, the selective LM loss) and
:func:`build_sft_trainer` (what the sft and cpt stages pass it). One of the two modules that
import trl (with :mod:`tempering.train.dpo`).
"""

from __future__ import annotations

from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from tempering.train.callbacks import stage_callbacks
from tempering.train.data import packed_collator
from tempering.train.losses import selective_lm_loss
from tempering.train.loop import TemperingTrainerMixin, trainer_arguments
from tempering.train.precision import Precision


def sft_config(cfg, tracking, *, output_dir: str, precision: Precision, run_name: str, **extra) -> SFTConfig:
    """An sft or cpt params section -> ``SFTConfig``."""
    # TRL's packing/padding-free stay off: we tokenize and pack ourselves (tokenize_sft, pack_sft),
    # TRL's dataset preparation is skipped and packed blocks get our own collator.
    return SFTConfig(**trainer_arguments(cfg, tracking, output_dir=output_dir, precision=precision,
                                         run_name=run_name, **extra),
                     packing=False, padding_free=False, dataset_kwargs={"skip_prepare_dataset": True},
                     completion_only_loss=False, assistant_only_loss=False)


class TemperingSFTTrainer(TemperingTrainerMixin, SFTTrainer):
    """``SFTTrainer`` on a pre-tokenized dataset (input_ids + labels), stopping on a non-finite
    loss before the optimizer step.

    Options (keywords): ``stage``, ``checkpoints`` and ``callbacks`` (see
    :class:`~tempering.train.loop.TemperingTrainerMixin`); ``plain_loss``: compute the loss with
    :func:`~tempering.train.losses.selective_lm_loss` (logits at target positions only) instead
    of TRL's chunked log-prob kernel. On CPU with a 49k vocabulary the kernel made an SFT step
    ~35% slower (SmolLM2-135M, batch 8, fp32: 3.4 vs 2.5 s/step); it pays off on GPUs, where it
    saves the logits' memory. Same loss: labels carry the -100 mask."""

    def __init__(self, *args, plain_loss: bool = False, **kwargs):
        self.plain_loss = plain_loss
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.plain_loss:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs["use_cache"] = False
        if not return_outputs:
            loss = selective_lm_loss(model, inputs, num_items_in_batch)
            if loss is not None:
                return loss
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def build_sft_trainer(model, tokenizer, dataset, args, *, stage: str, checkpoints: str,
                      live_dir: str | None, tracking, resume_step: int | None = None, eval_dataset=None,
                      cfg=None, selective_head: bool | None = None) -> TemperingSFTTrainer:
    """A :class:`TemperingSFTTrainer` for a stage. Packed datasets (a ``seq_lengths`` column, see
    :func:`~tempering.train.data.pack_sft`) get the packed collator. ``selective_head``: the
    loss through :func:`~tempering.train.losses.selective_lm_loss` (None = off CUDA only, the
    default; False = TRL's own loss, for the speed ablation in ``bench/bench_train.py``)."""
    plain = not str(args.device).startswith("cuda") if selective_head is None else bool(selective_head)
    collator = packed_collator(tokenizer.pad_token_id) if "seq_lengths" in dataset.column_names else None
    return TemperingSFTTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        data_collator=collator, stage=stage, checkpoints=checkpoints, plain_loss=plain,
        callbacks=stage_callbacks(live_dir, tracking, resume_step, cfg))
