"""Stage ``replay``: the base model's own answers to a bank of general prompts, for SFT to rehearse.

    python -m tasks.replay --base models/base --out data/replay

Fine-tuning on a narrow domain pulls the model away from its general behaviour; rehearsing
that behaviour while it learns keeps it close (replay, as in continual learning). When the user
has no general chat data, the model's own greedy answers are the cheapest faithful source: they
are, by construction, what it already does. This stage writes them as an SFT source,
``--out/sft.jsonl`` (OpenAI ``messages`` rows). ``validate.sources`` lists that file like any
other source, so it is validated, deduplicated and decontaminated against the benchmarks like
any other data. ``sft.replay`` then mixes a share of it into training.

- Prompts: ``replay.prompts``, JSON lines of ``{id, category, prompt}``. The shipped bank
  (``tempering/replay_prompts.jsonl``, 155 prompts written for tempering: explanations,
  how-tos, advice, short writing, reasoning, code) overlaps no benchmark, and a test checks it
  against every shipped set. ``replay.n`` takes the first N.
- Answers: greedy, at most ``replay.max_new_tokens`` new tokens, in left-padded batches of
  ``replay.batch_size``, under bf16 autocast where the CPU or GPU has it.
- Cache: the answers are stored under ``<cache>/replay/`` by (base model hash, prompts hash,
  generation params, precision). A re-run with the same base and prompts generates nothing,
  and ``meta.json`` says ``cache: hit``.
- ``replay.enabled: false`` writes an empty ``sft.jsonl``, so the DAG keeps its shape.
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
                          write_json, write_jsonl, write_meta)

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ("replay",)

# Bumped when the generation code changes what an answer is (part of the cache key).
GENERATION_VERSION = 1


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
             amp_dtype=None) -> list[str]:
    """Greedy chat answers, one per prompt. Left-padded batches give each row the tokens it gets
    alone, up to float rounding; prompts are batched by length so padding stays small."""
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
            with torch.no_grad(), amp:
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            for i, ids in zip(idx, out[:, enc["input_ids"].shape[1]:]):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return answers


def run(params: Params, base: str, out: str) -> dict:
    started = time.time()
    cfg = params.replay
    if not cfg.enabled:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            write_jsonl(tmp / "sft.jsonl", [])
            write_meta(tmp, stage="replay", params=cfg, inputs={}, started=started,
                       extra={"enabled": False, "rows": 0})
        return {"out": out, "enabled": False, "rows": 0}

    import torch
    from transformers import AutoModelForCausalLM

    from tempering import backend

    base_dir = resolve_model_dir(base)
    if not (base_dir / "config.json").exists():
        raise TemperingError(f"{base}: base model folder not found (run the base_model stage)")
    prompts = load_prompts(cfg)
    precision = backend.choose_precision("auto")
    key = {"v": GENERATION_VERSION, "base": hash_path(base_dir), "prompts": content_id(prompts, 32),
           "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "precision": precision.name,
           "torch": torch.__version__}
    cache_file = backend.cache_root() / "replay" / f"answers-{content_id(key, 32)}.json"
    cached = read_json_or_none(cache_file)
    hit = isinstance(cached, dict) and cached.get("key") == key and len(cached.get("answers", [])) == len(prompts)
    if hit:
        answers = cached["answers"]
    else:
        backend.setup_torch()
        backend.quiet_transformers()
        tokenizer = backend.load_tokenizer(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(precision.device).eval()
        answers = generate(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, amp_dtype=precision.autocast_dtype)
        write_json(cache_file, {"key": key, "answers": answers})
    rows = [{"id": p["id"], "category": p.get("category"),
             "messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": a}]}
            for p, a in zip(prompts, answers)]
    # An empty answer stays in: validate quarantines it (empty_field) with its reason, nothing lost.
    empty = sum(1 for a in answers if not a)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "sft.jsonl", rows)
        write_meta(tmp, stage="replay", params=cfg, started=started,
                   inputs={"base": key["base"], "prompts": key["prompts"]},
                   extra={"enabled": True, "rows": len(rows), "empty_answers": empty,
                          "cache": "hit" if hit else "miss", "precision": precision.name})
    return {"out": out, "enabled": True, "rows": len(rows), "empty_answers": empty,
            "cache": "hit" if hit else "miss", "wall_time_s": round(time.time() - started, 2)}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="models/base", help="the base model folder (answers are its own)")
    parser.add_argument("--out", default="data/replay", help="output folder (sft.jsonl + meta.json)")


def main(argv=None) -> int:
    return stage_main("replay", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
