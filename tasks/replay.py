"""Stage ``replay``: the base model's own behaviour, for SFT and CPT to rehearse against forgetting.

    python -m tasks.replay --base models/base --out data/replay --metrics metrics/replay.json

Fine-tuning on a narrow domain pulls the model away from its general behaviour; rehearsing
that behaviour while it learns keeps it close (replay, as in continual learning). When the user
has no general data, the model's own outputs are the cheapest faithful source: they are, by
construction, what it already does. This stage writes two sources, each listed in
``validate.sources`` like any other file, so validated, deduplicated and decontaminated against
the benchmarks like any other data:

- ``--out/sft.jsonl`` (OpenAI ``messages`` rows): the base's own answers to a bank of general
  prompts. ``sft.replay`` mixes a share of it into SFT.

  - Prompts: ``replay.prompts``, JSON lines of ``{id, category, prompt}``. The shipped bank
    (``tempering/replay_prompts.jsonl``, 155 prompts written for tempering: explanations,
    how-tos, advice, short writing, reasoning, code) overlaps no benchmark, and a test checks it
    against every shipped set. ``replay.n`` takes the first N.
  - Answers: sampled from the base at ``replay.temperature`` (1.0: its own distribution, so SFT's
    loss on them is the KL from the base plus a constant; 0 = greedy) and ``replay.top_p``, with
    a fixed ``replay.seed``; at most ``replay.max_new_tokens`` new tokens, in left-padded batches of
    ``replay.batch_size``, under bf16 autocast where the CPU or GPU has it.

- ``--out/text.jsonl`` (``{"text"}`` rows, validate's ``text`` format): plain text for
  ``cpt.replay``, the base's own free-running samples. ``replay.text.n`` samples, each
  conditioned on the ``replay.text.start`` token (the pre-training document separator; null = the
  tokenizer's BOS) and one of the short neutral openings ``replay.text.starts`` (cycled; at most
  3 words, so no opening can carry a benchmark item), sampled at ``temperature`` / ``top_p``
  with a fixed ``seed``, between ``min_new_tokens`` and ``max_new_tokens`` new tokens, stopping
  at the end-of-text or separator token. A row is the opening plus its continuation.
  Generated only when it will be read: ``replay.enabled``, ``cpt.enabled``,
  ``cpt.replay.share > 0`` and ``cpt.replay.source`` naming this file. Otherwise (the default
  run: CPT is off) the file is empty (an ``allow_empty`` source) and no time is spent on it;
  ``--metrics`` (``text.generated``, ``text.reason``) says which, and why.

Cache: answers and samples are stored under ``<cache>/replay/`` by (base model hash, prompts
hash or text knobs, generation params, precision, torch version). A re-run with the same base
and knobs generates nothing, and ``meta.json`` / ``--metrics`` say ``cache: hit``.
``replay.enabled: false`` writes both files empty, so the DAG keeps its shape.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from tempering import TemperingError
from tempering.cli import stage_main
from tempering.config import Params, ReplayParams
from tempering.io import (atomic_path, content_id, hash_path, read_json_or_none, read_jsonl, resolve_model_dir,
                          provenance, write_json, write_jsonl, write_meta)

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py). The two cpt keys decide
# whether the text replay is needed at all (CPT is off by default: no time spent on it then).
PARAMS = ("replay", "cpt.enabled", "cpt.replay")

# Bumped when the generation code changes what an answer / a text sample is (part of the cache key).
GENERATION_VERSION = 1
TEXT_GENERATION_VERSION = 1
TEXT_FILE = "text.jsonl"


def load_prompts(cfg: ReplayParams) -> list[dict]:
    """The prompt bank, validated: every row needs a unique ``id`` and a non-empty ``prompt``."""
    path = Path(cfg.prompts)
    if not path.is_file():
        raise TemperingError(f"{path}: replay prompt bank not found (replay.prompts)")
    rows = read_jsonl(path)
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise TemperingError(f"{path}: row {n}: prompt: expected a non-empty string")
        rid = str(row.get("id", ""))
        if not rid or rid in seen:
            raise TemperingError(f"{path}: row {n}: id: expected a unique non-empty id (got {rid!r})")
        seen.add(rid)
    if not rows:
        raise TemperingError(f"{path}: the replay prompt bank is empty")
    return rows[: cfg.n] if cfg.n else rows


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             amp_dtype=None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Chat answers, one per prompt: greedy at ``temperature`` 0, else sampled (each batch seeded
    from ``seed`` and its position, so the same knobs give the same answers). Left-padded batches
    give each row the tokens it gets alone, up to float rounding; prompts are batched by length so
    padding stays small."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompts[i]}],
                                                   add_generation_prompt=True, tokenize=False) for i in idx]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            amp = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                        if temperature > 0 else {"do_sample": False})
            if temperature > 0:
                torch.manual_seed(seed * 1_000_003 + start)
            with torch.no_grad(), amp:
                out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     **sampling)
            for i, ids in zip(idx, out[:, enc["input_ids"].shape[1]:]):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return answers


def text_needed(params: Params, out: str) -> tuple[bool, str]:
    """Whether the text replay will be read (and so generated), and why: only when CPT trains
    with a replay share taken from this stage's ``text.jsonl``."""
    if not params.replay.enabled:
        return False, "replay.enabled is false"
    if not params.cpt.enabled:
        return False, "cpt.enabled is false: no CPT to mix text replay into"
    mix = params.cpt.replay
    if mix.share <= 0:
        return False, "cpt.replay.share is 0"
    target = Path(out) / TEXT_FILE
    if Path(mix.source).resolve() != target.resolve():
        return False, f"cpt.replay.source is {mix.source}, not this stage's {target.as_posix()}"
    return True, f"cpt.enabled with cpt.replay.share {mix.share} from {mix.source}"


