"""tempering.train.dpo.install_shared_prompt_forward: each DPO pair's prompt runs once, with the
same log-probs, metrics, loss and gradients as the compact head's unshared forward."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from trl.trainer.utils import FusedCausalLMOutput

from tempering.train.dpo import install_shared_prompt_forward, shared_prompt_rows
from tempering.train.losses import install_compact_lm_head

PAIRS = [  # (prompt, chosen, rejected): a common answer prefix, a one-token answer, unequal lengths
    ([5, 6, 7, 8, 9], [20, 21, 22, 23], [20, 21, 30]),
    ([11, 12], [40], [41, 42, 43, 44, 45]),
    ([13, 14, 15, 16, 17, 18, 19], [50, 51], [60, 61]),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tempering.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def dpo_batch(pairs, pad=0):
    """TRL's DPO layout: [chosen rows; rejected rows], prompt + answer flush left, labels -100 on
    the prompt and the padding."""
    import torch

    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (p, a) in enumerate(seqs):
        ids[r, :len(p) + len(a)] = torch.tensor(p + a)
        mask[r, :len(p) + len(a)] = 1
        labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
    return ids, mask, labels


def _models(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    compact = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    shared = copy.deepcopy(compact)
    assert install_compact_lm_head(compact, FusedCausalLMOutput)
    assert install_compact_lm_head(shared, FusedCausalLMOutput)
    assert install_shared_prompt_forward(shared, FusedCausalLMOutput)
    return compact, shared


def test_shared_prompts_give_the_unshared_log_probs_loss_and_gradients(tiny):
    import torch

    compact, shared = _models(tiny)
    ids, mask, labels = dpo_batch(PAIRS)
    rows = shared_prompt_rows(ids, mask, labels)
    # every prompt once, the common answer prefix [20, 21] once: fewer tokens than the batch's
    assert sum(len(r.tokens) for r in rows) < int(mask.sum()) - sum(len(p) for p, _, _ in PAIRS)
    calls = []
    decoder = shared.get_decoder()
    hook = decoder.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    got = shared(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    hook.remove()
    want = compact(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert calls == [torch.Size([len(PAIRS), max(len(r.tokens) for r in rows)])]  # one row per pair
    keep = labels[:, 1:] != -100
    assert torch.equal(got.label_mask, want.label_mask)
    for field in ("log_probs", "entropy", "mean_logits"):
        a, b = getattr(want, field), getattr(got, field)
        assert torch.allclose(a[keep], b[keep], atol=1e-5), field
        assert (b[~keep] == 0).all(), field
    assert torch.equal(want.is_top1, got.is_top1)
    # DPO's sums per sequence, and the gradients of a DPO-like loss, as unshared
    lp_want, lp_got = want.log_probs.sum(1), got.log_probs.sum(1)
    assert torch.allclose(lp_want, lp_got, atol=1e-4)
    half = len(PAIRS)
    for model, lp in ((compact, lp_want), (shared, lp_got)):
        (-torch.nn.functional.logsigmoid(0.1 * (lp[:half] - lp[half:]))).mean().backward()
    for (name, a), (_, b) in zip(compact.named_parameters(), shared.named_parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name


def test_batches_not_in_dpo_layout_keep_the_unshared_forward(tiny):
    import torch

    compact, shared = _models(tiny)
    ids, mask, labels = dpo_batch(PAIRS)
    other = ids.clone()
    other[len(PAIRS), 0] = 99  # the first pair's rejected row has another prompt
    assert shared_prompt_rows(other, mask, labels) is None
    assert shared_prompt_rows(ids[:-1], mask[:-1], labels[:-1]) is None  # odd size
    left = torch.roll(mask, 1, dims=1)  # not flush left
    assert shared_prompt_rows(ids, left, labels) is None
    with torch.no_grad():
        got = shared(input_ids=other, attention_mask=mask, labels=labels, fused_lm_head=True)
        want = compact(input_ids=other, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert torch.allclose(got.log_probs, want.log_probs, atol=1e-6)
    plain = shared(input_ids=ids, attention_mask=mask)  # without fused_lm_head: the model's own forward
    assert plain.logits.shape[:2] == ids.shape
