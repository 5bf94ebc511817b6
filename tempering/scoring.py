"""Fast log-likelihood scoring inside lm-eval: the ``tempering`` model.

lm-eval stays the harness (task definitions, prompts, metrics, per-item logs); this module only
changes how the model scores ``(context, continuation)`` requests. ``TemperingLM`` is lm-eval's
``HFLM`` (same constructor: an already loaded model + tokenizer, or ``pretrained=<folder>``; same
tokenization, chat template, ``loglikelihood_rolling`` and ``generate_until``) with a different
``_loglikelihood_tokens``:

- **one pass per shared context**: requests are grouped by the exact context tokens lm-eval would
  feed (after its left truncation), and each group becomes ONE packed sequence: the context, then
  a prefix tree of every continuation (identical or common-prefix continuations share tokens).
  A 4D attention mask lets each continuation token see the context and its own ancestors only,
  and position ids restart after the context, so every continuation is scored exactly as if it
  followed the context alone. HellaSwag's four endings, ARC's choices and BoolQ's yes/no then
  cost one context each instead of four (or two);
- **LM head only where it is needed**: the decoder body runs on every token, but the hidden states
  are gathered at the positions that predict a continuation token before the LM head (49k x 576
  for SmolLM2, ~20% of a forward) and the float32 log-softmax run; context positions never see
  the vocabulary;
- **batches across items by length**, up to ``batch_tokens`` (padded) tokens per forward pass, so
  the matmuls stay large enough to keep the CPU busy; results come back in request order;
- autocast in ``mixed_precision_dtype`` (``"auto"``: bf16 where the hardware computes it natively,
  float32 otherwise), log-softmax in float32. One autocast region per call, so each weight is
  cast to bf16 once, not once per forward; under bf16 each scored position's top-8 logits and
  the target's are recomputed in float32 (:func:`head_logprobs`), which halves the head's share of
  bf16's error. Rows that are bare contexts (one-token answers: BoolQ) skip the 4D mask and run
  plain causal attention;
- **near-ties re-scored in float32**: after a bf16 pass, each item's choices (lm-eval's requests
  of one document) are checked with :func:`near_tie_members`: if any log-likelihood may be off
  by up to its bound, ``rescore_tolerance`` nats times the square root of its continuation's
  tokens (:func:`choice_tolerance`), and that could change the item's ``acc``, ``acc_norm`` or
  ``acc_bytes`` decision, the choices that contend (and the best) are scored again without
  autocast; the others keep their bf16 scores, which cannot win either way. Decisions then
  equal float32's whenever bf16's error per request is within its bound (docs/evaluation.md
  has the measured error behind the default).

Why a packed sequence and not a KV cache reused per choice: both run the same number of tokens,
but the cache needs two passes per batch (contexts, then continuations against expanded, padded
caches) and its second pass has few query tokens per item; the packed sequence is a single forward
of full-size matmuls and no cache copies. Its cost is a dense mask over each row, which is small
for rows of a few hundred tokens (measured: the masked forward runs as fast as a causal one).

The first call checks the packed path against the model's plain forward on a small probe; any
model it does not fit (a seq2seq backend, prompt-learning adapters, an attention implementation
without 4D masks, a scaled or soft-capped head) is scored by HFLM's own code instead, with a
warning. Requests longer than a sliding attention window go the same way.

    python -m tempering.scoring --model tempering --model_args pretrained=models/export \\
        --tasks hellaswag --limit 100        # lm-eval's CLI with this model registered

Importing this module is light (it registers the name lazily); ``TemperingLM`` is built on first
access, which imports torch, transformers and lm-eval's HFLM.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from lm_eval.api.registry import model_registry

log = logging.getLogger("tempering.scoring")

NAME = "tempering"
# Nats per square root of a continuation's tokens: the largest error of one request's bf16
# log-likelihood that the float32 re-scoring of near-ties still corrects is this times
# sqrt(tokens) (0 = no re-scoring). params.yaml's evaluate.rescore_tolerance sets it for the
# pipeline; this is the default of the lm-eval model alone (its CLI, tests): it covers every
# pair of choices measured on SmolLM2 (docs/evaluation.md, "Parity").
DEFAULT_RESCORE_TOLERANCE = 0.13
# Padded tokens per forward pass. On 2 CPU cores (SmolLM2-135M, bf16) throughput is flat from
# ~1k to ~4k tokens; much smaller batches leave the cores idle, larger ones only cost memory.
DEFAULT_BATCH_TOKENS = 2048

# The name resolves to the class below on first use (lm-eval materialises the placeholder).
try:
    model_registry.register(NAME, target="tempering.scoring:TemperingLM")
except ValueError:  # already registered (the class itself, after a first use)
    pass


# ----------------------------------------------------------------------------- packing (pure)


@dataclass
class Row:
    """One packed sequence: a context, then a prefix tree of continuations."""

    context: int  # number of context tokens (the first ``context`` tokens of ``tokens``)
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    # The row index each token extends (-1: none). Context token i extends i - 1; a tree node
    # extends its parent (the last context token for a continuation's first token).
    parents: list[int] = field(default_factory=list)
    # Row indices whose hidden state goes through the LM head (each once).
    heads: list[int] = field(default_factory=list)
    # (request index, indices into ``heads`` predicting each target, target tokens)
    requests: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    _children: dict = field(default_factory=dict, repr=False)
    _head_slot: dict = field(default_factory=dict, repr=False)

    @classmethod
    def start(cls, context: tuple[int, ...]) -> "Row":
        n = len(context)
        return cls(context=n, tokens=list(context), positions=list(range(n)), parents=list(range(-1, n - 1)))

    def missing(self, continuation: list[int]) -> int:
        """Tokens this continuation would add to the row (those not already in its tree)."""
        parent = self.context - 1
        for k, tok in enumerate(continuation[:-1]):
            node = self._children.get((parent, tok))
            if node is None:
                return len(continuation) - 1 - k
            parent = node
        return 0

    def _head(self, index: int) -> int:
        slot = self._head_slot.get(index)
        if slot is None:
            slot = self._head_slot[index] = len(self.heads)
            self.heads.append(index)
        return slot

    def add(self, request: int, continuation: list[int]) -> None:
        parent = self.context - 1
        slots = [self._head(parent)]  # the last context token predicts the first continuation token
        for tok in continuation[:-1]:
            node = self._children.get((parent, tok))
            if node is None:
                node = self._children[(parent, tok)] = len(self.tokens)
                self.tokens.append(tok)
                self.positions.append(self.positions[parent] + 1)
                self.parents.append(parent)
            parent = node
            slots.append(self._head(node))
        self.requests.append((request, slots, list(continuation)))


def scored_context(context: list[int], continuation: list[int], max_length: int) -> tuple[int, ...]:
    """The context tokens lm-eval's ``hf`` backend actually feeds before ``continuation``.

    HFLM scores ``(context + continuation)[-(max_length + 1):][:-1]``: left truncation to
    ``max_length`` input tokens, continuation kept whole. Requests with equal scored contexts
    can share one pass."""
    if not context or not continuation:
        raise ValueError("a request needs a non-empty context and continuation")
    if len(continuation) > max_length:
        raise ValueError(f"continuation of {len(continuation)} tokens is longer than max_length {max_length}")
    window = (list(context) + list(continuation))[-(max_length + 1):][:-1]
    return tuple(window[: len(window) - len(continuation) + 1])


def pack(pairs: list[tuple[list[int], list[int]]], max_length: int, row_tokens: int) -> list[Row]:
    """Group requests by scored context; one row per context (split when a row would pass
    ``row_tokens``: the context is then repeated). Every request lands in exactly one row."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        groups.setdefault(scored_context(context, continuation, max_length), []).append(i)
    rows: list[Row] = []
    for context, members in groups.items():
        row = None
        for i in members:
            continuation = pairs[i][1]
            if row is None or (row.requests and len(row.tokens) + row.missing(continuation) > row_tokens):
                row = Row.start(context)
                rows.append(row)
            row.add(i, continuation)
    return rows