def start_token_id(tokenizer, start: str | None) -> int | None:
    """The token id text samples are conditioned on: ``start`` (a token of the vocabulary), or
    the tokenizer's BOS (its EOS when it has none) for null."""
    if start is None:
        return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    if start not in vocab:
        raise TemperingError(f"replay.text.start: {start!r} is not a token of the base model's tokenizer "
                             "(null = its BOS token)")
    return vocab[start]


def sample_text(model, tokenizer, n: int, *, start_id: int | None, starts: tuple[str, ...] | list[str],
                max_new_tokens: int, min_new_tokens: int, temperature: float, top_p: float, seed: int,
                batch_size: int, amp_dtype=None) -> list[dict]:
    """``n`` free-running samples ``{"opening", "text"}``: sample ``i`` continues the start token
    and opening ``starts[i % len(starts)]``; the text is the opening plus the continuation.

    Left-padded batches of ``batch_size``; each batch draws from its own torch seed (derived from
    ``seed`` and its first index), so the samples depend only on the knobs, never on what ran
    before. Generation stops at the end-of-text or the start token (a new document)."""
    import random

    import torch

    device = next(model.parameters()).device
    prefix = [start_id] if start_id is not None else []
    openings = [starts[i % len(starts)] for i in range(n)]
    encoded = {o: prefix + tokenizer(o, add_special_tokens=False)["input_ids"] for o in set(openings)}
    empty = [o for o, ids in encoded.items() if not ids]
    if empty:
        raise TemperingError("replay.text.starts: an empty opening needs a start token (replay.text.start)")
    stop = sorted({t for t in (tokenizer.eos_token_id, start_id) if t is not None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    rows: list[dict] = []
    for first in range(0, n, batch_size):
        batch = openings[first:first + batch_size]
        width = max(len(encoded[o]) for o in batch)
        ids = torch.tensor([[pad] * (width - len(encoded[o])) + encoded[o] for o in batch], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[o])) + [1] * len(encoded[o]) for o in batch], device=device)
        amp = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), amp:
            torch.manual_seed(random.Random(f"{seed}:{first}").getrandbits(63))
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=top_p, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                 eos_token_id=stop, pad_token_id=pad)
        for row, opening in enumerate(batch):
            skip = width - len(encoded[opening]) + len(prefix)  # padding and the start token
            rows.append({"opening": opening,
                         "text": tokenizer.decode(out[row, skip:], skip_special_tokens=True).strip()})
    return rows


