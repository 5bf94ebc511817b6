"""Held-out preference pairs: per-pair log-probs scored exactly as DPO trains, and the per-pair file.

One owner for two stages. The dpo stage scores its held-out pairs (whole prompts never trained on)
with the base, the SFT model (its reference) and the DPO policy, and writes them with
:func:`write_heldout` to ``<dpo out>/heldout.jsonl``; ``evaluate`` scores the exported candidate on
the same pairs with the same function, the same tokenization and truncation (``tempering.train.data``:
``tokenize_preference`` + ``dpo_truncate`` at the dpo stage's lengths) and the same autocast precision,
all read from that file's ``scoring`` record, so the candidate's margins pair with the SFT model's
pair by pair. The gate's ``alignment`` check compares them.

A row of the file::

    {"id", "source", "prompt", "chosen", "rejected", "tokens": <hash of the truncated token ids>,
     "logp": {"base": {"chosen", "rejected"}, "sft": {...}, "dpo": {...}}}

``tokens`` lets a later reader prove it encodes the pair exactly as the dpo stage did (a different
tokenizer or chat template would score different text: its margins would not pair).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from tempering import TemperingError
from tempering.io import content_id, read_jsonl, write_jsonl

log = logging.getLogger("tempering.preference")

HELDOUT_FILE = "heldout.jsonl"
MODELS = ("base", "sft", "dpo")
# Bumped when what a score means changes (part of evaluate's alignment cache key).
# 2: batched, right-padded (bf16 rounding differs from 1's one-at-a-time). 3: the prompt runs once
# per pair (a packed row: prompt, then both answers under a 4D mask) and the LM head only at answer
# positions, its top logits recomputed in float32 under bf16: same values in float32 up to summation
# order, different bf16 rounding.
SCORING_VERSION = 3
ANSWERS = ("chosen_ids", "rejected_ids")


def encode_pair(tokenizer, row: dict, max_length: int, max_prompt_length: int) -> dict:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` as DPO trains on the pair: TRL's
    conversational tokenization, the prompt's last ``max_prompt_length`` tokens, prompt + answer
    cut to ``max_length``."""
    from tempering.train.data import dpo_truncate, tokenize_preference

    return dpo_truncate(tokenize_preference(tokenizer, row["prompt"], row["chosen"], row["rejected"]),
                        max_length, max_prompt_length)


def tokens_id(enc: dict) -> str:
    """A hash of a pair's truncated token ids (what a score was computed on)."""
    return content_id([enc["prompt_ids"], enc["chosen_ids"], enc["rejected_ids"]], 16)


def completion_logps(model, tokenizer, rows: list[dict], *, max_length: int, max_prompt_length: int,
                     precision, batch_size: int = 16, stats=None) -> list[tuple[float, float]]:
    """Summed log p(chosen | prompt) and log p(rejected | prompt) per pair, tokenized and truncated
    exactly as DPO trains (:func:`encode_pair`), under ``precision``'s autocast (a
    ``tempering.train.precision.Precision``); the log normaliser in float32, sums in float64.

    The prompt runs once per pair: each pair is one packed row of ``tempering.scoring`` (the prompt,
    then the chosen and rejected answers as a prefix tree, a 4D mask letting each answer token see
    the prompt and its own answer only, positions restarting after the prompt; pairs of the same
    prompt share a row while it stays within the longest one-pair row), and the LM head runs only
    at the positions that predict an answer token (:func:`tempering.scoring.score_rows`, the code
    that scores benchmarks). Under bf16/fp16 autocast the target's logit and each position's top
    :data:`tempering.scoring.REFINE_TOP` are recomputed in float32 from the hidden state
    (:func:`tempering.scoring.head_logprobs`), which brings the scores closer to float32's than a
    plain log-softmax of half-precision logits. Rows run ``batch_size`` x ``max_length`` padded
    tokens per forward pass at most. An empty (fully truncated) answer scores 0.0.

    Models the packed path does not fit (no decoder + LM head layout, an attention implementation
    without 4D masks, a head the float32 probe does not reproduce: ``scoring.packed_parts``), and
    pairs longer than a sliding attention window or with an empty prompt, are scored by
    :func:`_plain_logps` (two full sequences per pair), the reference. ``stats``: a
    ``tempering.scoring.Stats`` that counts the packed path's work (tests, benchmarks)."""
    from tempering import scoring

    device = next(model.parameters()).device
    amp = precision.autocast_dtype
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encs = [encode_pair(tokenizer, row, max_length, max_prompt_length) for row in rows]
    sums = [[0.0, 0.0] for _ in rows]
    model.eval()
    parts, why = scoring.packed_parts(model, device=device, pad_id=pad)
    if why:
        log.warning("held-out pairs: %s; scoring two full sequences per pair instead", why)
    limit = scoring.window_limit(model) if parts is not None else None
    shared, plain = [], []
    for i, enc in enumerate(encs):
        span = len(enc["prompt_ids"]) + max(len(enc[key]) for key in ANSWERS) - 1
        fits = parts is not None and enc["prompt_ids"] and (limit is None or span <= limit)
        (shared if fits else plain).append(i)
    requests = [(i, side, encs[i][key]) for i in shared for side, key in enumerate(ANSWERS) if encs[i][key]]
    if requests:
        import torch

        pairs = [(encs[i]["prompt_ids"], ids) for i, _, ids in requests]
        # No truncation here (encode_pair did it): room for the longest prompt + answer. A row holds
        # any one pair whole, so a pair's two answers share its prompt; another pair of the same
        # prompt joins the row while it stays within that length (else, it may start a new row
        # between its answers: the scores are the same wherever an answer lands).
        longest = max(len(c) + len(a) for c, a in pairs)
        row_tokens = max(sum(len(encs[i][key]) for key in ("prompt_ids", *ANSWERS)) for i in shared)
        packed = scoring.pack(pairs, longest, row_tokens)
        ctx = torch.autocast(device_type=device.type, dtype=amp) if amp else None
        scored = scoring.score_rows(model, parts, packed, len(pairs), batch_tokens=max(1, batch_size) * max_length,
                                    device=device, pad_id=pad, autocast=ctx, stats=stats)
        for (i, side, _), (logp, _) in zip(requests, scored):
            sums[i][side] = logp
    for i, pair in zip(plain, _plain_logps(model, [encs[i] for i in plain], pad, amp, batch_size)):
        sums[i] = list(pair)
    return [(c, r) for c, r in sums]


