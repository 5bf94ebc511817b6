"""Training data: from rows to the tensors a trainer sees, without trl or peft.

Owns the tokenizer (:func:`load_tokenizer`, :func:`tokenizer_hash`), chat rendering and our own
tokenization: :func:`tokenize_conversation` / :func:`tokenize_sft` (every assistant turn in the
loss, end-of-turn token included, nothing else; cached under :func:`cache_root`),
:func:`tokenize_preference` / :func:`dpo_truncate` (a preference pair exactly as TRL's DPO
trainer tokenizes and truncates it), packing (:func:`pack_sft`: best-fit decreasing, attention
kept per conversation; :func:`pack_text`: continued pre-training blocks), the packed collator
(:func:`packed_collator`), the held-out split (:func:`split_eval`) and TRL's preference format
(:func:`dpo_dataset`).

validate, evaluate and the scorecard tokenize through this module, so they check and score
exactly what training sees; it imports transformers, datasets and torch inside functions only.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from tempering import TemperingError
from tempering.io import content_id, hash_path, resolve_model_dir, write_json

CACHE_ENV = "TEMPERING_CACHE_DIR"
DEFAULT_CACHE = ".cache/tempering"
# Bumped when the tokenization code changes meaning, so stale caches are not reused.
TOKENIZE_VERSION = 1


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json")


def tokenizer_hash(folder: str | os.PathLike) -> str:
    folder = resolve_model_dir(folder)
    parts = {name: hash_path(folder / name) for name in TOKENIZER_FILES if (folder / name).exists()}
    return content_id(parts, 32)


def load_tokenizer(folder: str | os.PathLike, chat_template: str | None = None):
    """Tokenizer from a model folder (pointers followed); ``chat_template`` overrides its template."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(folder)
    if not folder.exists():
        raise TemperingError(f"{folder}: model folder not found")
    tok = AutoTokenizer.from_pretrained(folder)
    if chat_template:
        tok.chat_template = chat_template
    if tok.chat_template is None:
        raise TemperingError(f"{folder}: the tokenizer has no chat template (set sft.chat_template)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _render(tokenizer, messages, *, add_generation_prompt: bool, chat_template: str | None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors: template raise_exception etc.
        raise ValueError(f"chat template failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def assistant_char_spans(tokenizer, messages: list[dict], chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return (text, [(start, end)] character spans of every assistant turn).

    Prefix trick: for assistant turn i, ``render(messages[:i], add_generation_prompt=True)`` is the
    text before the reply and ``render(messages[:i+1])`` the text through it; the difference is the
    reply plus the template's end-of-turn marker (``<|im_end|>`` for ChatML). Trailing whitespace
    after the marker (ChatML's newline) is template glue, not trained.
    """
    text = _render(tokenizer, messages, add_generation_prompt=False, chat_template=chat_template)
    spans = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template) if i else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, chat_template=chat_template)
        if not text.startswith(through) or not through.startswith(before):
            raise ValueError("the chat template does not render conversations prefix-stably "
                             "(it rewrites earlier turns), so assistant spans cannot be located")
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None,
                          chat_template: str | None = None) -> dict:
    """``{"input_ids", "labels"}`` for one conversation: labels are -100 except on assistant tokens
    (every assistant turn, end-of-turn token included). Truncation keeps the start."""
    text, spans = assistant_char_spans(tokenizer, messages, chat_template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [-100] * len(ids)
    j = 0
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= start < spans[j][1]:
            labels[k] = ids[k]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def tokenize_preference(tokenizer, prompt: list[dict], chosen: str, rejected: str,
                        chat_template: str | None = None) -> dict:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of one pair, tokenized the way TRL's DPO
    trainer does (conversational rows): the prompt rendered with the generation prompt, each answer
    as the tokens of prompt + answer after their common prefix with the prompt. No truncation:
    :func:`dpo_truncate` applies ``dpo.max_prompt_length`` / ``dpo.max_length`` as training does."""
    def ids(messages: list[dict], generation: bool) -> list[int]:
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                add_generation_prompt=generation, chat_template=chat_template)
        except Exception as exc:  # jinja errors: template raise_exception etc.
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"chat template failed: {detail}") from None
        return list(out["input_ids"])

    prompt_ids = ids(prompt, True)
    full = {k: ids(prompt + [{"role": "assistant", "content": text}], False)
            for k, text in (("chosen", chosen), ("rejected", rejected))}

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    cut = min(common(prompt_ids, full["chosen"]), common(prompt_ids, full["rejected"]))
    return {"prompt_ids": prompt_ids[:cut], "chosen_ids": full["chosen"][cut:], "rejected_ids": full["rejected"][cut:]}


def dpo_truncate(enc: dict, max_length: int, max_prompt_length: int) -> dict:
    """Apply DPO's truncation to :func:`tokenize_preference` output: the prompt keeps its last
    ``max_prompt_length`` tokens (see ``tempering.train.dpo.TemperingDPOTrainer``), then prompt +
    answer keeps its first ``max_length`` (TRL's collator, ``keep_start``)."""
    prompt = enc["prompt_ids"][-max_prompt_length:]
    room = max(0, max_length - len(prompt))
    return {"prompt_ids": prompt, "chosen_ids": enc["chosen_ids"][:room], "rejected_ids": enc["rejected_ids"][:room]}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def tokenize_sft(rows: list[dict], tokenizer, *, max_length: int, data_hash: str, tokenizer_id: str,
                 chat_template: str | None = None, source: str = "sft.jsonl") -> tuple[Any, dict]:
    """Tokenize SFT rows into a ``datasets.Dataset`` (input_ids, labels, length); cached under
    ``.cache/tempering/tokenized/`` by (data, tokenizer, template, max_length), so a re-run that only
    changes e.g. the learning rate skips this. Returns (dataset, stats)."""
    from datasets import Dataset

    template = chat_template or tokenizer.chat_template
    key = content_id({"v": TOKENIZE_VERSION, "data": data_hash, "tokenizer": tokenizer_id,
                      "template": template, "max_length": max_length}, 24)
    path = cache_root() / "tokenized" / f"sft-{key}.json"
    if path.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError, KeyError):
            blob = json.loads(path.read_text())
            stats = dict(blob["stats"], cache="hit")
            return Dataset.from_dict(blob["columns"]), stats
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    truncated = dropped = 0
    for n, row in enumerate(rows, 1):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TemperingError(f"{source}: row {n}: messages: expected a non-empty list of messages")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise TemperingError(f"{source}: row {n}: messages: no assistant turn to train on")
        try:
            full = tokenize_conversation(tokenizer, messages, None, chat_template)
        except (ValueError, TypeError, KeyError) as exc:
            raise TemperingError(f"{source}: row {n}: messages: {exc}") from None
        if len(full["input_ids"]) > max_length:
            truncated += 1
        ids, labels = full["input_ids"][:max_length], full["labels"][:max_length]
        if all(label == -100 for label in labels):
            dropped += 1  # the prompt alone fills max_length: nothing to learn
            continue
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        columns["length"].append(len(ids))
    if not columns["input_ids"]:
        raise TemperingError(f"{source}: no trainable rows (empty, or every prompt fills max_length={max_length})")
    stats = {"rows": len(rows), "examples": len(columns["input_ids"]), "truncated": truncated,
             "dropped_no_target": dropped, "tokens": sum(columns["length"]),
             "target_tokens": sum(sum(1 for x in lab if x != -100) for lab in columns["labels"])}
    write_json(path, {"stats": stats, "columns": columns})
    return Dataset.from_dict(columns), dict(stats, cache="miss")


