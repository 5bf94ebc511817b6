"""tempering.train.losses: the compact LM head against TRL's fused head (the selective LM loss is
checked against separate sequences in test_train_data.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from trl.trainer.utils import FusedCausalLMOutput

from tempering.train.losses import install_compact_lm_head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tempering.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_compact_lm_head_matches_trls_fused_head(tiny):
    """DPO's log-probs (and its metrics' entropy / mean logit / top-1) from the compact head equal
    TRL's fused head on every labelled position, and are zero elsewhere."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.5, -100)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        assert install_compact_lm_head(model, FusedCausalLMOutput)
        got = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    keep = labels[:, 1:] != -100
    for field in ("log_probs", "entropy", "mean_logits"):
        a, b = getattr(ref, field), getattr(got, field)
        assert torch.allclose(a[keep], b[keep], atol=1e-4), field
        assert (b[~keep] == 0).all(), field
    assert torch.equal(ref.is_top1[keep], got.is_top1[keep])
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    plain = model(input_ids=ids, attention_mask=mask)  # without fused_lm_head: the model's own forward
    assert plain.logits.shape == (3, 12, model.config.vocab_size)