def batches(rows: list[Row], batch_tokens: int) -> list[list[Row]]:
    """Rows sorted by length (longest first), cut into batches of at most ``batch_tokens``
    padded tokens (a row longer than that is a batch of its own)."""
    out: list[list[Row]] = []
    for row in sorted(rows, key=lambda r: -len(r.tokens)):
        if out and (len(out[-1]) + 1) * len(out[-1][0].tokens) <= batch_tokens:
            out[-1].append(row)
        else:
            out.append([row])
    return out


def attention_mask(batch: list[Row]):
    """Boolean [batch, 1, T, T] mask (True = may attend): causal over the context, ancestors-only
    in the continuation tree, padding attends to itself only."""
    import numpy as np

    width = len(batch[0].tokens)
    mask = np.zeros((len(batch), 1, width, width), dtype=bool)
    idx = np.arange(width)
    mask[:, 0, idx, idx] = True
    for b, row in enumerate(batch):
        m = mask[b, 0]
        c = row.context
        m[:c, :c] = np.tri(c, dtype=bool)
        for j in range(c, len(row.tokens)):
            m[j] = m[row.parents[j]]
            m[j, j] = True
    return mask


def choice_lengths(continuation: str | None) -> list[float]:
    """The lengths lm-eval may divide a choice's log-likelihood by, for one request's continuation
    string: characters (``acc_norm``) and UTF-8 bytes (``acc_bytes``), each with and without a
    leading whitespace character (lm-eval divides by the choice, which is the continuation
    without its target delimiter, one space by default and none under a chat template). At least
    1 each; none for a request without its string."""
    if continuation is None:
        return []
    bare = continuation[1:] if continuation[:1].isspace() else continuation
    return [float(max(n, 1)) for n in (len(continuation), len(bare), len(continuation.encode()),
                                        len(bare.encode()))]


