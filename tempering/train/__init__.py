"""Training: the stages' path from params and rows to a trained model, one module per concern.

- :mod:`~tempering.train.precision`: hardware and process setup (physical cores, torch threads,
  native bf16, the autocast :class:`Precision`, quiet transformers logs);
- :mod:`~tempering.train.data`: tokenizers, chat rendering and our own tokenization (SFT loss
  mask, DPO pairs as TRL tokenizes them), the tokenization cache, packing, collation, splits;
- :mod:`~tempering.train.models`: loading (float32, frozen bases, QLoRA), peft adapters,
  merging, the inference loader, trainable-weight snapshots, a model folder's ``meta.json``;
- :mod:`~tempering.train.losses`: the CPU loss kernels (selective LM loss, compact LM head);
- :mod:`~tempering.train.checkpoints`: checkpoint names, fingerprints, resume or wipe;
- :mod:`~tempering.train.callbacks`: the NaN guard and step-loss record, dvclive, W&B;
- :mod:`~tempering.train.loop`: what every tempering trainer shares (its overrides, the
  arguments common to SFT and DPO), :func:`~tempering.train.loop.train` and saving;
- :mod:`~tempering.train.sft`: ``TemperingSFTTrainer`` (SFT and CPT) and ``SFTConfig``;
- :mod:`~tempering.train.dpo`: ``TemperingDPOTrainer``, ``DPOConfig`` and the DPO reference
  log-prob cache.

Only :mod:`~tempering.train.sft` and :mod:`~tempering.train.dpo` import trl (a TRL upgrade is
a change in those two files, and ``tests/test_train_boundaries.py`` pins every private TRL or
transformers method they override); peft is imported by :mod:`~tempering.train.models` only. The
other modules import torch, transformers and datasets inside functions, so validate and
evaluate can use precision and tokenization without loading the trainer stack.

This file imports nothing: importing one module of the package loads only that module.
"""