def run(params: Params, base: str, out: str, metrics: str | None = None) -> dict:
    started = time.time()
    cfg = params.replay
    need_text, text_reason = text_needed(params, out)
    # What this stage's output depends on besides `replay`, recorded beside it.
    meta_params = {"replay": cfg.model_dump(mode="json"), "cpt.enabled": params.cpt.enabled,
                   "cpt.replay": params.cpt.replay.model_dump(mode="json")}
    if not cfg.enabled:
        summary = {"enabled": False, "rows": 0,
                   "text": {"generated": False, "reason": text_reason, "rows": 0}}
        with atomic_path(out) as tmp:
            tmp.mkdir()
            write_jsonl(tmp / "sft.jsonl", [])
            write_jsonl(tmp / TEXT_FILE, [])
            write_meta(tmp, stage="replay", params=meta_params, inputs={}, started=started, extra=summary,
                       reproducible=True)
        if metrics:
            write_json(metrics, {**summary, "wall_time_s": round(time.time() - started, 2),
                                 "provenance": provenance(started)})
        return {"out": out, **summary}

    import torch

    from tempering.train.data import cache_root
    from tempering.train.models import load_for_inference
    from tempering.train.precision import choose_precision, quiet_transformers, setup_torch

    base_dir = resolve_model_dir(base)
    if not (base_dir / "config.json").exists():
        raise TemperingError(f"{base}: base model folder not found (run the base_model stage)")
    prompts = load_prompts(cfg)
    precision = choose_precision("auto")
    base_hash = hash_path(base_dir)
    loaded: list = []

    def model_and_tokenizer():
        """Loaded once, and only when something is not cached."""
        if not loaded:
            setup_torch()
            quiet_transformers()
            # the model's own attention kernel: cached answers stay valid (kernels round differently)
            model, tokenizer = load_for_inference(base_dir, precision.device, attention=None)
            loaded.extend([model, tokenizer])
        return loaded

    key = {"v": GENERATION_VERSION, "base": base_hash, "prompts": content_id(prompts, 32),
           "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "precision": precision.name,
           "torch": torch.__version__,
           **({"temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed} if cfg.temperature > 0 else {})}
    cache_file = cache_root() / "replay" / f"answers-{content_id(key, 32)}.json"
    cached = read_json_or_none(cache_file)
    hit = isinstance(cached, dict) and cached.get("key") == key and len(cached.get("answers", [])) == len(prompts)
    if hit:
        answers = cached["answers"]
    else:
        model, tokenizer = model_and_tokenizer()
        answers = generate(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, amp_dtype=precision.autocast_dtype,
                           temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
        write_json(cache_file, {"key": key, "answers": answers})
    rows = [{"id": p["id"], "category": p.get("category"),
             "messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": a}]}
            for p, a in zip(prompts, answers)]
    # An empty answer stays in: validate quarantines it (empty_field) with its reason, nothing lost.
    empty = sum(1 for a in answers if not a)

    texts: list[dict] = []
    text_summary: dict = {"generated": False, "reason": text_reason, "rows": 0}
    inputs = {"base": base_hash, "prompts": key["prompts"]}
    if need_text:
        tk = cfg.text
        text_key = {"v": TEXT_GENERATION_VERSION, "base": base_hash, "text": tk.model_dump(mode="json"),
                    "batch_size": cfg.batch_size, "precision": precision.name, "torch": torch.__version__}
        text_cache = cache_root() / "replay" / f"text-{content_id(text_key, 32)}.json"
        cached = read_json_or_none(text_cache)
        text_hit = isinstance(cached, dict) and cached.get("key") == text_key and len(cached.get("rows", [])) == tk.n
        if text_hit:
            texts = cached["rows"]
        else:
            model, tokenizer = model_and_tokenizer()
            texts = sample_text(model, tokenizer, tk.n, start_id=start_token_id(tokenizer, tk.start),
                                starts=tk.starts, max_new_tokens=tk.max_new_tokens,
                                min_new_tokens=tk.min_new_tokens, temperature=tk.temperature, top_p=tk.top_p,
                                seed=tk.seed, batch_size=cfg.batch_size, amp_dtype=precision.autocast_dtype)
            write_json(text_cache, {"key": text_key, "rows": texts})
        lengths = [len(t["text"]) for t in texts]
        # Short or empty samples stay in: validate quarantines them (too_short) with their reason.
        text_summary = {"generated": True, "reason": text_reason, "rows": len(texts),
                        "cache": "hit" if text_hit else "miss", "mean_chars": round(sum(lengths) / len(lengths), 1),
                        "empty": sum(1 for n in lengths if not n)}
        inputs["text"] = content_id(text_key, 32)
    summary = {"enabled": True, "rows": len(rows), "empty_answers": empty, "cache": "hit" if hit else "miss",
               "precision": precision.name, "text": text_summary}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "sft.jsonl", rows)
        write_jsonl(tmp / TEXT_FILE, [{"id": f"text-{i + 1:05d}", **t} for i, t in enumerate(texts)])
        # The cache outcome (hit or miss) is the run's, not the data's: in --metrics only.
        write_meta(tmp, stage="replay", params=meta_params, started=started, inputs=inputs, reproducible=True,
                   extra={k: v for k, v in summary.items() if k != "cache"}
                   | {"text": {k: v for k, v in text_summary.items() if k != "cache"}})
    summary["wall_time_s"] = round(time.time() - started, 2)
    summary["provenance"] = provenance(started)
    if metrics:
        write_json(metrics, summary)
    return {"out": out, **summary}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="models/base", help="the base model folder (answers are its own)")
    parser.add_argument("--out", default="data/replay", help="output folder (sft.jsonl, text.jsonl, meta.json)")
    parser.add_argument("--metrics", default="metrics/replay.json",
                        help="metrics JSON (rows, cache hits, whether text replay was generated and why)")


def main(argv=None) -> int:
    return stage_main("replay", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