def choice_tolerance(tolerance: float, tokens: int) -> float:
    """The error bound of one request's bf16 log-likelihood: ``tolerance`` nats for a one-token
    continuation, growing as the square root of its ``tokens`` (a sum of that many per-token
    errors that are mostly independent; docs/evaluation.md, "Parity", has the measurement)."""
    return tolerance * math.sqrt(max(int(tokens), 1))


def near_tie_members(lls: list[float], lengths: list[list[float]], tolerance) -> list[int]:
    """The choices of an item whose exact scores can decide it, if each log-likelihood in ``lls``
    may be off by up to its tolerance: [] when the decision is safe. ``tolerance`` is one bound
    for every choice or one per choice (:func:`choice_tolerance`).

    Checked for the raw log-likelihoods (``acc``: argmax) and for each normalisation in
    ``lengths`` (per request, the same number of lengths each, as :func:`choice_lengths`:
    ``acc_norm``, ``acc_bytes``). Under each, a choice contends when its highest possible value,
    (ll + tol) / length, reaches the best choice's lowest, (ll_best - tol_best) / length_best; the
    members are the contenders and the best, over every normalisation. Re-scoring only them
    gives float32's decisions: a choice that contends under no normalisation stays below the
    best's float32 value there, whichever precision its own score is in. One choice is never a
    tie; a tolerance of 0 (or less) never finds one."""
    tols = [float(tolerance)] * len(lls) if isinstance(tolerance, (int, float)) else [float(t) for t in tolerance]
    if len(tols) != len(lls):
        raise ValueError(f"near_tie_members: {len(tols)} tolerances for {len(lls)} choices")
    if len(lls) < 2 or max(tols, default=0.0) <= 0:
        return []
    count = min((len(x) for x in lengths), default=0) if len(lengths) == len(lls) else 0
    norms = [[1.0] * len(lls)] + [[x[k] for x in lengths] for k in range(count)]
    members: set[int] = set()
    for norm in norms:
        values = [ll / n for ll, n in zip(lls, norm)]
        best = max(range(len(lls)), key=values.__getitem__)
        floor = (lls[best] - tols[best]) / norm[best]
        contenders = [k for k, (ll, t, n) in enumerate(zip(lls, tols, norm))
                      if k != best and (ll + t) / n >= floor]
        if contenders:
            members.update(contenders, [best])
    return sorted(members)


def near_tie(lls: list[float], lengths: list[list[float]], tolerance) -> bool:
    """Could an item's decision change if each log-likelihood in ``lls`` were off by up to its
    ``tolerance``? (:func:`near_tie_members` is not empty.)"""
    return bool(near_tie_members(lls, lengths, tolerance))


# ----------------------------------------------------------------------------- the head in bf16


# Logits recomputed in float32 per scored position under bf16 autocast (see head_logprobs).
REFINE_TOP = 8


# Positions per chunk of the head's float32 pass (logsumexp, top-k): [chunk, vocab] float32 stays
# small (512 x 49k = 100 MB for SmolLM2) and the whole vocabulary is read once per position.
HEAD_CHUNK = 256


