"""Loss kernels that make CPU training fast, with the same loss as the model's own.

Owns :func:`selective_lm_loss` (SFT and CPT: the LM head and softmax only at trained positions)
and :func:`install_compact_lm_head` (DPO: TRL's fused LM head scoring only labelled positions;
:func:`fused_head_output` builds its output, for it and DPO's shared-prompt forward).
Both split the model with :func:`tempering.train.models.causal_lm_parts`; torch is imported
inside functions and trl not at all (TRL's output class is passed in).
"""

from __future__ import annotations

import weakref

from tempering.train.models import causal_lm_parts

# Models whose forward already is the compact head (a weak set: no attribute stuck on the model).
_COMPACT: weakref.WeakSet = weakref.WeakSet()


def selective_lm_loss(model, inputs: dict, num_items_in_batch=None):
    """Causal-LM cross-entropy computing logits only where a label is trained.

    Same loss as the model's own (shifted labels, -100 ignored, sum / number of target tokens),
    but the LM head (49k x 576 for SmolLM2, ~20% of a forward) and the float32 softmax run only
    on target positions (assistant tokens in SFT) instead of every position. Returns None when
    the model does not have the decoder + LM head layout (the caller falls back)."""
    import torch.nn.functional as F

    parts = causal_lm_parts(model)
    if parts is None:
        return None
    decoder, head = parts
    labels = inputs["labels"]
    kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    hidden = decoder(**kwargs, use_cache=False).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = head(hidden[keep]).float()
    loss = F.cross_entropy(logits, target[keep], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    return loss / denom.to(loss.device) if hasattr(denom, "to") else loss / denom


def install_compact_lm_head(model, output_cls) -> bool:
    """Make TRL's fused LM head (``model(..., labels=..., fused_lm_head=True)``, used by DPO for the
    policy and the reference) score only the positions with a label, on devices without Triton.

    TRL 1.16 scores every position (prompt and padding included) and computes the entropy, mean
    logit and top-1 of each over the whole vocabulary unless Triton is available, i.e. on every
    CPU. DPO only needs completion tokens, a small share of each sequence. Same outputs
    (``FusedCausalLMOutput``, zeros where the label is -100), same loss. Returns whether it was
    installed (not for MoE router losses or pre-shifted labels, which keep TRL's path).

    ``output_cls`` is TRL's ``FusedCausalLMOutput`` (passed in by :mod:`tempering.train.dpo`, so
    this module does not import trl). Installing twice is a no-op."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "peft_config"):
        inner = inner.get_base_model()
    if inner in _COMPACT:
        return True
    if getattr(inner.config.get_text_config(), "output_router_logits", False):
        return False
    fused = inner.forward  # TRL's patched forward (falls back to the original without fused_lm_head)
    softcap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
    if softcap or getattr(inner.config.get_text_config(), "logit_scale", None) not in (None, 1.0):
        return False  # scaled heads keep TRL's kernel

    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or labels is None or kwargs.get("output_router_logits"):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = inner.get_decoder()(*args, **kwargs).last_hidden_state[:, :-1]
        mask = labels[:, 1:] != -100
        logits = inner.get_output_embeddings()(hidden[mask]).float()
        return fused_head_output(logits, labels, output_cls, num_items_in_batch)

    inner.forward = forward
    _COMPACT.add(inner)
    return True


def fused_head_output(logits, labels, output_cls, num_items_in_batch=None):
    """TRL's ``FusedCausalLMOutput`` (``output_cls``) from float32 ``logits`` at the labelled
    positions only (row-major order of ``labels[:, 1:] != -100``): the log-prob of each target,
    and DPO's metrics (entropy, mean logit, top-1) without gradients, zero where there is no
    label; the loss is the mean negative log-prob (or over ``num_items_in_batch``)."""
    import torch

    target = labels[:, 1:]
    mask = target != -100
    picked = target[mask]
    logz = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(-1, picked[:, None]).squeeze(-1) - logz
    with torch.no_grad():
        entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        mean_logits = logits.mean(-1)
        is_top1 = logits.argmax(-1) == picked

    def full(x):
        return x.new_zeros(mask.shape).masked_scatter(mask, x)

    log_probs_full = full(log_probs)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return output_cls(loss=-log_probs_full.sum() / denom, log_probs=log_probs_full,
                      entropy=full(entropy), mean_logits=full(mean_logits),
                      is_top1=torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
                      .masked_scatter(mask, is_top1), label_mask=mask)

