"""Params -> TRL configs (tempering.train.sft.sft_config, tempering.train.dpo.dpo_config), W&B modes
(tempering.train.callbacks.setup_wandb) and the DPO reference cache key."""

from __future__ import annotations

import pytest

from tempering import TemperingError
from tempering.config import from_dict
from tempering.train.callbacks import setup_wandb
from tempering.train.dpo import dpo_config, reference_cache_key
from tempering.train.precision import Precision
from tempering.train.sft import sft_config


def test_train_params_map_onto_sft_and_dpo_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    p = from_dict({"sft": {"learning_rate": 3e-4, "epochs": 2, "max_steps": 7, "batch_size": 3, "grad_accum": 2,
                           "warmup_ratio": 0.1, "lr_scheduler": "linear", "weight_decay": 0.01,
                           "max_grad_norm": 0.5, "seed": 7, "save_steps": 4, "logging_steps": 2},
                   "dpo": {"beta": 0.3, "loss_type": "ipo"},
                   "tracking": {"wandb": "disabled"}})
    prec = Precision("fp32", "cpu", "test")
    a = sft_config(p.sft, p.tracking, output_dir=str(tmp_path), precision=prec, run_name="sft")
    assert (a.learning_rate, a.num_train_epochs, a.max_steps) == (3e-4, 2, 7)
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps) == (3, 2)
    assert (a.warmup_steps, str(a.lr_scheduler_type.value), a.weight_decay, a.max_grad_norm) == (0.1, "linear", 0.01, 0.5)
    assert (a.seed, a.save_steps, a.logging_steps, a.save_total_limit) == (7, 4, 2, 2)
    assert a.report_to == [] and not a.bf16 and not a.fp16 and not a.gradient_checkpointing
    assert a.dataloader_num_workers == 0 and a.eval_strategy.value == "no"
    assert a.dataset_kwargs == {"skip_prepare_dataset": True}
    d = dpo_config(p.dpo, p.tracking, output_dir=str(tmp_path),
                   precision=Precision("bf16", "cpu", "test"), run_name="dpo")
    assert d.beta == 0.3 and d.loss_type == ["ipo"] and d.bf16 and d.max_length == p.dpo.max_length


def test_wandb_modes(tmp_path, monkeypatch):
    from tempering.config import TrackingParams

    for key in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_SILENT", "WANDB_CONSOLE",
                "WANDB_LOG_MODEL", "WANDB_WATCH"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    assert setup_wandb(TrackingParams(wandb="disabled"), "x") is False
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert setup_wandb(TrackingParams(wandb="offline", project="p"), "x") is True
    import os

    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_PROJECT"] == "p"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(TemperingError, match="WANDB_API_KEY"):
        setup_wandb(TrackingParams(wandb="online"), "x")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's env switch wins
    assert setup_wandb(TrackingParams(wandb="offline"), "x") is False


def test_training_config_maps_checkpointing_eval_and_reference_precompute(tmp_path):
    p = from_dict({"sft": {"gradient_checkpointing": True, "eval_share": 0.1, "early_stopping_patience": 2,
                           "save_steps": 6}, "dpo": {"precompute_ref": False}, "tracking": {"wandb": "disabled"}})
    prec = Precision("fp32", "cpu", "test")
    a = sft_config(p.sft, p.tracking, output_dir=str(tmp_path), precision=prec, run_name="s")
    assert a.gradient_checkpointing and a.eval_strategy.value == "steps" and a.eval_steps == 6
    assert a.load_best_model_at_end and a.metric_for_best_model == "eval_loss" and a.greater_is_better is False
    d = dpo_config(p.dpo, p.tracking, output_dir=str(tmp_path), precision=prec, run_name="d")
    assert d.precompute_ref_log_probs is False and d.eval_strategy.value == "no"
    assert dpo_config(from_dict({}).dpo, p.tracking, output_dir=str(tmp_path), precision=prec,
                      run_name="d").precompute_ref_log_probs is True


def test_reference_cache_key_covers_every_input():
    kw = dict(data="d", reference="r", tokenizer="t", max_length=256, max_prompt_length=192, precision="bf16")
    key = reference_cache_key(**kw)
    assert key == reference_cache_key(**kw)
    for field, other in (("data", "d2"), ("reference", "r2"), ("tokenizer", "t2"), ("max_length", 128),
                         ("max_prompt_length", 64), ("precision", "fp32")):
        assert reference_cache_key(**{**kw, field: other}) != key, field