def head_logprobs(logits, hidden, head, slots, targets, k: int, softmax_dtype=None):
    """log p(target) and the greedy token per (position, target) pair: (float64 [N], long [N]).

    ``logits`` are the LM head's output at the P scored positions ([P, vocab], any float dtype),
    ``slots`` [N] index those positions and ``targets`` [N] the tokens they must predict. Nothing
    of size [N, vocab] or a full log-softmax is materialised: per position only the log normaliser
    (a float32 ``logsumexp``, in chunks of :data:`HEAD_CHUNK` positions) and the top ``k`` are
    computed, then per pair a few gathers.

    When the head ran in a half type (bf16 autocast: 8 significant bits, ~0.03-0.06 nats at the
    magnitudes of a confident prediction, about half of the bf16-vs-fp32 error of a HellaSwag
    log-likelihood on SmolLM2) and ``k`` > 0, the target's logit and each position's top ``k``
    (which carry most of the softmax mass) are recomputed in float32 from the hidden state and the
    head weights (k + 1 dot products per pair, nothing next to the forward); the rest of the
    vocabulary keeps its rounded share of the softmax. The greedy token is then the best of the
    recomputed top ``k``. With float32 logits (or ``k`` = 0) the result is the plain log-softmax
    value and argmax."""
    import torch

    dtype = softmax_dtype or torch.float32
    refine = k > 0 and logits.dtype != torch.float32
    k = min(k, logits.shape[-1]) if refine else 1
    lse = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    top = torch.empty((logits.shape[0], k), dtype=torch.long, device=logits.device)
    for a in range(0, logits.shape[0], HEAD_CHUNK):
        part = logits[a:a + HEAD_CHUNK]
        # top k on the logits as they are (bf16 topk reads half the bytes); the argmax in float32
        top[a:a + HEAD_CHUNK] = part.topk(k, dim=-1).indices if refine else part.argmax(-1, keepdim=True)
        # logsumexp in place on a float32 copy: max, subtract, exp, sum (measured 1.6x faster than
        # torch.logsumexp and 1.3x faster than log_softmax on 2 cores, and nothing [P, vocab] is kept)
        chunk = part.to(dtype, copy=True)
        peak = chunk.amax(-1, keepdim=True)
        lse[a:a + HEAD_CHUNK] = (chunk.sub_(peak).exp_().sum(-1).log() + peak[:, 0]).double()
        del chunk
    lse, top = lse[slots], top[slots]
    plain = logits[slots, targets].to(dtype).double() - lse
    if not refine:
        return plain, top[:, 0]
    cand = torch.cat([top, targets[:, None]], 1)  # [N, k + 1]: the top k, then the target
    with torch.autocast(hidden.device.type, enabled=False):  # float32 here, whatever the caller's
        exact = torch.bmm(head.weight[cand].float(), hidden[slots].float()[:, :, None])[:, :, 0]
        if getattr(head, "bias", None) is not None:
            exact = exact + head.bias[cand].float()
    exact = exact.double()
    keep = torch.ones_like(exact)
    keep[:, -1] = (top != targets[:, None]).all(1).double()  # the target once, if not in the top k
    # softmax mass relative to the rounded normaliser: the candidates' rounded share out, exact share in
    rounded = logits[slots[:, None], cand].to(dtype).double() - lse[:, None]
    rounded_share = (keep * rounded.exp()).sum(1)
    exact_share = (keep * (exact - lse[:, None]).exp()).sum(1)
    log_p = exact[:, -1] - lse - ((1 - rounded_share).clamp(min=0) + exact_share).log()
    greedy = top.gather(1, exact[:, :k].argmax(1, keepdim=True))[:, 0]
    return log_p, greedy


# ----------------------------------------------------------------------------- the packed forward


def window_limit(model) -> int | None:
    """Largest packed position span that full attention computes exactly (sliding windows)."""
    cfg = model.config.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(window)


def forward_rows(model, parts, batch: list[Row], *, device, pad_id: int):
    """(hidden states, the head's logits in its own dtype) at every row's head positions, [P, ...],
    in row order. ``parts`` is ``(decoder, head)`` (``tempering.train.models.causal_lm_parts``).
    Runs inside the caller's no_grad and autocast."""
    import numpy as np
    import torch

    decoder, head = parts
    width = len(batch[0].tokens)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(batch), width), dtype=np.int64)
    flat = []
    for b, row in enumerate(batch):
        ids[b, : len(row.tokens)] = row.tokens
        pos[b, : len(row.tokens)] = row.positions
        flat.extend(b * width + h for h in row.heads)
    if all(len(row.tokens) == row.context for row in batch):
        # Contexts only (every continuation is one token, BoolQ's " yes"/" no"): plain causal
        # attention, right padding, default positions; the kernel skips the masked half.
        kwargs = {}
    else:
        mask = torch.from_numpy(attention_mask(batch)).to(device)
        if model.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=model.dtype, device=device).masked_fill_(
                ~mask, torch.finfo(model.dtype).min)
        kwargs = {"attention_mask": mask, "position_ids": torch.from_numpy(pos).to(device)}
    hidden = decoder(input_ids=torch.from_numpy(ids).to(device), use_cache=False, **kwargs).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, torch.tensor(flat, device=device))
    return picked, head(picked)