def pack_text(rows: list[dict], tokenizer, block_size: int, source: str = "text.jsonl") -> tuple[Any, dict]:
    """Concatenate text rows (EOS between documents) and cut into ``block_size`` blocks.
    A final partial block is kept when at least half full. Labels = input_ids (every token)."""
    from datasets import Dataset

    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for n, row in enumerate(rows, 1):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise TemperingError(f"{source}: row {n}: text: expected a non-empty string")
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    if blocks and len(blocks[-1]) < block_size // 2 and len(blocks) > 1:
        blocks.pop()
    if not blocks:
        raise TemperingError(f"{source}: no text to train on")
    ds = Dataset.from_dict({"input_ids": blocks, "length": [len(b) for b in blocks]})
    return ds, {"rows": len(rows), "blocks": len(blocks), "tokens": sum(len(b) for b in blocks)}


def pack_sft(dataset, block_size: int) -> tuple[Any, dict]:
    """Pack tokenized conversations into blocks of at most ``block_size`` tokens, best-fit
    decreasing (each goes into the fullest block it still fits in; none is split). Each block keeps
    its conversations' lengths in ``seq_lengths`` so the collator restarts positions at every
    conversation and attention stays inside it."""
    import bisect

    from datasets import Dataset

    lengths = list(dataset["length"])
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    blocks: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free space, block index)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, b = room.pop(k)
        else:
            free, b = block_size, len(blocks)
            blocks.append([])
        blocks[b].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, b))
    ids, labels = dataset["input_ids"], dataset["labels"]
    out: dict[str, list] = {"input_ids": [], "labels": [], "seq_lengths": [], "length": []}
    for members in blocks:
        members.sort()  # conversation order inside a block does not matter; keep it stable
        out["input_ids"].append([t for i in members for t in ids[i]])
        out["labels"].append([t for i in members for t in labels[i]])
        out["seq_lengths"].append([lengths[i] for i in members])
        out["length"].append(sum(lengths[i] for i in members))
    total = sum(out["length"])
    stats = {"blocks": len(blocks), "fill": round(total / (len(blocks) * block_size), 4) if blocks else 0.0}
    return Dataset.from_dict(out), stats


