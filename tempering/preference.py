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

import math
from pathlib import Path

from tempering import TemperingError
from tempering.io import content_id, read_jsonl, write_jsonl

HELDOUT_FILE = "heldout.jsonl"
MODELS = ("base", "sft", "dpo")
# Bumped when what a score means changes (part of evaluate's alignment cache key).
SCORING_VERSION = 2  # 2: batched, right-padded (bf16 rounding differs from 1's one-at-a-time)


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
                     precision, batch_size: int = 16) -> list[tuple[float, float]]:
    """Summed log p(chosen | prompt) and log p(rejected | prompt) per pair, tokenized and truncated
    exactly as DPO trains (:func:`encode_pair`), under ``precision``'s autocast (a
    ``tempering.train.precision.Precision``); float32 log-softmax.

    Sequences (two per pair) run ``batch_size`` at a time, sorted by length and right-padded: a
    causal model's logits at a real token do not depend on the padding after it, and the log-softmax
    runs only at the answer positions, not at the prompt's."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    amp = precision.autocast_dtype
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = []  # (pair index, side, token ids, first answer position)
    for i, row in enumerate(rows):
        enc = encode_pair(tokenizer, row, max_length, max_prompt_length)
        for side, key in enumerate(("chosen_ids", "rejected_ids")):
            seqs.append((i, side, enc["prompt_ids"] + enc[key], len(enc["prompt_ids"])))
    sums = [[0.0, 0.0] for _ in rows]
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))
    model.eval()
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