def score_batch(model, parts, batch: list[Row], results: list, *, device, pad_id: int, refine_top: int,
                softmax_dtype, stats: Stats | None = None) -> None:
    """Score one batch of rows (:func:`forward_rows`, then :func:`head_logprobs`): each request's
    ``(logprob, is_greedy)`` lands in ``results`` at its request index; ``stats`` counts the work."""
    import torch

    hidden, logits = forward_rows(model, parts, batch, device=device, pad_id=pad_id)
    slots, targets, owner, order = [], [], [], []
    offset = 0
    for row in batch:
        for req, heads, conts in row.requests:
            slots.extend(offset + s for s in heads)
            targets.extend(conts)
            owner.extend([len(order)] * len(conts))
            order.append(req)
        offset += len(row.heads)
    slots_t = torch.tensor(slots, device=logits.device)
    targets_t = torch.tensor(targets, device=logits.device)
    owner_t = torch.tensor(owner, device=logits.device)
    lp, greedy = head_logprobs(logits, hidden, parts[1], slots_t, targets_t, refine_top, softmax_dtype)
    wrong = (greedy != targets_t).double()
    sums = torch.zeros(len(order), dtype=torch.float64, device=lp.device).index_add_(0, owner_t, lp)
    misses = torch.zeros(len(order), dtype=torch.float64, device=lp.device).index_add_(0, owner_t, wrong)
    for k, req in enumerate(order):
        results[req] = (float(sums[k]), bool(misses[k] == 0))
    if stats is not None:
        stats.forwards += 1
        stats.tokens += sum(len(r.tokens) for r in batch)
        stats.padded_tokens += len(batch) * len(batch[0].tokens)
        stats.head_positions += sum(len(r.heads) for r in batch)


def score_rows(model, parts, rows: list[Row], n: int, *, batch_tokens: int, device, pad_id: int,
               autocast=None, refine_top: int = REFINE_TOP, softmax_dtype=None, stats: Stats | None = None,
               pbar=None) -> list:
    """``[(logprob, is_greedy)]`` for request indices 0..n-1 found in the packed ``rows``
    (:func:`pack`), run in :func:`batches` of ``batch_tokens`` through ``parts`` (decoder + head).

    ``autocast``: the autocast context to run in (None: the model's own dtype). One region for all
    batches: autocast caches the bf16 copy of each weight for the region, so weights are cast once
    per call instead of once per forward (measured: 134M weights take ~0.3 s to cast on 2 cores).
    no_grad, not inference_mode: autocast does not cache under inference_mode. ``softmax_dtype``
    (None: float32) and ``refine_top``: see :func:`head_logprobs`."""
    import contextlib

    import torch

    softmax_dtype = softmax_dtype or torch.float32
    results: list = [None] * n
    with torch.no_grad(), (autocast if autocast is not None else contextlib.nullcontext()):
        for batch in batches(rows, batch_tokens):
            score_batch(model, parts, batch, results, device=device, pad_id=pad_id, refine_top=refine_top,
                        softmax_dtype=softmax_dtype, stats=stats)
            if pbar is not None:
                pbar.update(sum(len(r.requests) for r in batch))
    return results


# The probe runs in float32 when the model's half-precision weights take at most this many bytes
# (they are cast up in place for the probe and back after, exactly: every bf16/fp16 value is a
# float32 value); larger models are probed in their own dtype with HALF_PROBE_TOLERANCE.
FP32_PROBE_MAX_BYTES = 4 << 30
# In float32 the packed and plain forwards agree to rounding (observed < 1e-5 nats).
FP32_PROBE_TOLERANCE = 1e-3
# In bf16 the probe's arbitrary tokens have log-probs of -10 to -25 nats each, and the two paths'
# kernel shapes round differently: a trained 135M model in bf16 differs by up to ~0.5 nats over
# the probe's tokens with nothing wrong, so a half-precision probe can only catch gross errors.
HALF_PROBE_TOLERANCE = 0.15


def _half_dtypes() -> tuple:
    import torch

    return (torch.bfloat16, torch.float16)


