"""SFT's batch-wide common prefix runs once (tempering.train.losses), and the attention kernel
choice (tempering.train.models.attention_implementation): same loss, same gradients."""

from __future__ import annotations

from pathlib import Path

import pytest

from tempering.train.losses import MIN_SHARED_PREFIX, SHARED_PREFIX_BATCHES, selective_lm_loss, shared_prefix_length


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tempering.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", layers=2)


def _batch(prefix: list[int], tails: list[list[int]], answer_from: int, pad: int = 0):
    """Right-padded rows prefix + tail; labels from ``answer_from`` (an index into each row) on."""
    import torch

    rows = [prefix + t for t in tails]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
        labels[r, answer_from:len(row)] = torch.tensor(row[answer_from:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


PREFIX = [5, 9, 11, 7, 3, 20, 21, 22, 23, 24, 25, 30]  # 12 shared tokens (a "system turn")
TAILS = [[40, 41, 42, 43, 44, 45], [50, 51, 52], [60, 61, 62, 63, 64, 65, 66, 67, 68], [40, 41, 70, 71]]


def test_shared_prefix_length_rules():
    import torch

    b = _batch(PREFIX, TAILS, answer_from=len(PREFIX) + 1)
    assert shared_prefix_length(b["input_ids"], b["attention_mask"], b["labels"]) == len(PREFIX)
    # a target predicted from inside the prefix ends it there (position j predicts token j + 1)
    early = _batch(PREFIX, TAILS, answer_from=10)
    assert shared_prefix_length(early["input_ids"], early["attention_mask"], early["labels"]) == 9
    # under MIN_SHARED_PREFIX tokens: not worth a pass of its own
    short = _batch(PREFIX[:MIN_SHARED_PREFIX - 1], TAILS, answer_from=MIN_SHARED_PREFIX)
    assert shared_prefix_length(short["input_ids"], short["attention_mask"], short["labels"]) == 0
    # one row, or rows that differ from the first token: nothing shared
    one = _batch(PREFIX, TAILS[:1], answer_from=len(PREFIX))
    assert shared_prefix_length(one["input_ids"], one["attention_mask"], one["labels"]) == 0
    b2 = _batch(PREFIX, TAILS, answer_from=len(PREFIX))
    b2["input_ids"][2, 0] = 99
    assert shared_prefix_length(b2["input_ids"], b2["attention_mask"], b2["labels"]) == 0
    # left padding (a row not flush left) is not a shared prefix
    b3 = _batch(PREFIX, TAILS, answer_from=len(PREFIX))
    b3["attention_mask"][1, 0] = 0
    assert shared_prefix_length(b3["input_ids"], b3["attention_mask"], b3["labels"]) == 0
    assert torch.equal(b["input_ids"][:, :len(PREFIX)], torch.tensor([PREFIX] * len(TAILS)))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_loss_and_gradients_equal_the_full_forward(tiny, attention):
    """In float32, with a LoRA adapter on every linear layer: the loss and every trainable
    parameter's gradient are the unshared forward's, and the shared path really ran."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model.set_attn_implementation(attention)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a live adapter: gradients reach lora_A too
    model.train()
    batch = _batch(PREFIX, TAILS, answer_from=len(PREFIX) + 1)
    results = {}
    for shared in (False, True):
        model.zero_grad()
        before = dict(SHARED_PREFIX_BATCHES)
        loss = selective_lm_loss(model, batch, shared_prefix=shared)
        loss.backward()
        ran = {k: SHARED_PREFIX_BATCHES[k] - before[k] for k in before}
        assert ran == ({"shared": 1, "unshared": 0} if shared else {"shared": 0, "unshared": 1})
        results[shared] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (plain_loss, plain_grads), (shared_loss, shared_grads) = results[False], results[True]
    assert torch.isfinite(torch.tensor(shared_loss))
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_grads.keys() == shared_grads.keys()
    for name, g in plain_grads.items():
        assert torch.allclose(shared_grads[name], g, rtol=1e-4, atol=1e-6), name
    # the prefix's own positions carry gradient: the adapters on k/v see it (not all zero)
    assert any(g.abs().sum() > 0 for n, g in shared_grads.items() if "k_proj.lora_A" in n)


def test_shared_prefix_falls_back_for_packed_blocks_and_gradient_checkpointing(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    batch = _batch(PREFIX, TAILS, answer_from=len(PREFIX) + 1)
    with torch.no_grad():
        shared = selective_lm_loss(model, batch)
        packed = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
        before = SHARED_PREFIX_BATCHES["unshared"]
        selective_lm_loss(model, packed)
        assert SHARED_PREFIX_BATCHES["unshared"] == before + 1
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()
        before = SHARED_PREFIX_BATCHES["unshared"]
        checkpointed = selective_lm_loss(model, batch)
        assert SHARED_PREFIX_BATCHES["unshared"] == before + 1
    assert checkpointed.item() == pytest.approx(shared.item(), rel=1e-5)


def test_attention_implementation_auto():
    from tempering.train.models import EAGER_TRAIN_MAX_LENGTH, attention_implementation

    assert attention_implementation("auto", "cpu", 256) == "eager"
    assert attention_implementation("auto", "cpu", EAGER_TRAIN_MAX_LENGTH) == "eager"
    assert attention_implementation("auto", "cpu", EAGER_TRAIN_MAX_LENGTH + 1) is None  # memory ~ length^2
    assert attention_implementation("auto", "cpu", None) is None
    assert attention_implementation("auto", "cpu", 4096, training=False) == "eager"  # no saved weights
    assert attention_implementation("auto", "cuda", 256) is None  # the model's own (sdpa / flash)
    assert attention_implementation("sdpa", "cpu", 256) == "sdpa"
    assert attention_implementation("eager", "cuda", 4096) == "eager"


def test_use_attention_switches_a_loaded_model_and_is_not_saved(tiny, tmp_path):
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from tempering.train.models import load_for_inference, use_attention

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    assert use_attention(model, "auto", "cpu", 256) == "eager"
    assert use_attention(model, "sdpa", "cpu", 256) == "sdpa"
    assert use_attention(model, "auto", "cpu", 4096) == "sdpa"  # auto past the limit: left as it is
    inference, _ = load_for_inference(tiny, "cpu")
    assert inference.config._attn_implementation == "eager"
    own, _ = load_for_inference(tiny, "cpu", attention=None)
    assert own.config._attn_implementation == "sdpa"
    inference.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not any("attn" in k for k in saved)  # a saved model carries no kernel choice