def _plain_logps(model, encs: list[dict], pad: int, amp, batch_size: int) -> list[tuple[float, float]]:
    """:func:`completion_logps` without sharing: two full sequences per pair (prompt + chosen,
    prompt + rejected), ``batch_size`` at a time, sorted by length and right-padded (a causal
    model's logits at a real token do not depend on the padding after it); the full logits at every
    position, the float32 log-softmax at the answer positions only."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    seqs = []  # (pair index, side, token ids, first answer position)
    for i, enc in enumerate(encs):
        for side, key in enumerate(ANSWERS):
            seqs.append((i, side, enc["prompt_ids"] + enc[key], len(enc["prompt_ids"])))
    sums = [[0.0, 0.0] for _ in encs]
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))
    for start in range(0, len(order), max(1, batch_size)):
        batch = [seqs[k] for k in order[start:start + max(1, batch_size)]]
        width = max(len(ids) for _, _, ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for b, (_, _, row_ids, _) in enumerate(batch):
            ids[b, :len(row_ids)] = torch.tensor(row_ids, device=device)
            mask[b, :len(row_ids)] = 1
        ctx = torch.autocast(device_type=device.type, dtype=amp) if amp else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            logits = model(input_ids=ids, attention_mask=mask).logits
        for b, (pair, side, row_ids, first) in enumerate(batch):
            # The logits at position t predict token t + 1: answer tokens first..len-1.
            rows_logits = logits[b, first - 1:len(row_ids) - 1].float()
            targets = ids[b, first:len(row_ids)]
            sums[pair][side] = float(torch.log_softmax(rows_logits, -1).gather(-1, targets[:, None]).sum())
    return [(c, r) for c, r in sums]


def pair_id(row: dict, index: int) -> str:
    """A held-out pair's id: the row's own (a content hash from validate), else its position."""
    return str(row.get("id") or f"heldout-{index}")


def heldout_rows(rows: list[dict], scores: dict[str, list[tuple[float, float]]], tokenizer, *, max_length: int,
                 max_prompt_length: int) -> list[dict]:
    """The per-pair records of :data:`HELDOUT_FILE`: each pair, its token hash and every model's
    log-probs."""
    out = []
    for i, row in enumerate(rows):
        enc = encode_pair(tokenizer, row, max_length, max_prompt_length)
        out.append({"id": pair_id(row, i), "source": row.get("source"), "prompt": row["prompt"],
                    "chosen": row["chosen"], "rejected": row["rejected"], "tokens": tokens_id(enc),
                    "logp": {who: {"chosen": v[i][0], "rejected": v[i][1]} for who, v in scores.items()}})
    return out


def write_heldout(folder: str | Path, rows: list[dict]) -> Path:
    """Write the per-pair file into ``folder`` atomically."""
    path = Path(folder) / HELDOUT_FILE
    write_jsonl(path, rows)
    return path


def read_heldout(path: str | Path) -> list[dict]:
    """The per-pair file, checked: every row has a unique id, the pair's text and finite log-probs
    for every model; errors name the file, the line and the field."""
    path = Path(path)
    rows = read_jsonl(path)
    seen: set[str] = set()
    for line, row in enumerate(rows, 1):
        where = f"{path}: line {line}"
        for key in ("id", "prompt", "chosen", "rejected", "tokens", "logp"):
            if row.get(key) in (None, ""):
                raise TemperingError(f"{where}: field {key}: missing")
        if row["id"] in seen:
            raise TemperingError(f"{where}: field id: {row['id']!r} repeats an earlier pair")
        seen.add(row["id"])
        for who in MODELS:
            for side in ("chosen", "rejected"):
                value = (row["logp"].get(who) or {}).get(side) if isinstance(row["logp"], dict) else None
                try:
                    ok = value is not None and math.isfinite(float(value))
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise TemperingError(f"{where}: field logp.{who}.{side}: not a finite log-probability "
                                         f"(got {value!r})")
    return rows


def margin(logp: dict) -> float:
    """log p(chosen) - log p(rejected)."""
    return float(logp["chosen"]) - float(logp["rejected"])