def _upcast_half(model, max_bytes: int) -> list | None:
    """Cast ``model``'s bf16/fp16 parameters and buffers to float32 in place, for a probe; returns
    what :func:`_restore` needs to cast them back, or None (nothing cast) when the model has
    quantized weights (bitsandbytes: not plain floating tensors) or its half-precision tensors
    take more than ``max_bytes``."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    if any(t.dtype in (torch.uint8, torch.int8) or type(t).__module__.startswith("bitsandbytes") for t in tensors):
        return None
    todo = [t for t in tensors if t.dtype in _half_dtypes()]
    if not todo or sum(t.numel() * t.element_size() for t in todo) > max_bytes:
        return None
    saved = []
    for t in todo:
        saved.append((t, t.dtype))
        t.data = t.data.float()
    return saved


def _restore(saved: list) -> None:
    for t, dtype in saved:
        t.data = t.data.to(dtype)


def probe(model, parts, *, device, pad_id: int, batch_tokens: int = DEFAULT_BATCH_TOKENS,
          refine_top: int = REFINE_TOP, softmax_dtype=None, fp32_max_bytes: int = FP32_PROBE_MAX_BYTES) -> str | None:
    """None when the packed path (:func:`score_rows`) reproduces the model's plain forward on a
    small probe, else why not (a scaled or soft-capped head, a forward that is not the head of
    the decoder, an error).

    The probe checks structure (masks, positions, which head), so it runs in float32, where the
    two paths agree to rounding: a half-precision model (a DPO policy's frozen bf16 base) is cast
    up for the probe and back after, bit for bit (:data:`FP32_PROBE_MAX_BYTES`). Otherwise bf16's
    rounding on the probe's improbable tokens (up to ~0.5 nats on a trained model) would hide
    a real difference of that size, or reject a model with nothing wrong (a DPO policy was
    refused at 0.481 nats, the plain forward under accelerate's autocast wrapper, the packed one
    not: the probe now runs both in the same precision)."""
    import torch

    saved = _upcast_half(model, fp32_max_bytes)
    # A model a Trainer prepared under mixed precision has its forward wrapped in autocast by
    # accelerate (the original kept as ``_original_forward``): the plain forward would then run
    # in bf16 while the packed one does not. Compare like with like; the wrapper is put back.
    wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    if wrapped is not None:
        model.forward = model._original_forward
    try:
        vocab = model.get_input_embeddings().num_embeddings
        context = [(11 + 7 * i) % vocab for i in range(9)]
        conts = [[(5 + k) % vocab for k in c] for c in ([0, 1, 2], [0, 3], [4], [0, 1, 5], [0, 1, 2])]
        rows = pack([(context, c) for c in conts], 64, 64)
        try:
            got = score_rows(model, parts, rows, len(conts), batch_tokens=batch_tokens, device=device, pad_id=pad_id,
                             refine_top=refine_top, softmax_dtype=softmax_dtype)
            with torch.inference_mode():
                want = []
                for c in conts:
                    ids = torch.tensor([context + c[:-1]], device=device)
                    lp = model(ids).logits[0, -len(c):].float().log_softmax(-1)
                    want.append(float(lp[torch.arange(len(c)), torch.tensor(c, device=device)].sum()))
        except Exception as exc:  # noqa: BLE001 - any failure means: use the plain path
            return f"{type(exc).__name__}: {exc}"
        fp32 = saved is not None or not any(t.dtype in _half_dtypes() for t in model.parameters())
    finally:
        if saved is not None:
            _restore(saved)
        if wrapped is not None:
            model.forward = wrapped
    tol = FP32_PROBE_TOLERANCE if fp32 else HALF_PROBE_TOLERANCE
    worst = max(abs(g[0] - w) for g, w in zip(got, want))
    if worst > tol:
        return (f"packed log-likelihood differs from the plain forward by {worst:.3g} (> {tol}, "
                f"{'float32' if fp32 else 'half precision'})")
    return None


def packed_parts(model, **probe_args) -> tuple:
    """``((decoder, head), None)`` when the packed path applies to this causal LM, else ``(None, why
    not)``: no decoder + LM head layout, an attention implementation without 4D masks, or a failed
    :func:`probe` (``probe_args``: its keyword arguments)."""
    from tempering.train.models import causal_lm_parts

    parts = causal_lm_parts(model)
    impl = getattr(model.config, "_attn_implementation", None)
    if parts is None:
        return None, "no decoder + LM head layout (prompt-learning adapter?)"
    if impl not in ("sdpa", "eager"):
        return None, f"attention implementation {impl!r} takes no 4D mask"
    why = probe(model, parts, **probe_args)
    return (None, why) if why else (parts, None)


# ----------------------------------------------------------------------------- the lm-eval model


@dataclass
class Stats:
    """What the scorer did (cumulative): for benchmarks and logs."""

    requests: int = 0
    rows: int = 0
    forwards: int = 0  # packed forward passes (re-scoring's float32 ones included, as below)
    tokens: int = 0  # tokens in the packed rows (what the decoder body runs, padding excluded)
    padded_tokens: int = 0  # batch x width summed over forward passes (padding included)
    head_positions: int = 0  # positions that went through the LM head
    fallback_requests: int = 0  # scored by HFLM's own path
    rescored_groups: int = 0  # items (groups of choices) at a near-tie, scored again in float32
    rescored_requests: int = 0  # their requests
    rescore_seconds: float = 0.0  # the float32 re-scoring's share of ``seconds``
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_amp(value):
    """``mixed_precision_dtype`` -> a dtype name or None: "auto" = bf16 where the hardware
    computes it natively (AVX512-BF16/AMX CPUs, bf16 GPUs), else None (float32)."""
    if isinstance(value, str) and value.lower() in ("none", "float32", "fp32", ""):
        return None
    if value == "auto":
        from tempering.train.precision import choose_precision

        return "bfloat16" if choose_precision("auto").bf16 else None
    return value


def __getattr__(name: str):
    if name == "TemperingLM":
        cls = _define()
        globals()["TemperingLM"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define():
    import torch
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    from tempering import env
    from tempering.train.models import causal_lm_parts

    class TemperingLM(HFLM):
        """lm-eval's HFLM with shared-context, head-only-where-needed loglikelihood scoring.

        Extra arguments: ``batch_tokens`` (padded tokens per forward pass),
        ``mixed_precision_dtype="auto"`` (the default here), ``refine_top`` (see
        :func:`head_logprobs`; 0 = off) and ``rescore_tolerance`` (nats for a one-token
        continuation, times sqrt(tokens) for longer ones: :func:`choice_tolerance`; items at a
        near-tie within it are scored again in float32, see :func:`near_tie`; 0 = off).
        Everything else is HFLM's.
        """

        def __init__(self, pretrained, batch_tokens: int | str = DEFAULT_BATCH_TOKENS,
                     mixed_precision_dtype="auto", refine_top: int | str = REFINE_TOP,
                     rescore_tolerance: float | str = DEFAULT_RESCORE_TOLERANCE, **kwargs):
            super().__init__(pretrained=pretrained, mixed_precision_dtype=resolve_amp(mixed_precision_dtype),
                             **kwargs)
            self.batch_tokens = int(batch_tokens)
            self.refine_top = int(refine_top)
            self.rescore_tolerance = float(rescore_tolerance)
            if self.batch_tokens < 1:
                raise ValueError(f"batch_tokens must be >= 1 (got {batch_tokens})")
            if not self.rescore_tolerance >= 0:
                raise ValueError(f"rescore_tolerance must be >= 0 (got {rescore_tolerance})")
            self.stats = Stats()
            self._fast: bool | None = None  # decided by the first call's probe
            self._items: list | None = None  # per request of the current loglikelihood call: its item
            self._rolling = False  # inside loglikelihood_rolling

        # ---- progress bars: for people, not for CI logs (lm-eval passes disable=False itself)

        def _quiet(self, disable_tqdm: bool) -> bool:
            return bool(disable_tqdm) or env.is_ci() or self.rank != 0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            # The item each request belongs to (lm-eval's task and document: a multiple-choice
            # item's choices), for the near-tie check; HFLM's loglikelihood tokenizes, then calls
            # _loglikelihood_tokens with the requests in this order.
            self._items = [(r.task_name, r.doc_id) if r.doc_id is not None else None for r in requests]
            try:
                return super().loglikelihood(requests, disable_tqdm=self._quiet(disable_tqdm))
            finally:
                self._items = None

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            # Windows of a text are not choices of an item: nothing to decide, nothing to re-score
            # (the first windows of different texts share their one-token context).
            self._rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=self._quiet(disable_tqdm))
            finally:
                self._rolling = False

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=self._quiet(disable_tqdm))

        # ---- scoring

        def _autocast(self):
            dtype = self.mixed_precision_dtype
            return torch.autocast(device_type=self.device.type, dtype=dtype or torch.float32,
                                  enabled=dtype is not None)

        def _score_rows(self, rows: list[Row], parts, n: int, pbar=None, amp: bool = True):
            """[(logprob, is_greedy)] for request indices 0..n-1 found in ``rows`` (:func:`score_rows`)."""
            return score_rows(self.model, parts, rows, n, batch_tokens=self.batch_tokens, device=self.device,
                              pad_id=self.tokenizer.pad_token_id or 0, autocast=self._autocast() if amp else None,
                              refine_top=self.refine_top, softmax_dtype=self.softmax_dtype, stats=self.stats,
                              pbar=pbar)

        def _fast_parts(self):
            """(decoder, head) when the packed path applies to this model, else None (decided once,
            by :func:`packed_parts`: its probe is not part of the work in ``stats``)."""
            if self._fast is None:
                if self.backend != "causal":
                    why = f"backend {self.backend}"
                else:
                    _, why = packed_parts(self.model, device=self.device, pad_id=self.tokenizer.pad_token_id or 0,
                                          batch_tokens=self.batch_tokens, refine_top=self.refine_top,
                                          softmax_dtype=self.softmax_dtype)
                self._fast = why is None
                if why:
                    log.warning("tempering scoring: %s; scoring with lm-eval's hf path instead", why)
            return causal_lm_parts(self.model) if self._fast else None

        def _score(self, requests, parts, amp: bool = True, pbar=None, override_bs=None) -> tuple[list, int]:
            """[(logprob, is_greedy)] per request, and the packed rows used: the packed path where it
            applies (``parts``), HFLM's own code elsewhere; ``amp=False``: float32, no autocast."""
            if parts is None:
                results = self._hf_scores(requests, amp, override_bs)
                if pbar is not None:
                    pbar.update(len(requests))
                return results, 0
            limit = window_limit(self.model)
            fast, slow = [], []
            for i, (_, ctx, cont) in enumerate(requests):
                if limit is not None and min(len(ctx) + len(cont), self.max_length + 1) - 1 > limit:
                    slow.append(i)
                else:
                    fast.append(i)
            rows = pack([(requests[i][1], requests[i][2]) for i in fast], self.max_length,
                        max(self.batch_tokens, 1))
            results: list = [None] * len(requests)
            for k, res in enumerate(self._score_rows(rows, parts, len(fast), pbar, amp=amp)):
                results[fast[k]] = res
            if slow:
                self.stats.fallback_requests += len(slow) if amp else 0  # counted once, not when re-scored
                for i, res in zip(slow, self._hf_scores([requests[i] for i in slow], amp)):
                    results[i] = res
                if pbar is not None:
                    pbar.update(len(slow))
            return results, len(rows)

        def _hf_scores(self, requests, amp: bool = True, override_bs=None) -> list:
            """HFLM's own scoring, under this model's autocast or (``amp=False``) in float32."""
            saved = self.mixed_precision_dtype
            try:
                if not amp:
                    self.mixed_precision_dtype = None
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            finally:
                self.mixed_precision_dtype = saved

        def _near_ties(self, requests, results, items) -> list[int]:
            """Indices of the requests to score again, in request order: of each item at a
            near-tie under ``rescore_tolerance`` (per request: :func:`choice_tolerance` of its
            continuation's tokens), the choices that can decide it
            (:func:`near_tie_members`). Items are lm-eval's documents where known (``items``),
            else requests with the same context."""
            groups: dict = {}
            for i, (strings, ctx, _) in enumerate(requests):
                key = items[i] if items is not None and items[i] is not None else ("context", tuple(ctx))
                groups.setdefault(key, []).append(i)
            redo = []
            for members in groups.values():
                lengths = [choice_lengths(requests[i][0][1] if requests[i][0] else None) for i in members]
                tols = [choice_tolerance(self.rescore_tolerance, len(requests[i][2])) for i in members]
                tied = near_tie_members([results[i][0] for i in members], lengths, tols)
                if tied:
                    redo += [members[k] for k in tied]
                    self.stats.rescored_groups += 1
            return sorted(redo)

        def _rescoring(self) -> bool:
            """Re-score near-ties: only when the first pass ran under autocast on float32 weights."""
            return (self.rescore_tolerance > 0 and self.mixed_precision_dtype is not None
                    and self.model.dtype == torch.float32 and not self._rolling)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            items, self._items = self._items, None  # this call's only (not a nested one's)
            if items is not None and len(items) != len(requests):
                items = None
            if not requests:
                return []
            parts = self._fast_parts()
            started = time.perf_counter()
            if parts is None:
                self.stats.fallback_requests += len(requests)
                if not self._rescoring():
                    return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                         override_bs=override_bs)
            truncated = sum(len(ctx) + len(cont) > self.max_length + 1 for _, ctx, cont in requests)
            if truncated and parts is not None:
                log.warning("tempering scoring: %d request(s) longer than max_length %d: context cut from the left",
                            truncated, self.max_length)
            pbar = tqdm(total=len(requests), disable=self._quiet(disable_tqdm), desc="Scoring (tempering)")
            results, rows = self._score(requests, parts, pbar=pbar, override_bs=override_bs)
            pbar.close()
            if self._rescoring():
                redo = self._near_ties(requests, results, items)
                if redo:
                    t = time.perf_counter()
                    exact, _ = self._score([requests[i] for i in redo], parts, amp=False)
                    for i, res in zip(redo, exact):
                        results[i] = res
                    self.stats.rescored_requests += len(redo)
                    self.stats.rescore_seconds += time.perf_counter() - t
            for (request_str, _, _), answer in zip(requests, results):
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
            self.stats.requests += len(requests)
            self.stats.rows += rows
            self.stats.seconds += time.perf_counter() - started
            return results

    TemperingLM.__qualname__ = "TemperingLM"
    return register_model(NAME)(TemperingLM)


def main(argv=None) -> None:
    """lm-eval's command line with the ``tempering`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from tempering import scoring  # the importable module, also when run as __main__

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    assert scoring.TemperingLM is not None  # build and register the class
    cli_evaluate()


if __name__ == "__main__":
    main()