def packed_collator(pad_token_id: int):
    """Collate packed blocks: positions restart at each conversation and there is no attention
    mask, so transformers builds a block-diagonal causal mask per row (attention never crosses
    conversations). Unlike TRL's padding-free collator the batch stays [batch, block] (on CPU,
    without varlen flash attention, one flattened sequence would make attention quadratic in the
    whole batch)."""
    import torch

    def collate(examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        pos = torch.zeros((len(examples), width), dtype=torch.long)
        for r, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[r, :n] = torch.tensor(e["input_ids"])
            labels[r, :n] = torch.tensor(e["labels"])
            pos[r, :n] = torch.cat([torch.arange(k) for k in e["seq_lengths"]])
            labels[r, :n][pos[r, :n] == 0] = -100  # never predict a conversation's first token from the previous one
            if n < width:  # padding continues the last conversation's positions (never attended to)
                pos[r, n:] = torch.arange(int(pos[r, n - 1]) + 1, int(pos[r, n - 1]) + 1 + width - n)
        return {"input_ids": ids, "labels": labels, "position_ids": pos}

    return collate


def split_eval(dataset, share: float, seed: int):
    """(train, eval) with ``share`` of the rows held out (at least one each), reproducible."""
    if share <= 0:
        return dataset, None
    n_eval = max(1, round(len(dataset) * share))
    if n_eval >= len(dataset):
        raise TemperingError(f"eval_share {share}: {len(dataset)} rows leave nothing to train on")
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def dpo_dataset(rows: list[dict], source: str = "preference.jsonl"):
    """Internal preference rows -> TRL's conversational preference format."""
    from datasets import Dataset

    out = {"prompt": [], "chosen": [], "rejected": []}
    for n, row in enumerate(rows, 1):
        prompt = row.get("prompt")
        if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
            raise TemperingError(f"{source}: row {n}: prompt: expected a non-empty list of messages")
        for field in ("chosen", "rejected"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise TemperingError(f"{source}: row {n}: {field}: expected a non-empty string")
        out["prompt"].append([{"role": m["role"], "content": m["content"]} for m in prompt])
        out["chosen"].append([{"role": "assistant", "content": row["chosen"]}])
        out["rejected"].append([{"role": "assistant", "content": row["rejected"]}])
    if not out["prompt"]:
        raise TemperingError(f"{source}: no preference rows to train on")
    return Dataset.from_dict(out)

