"""Training speed: TRL's defaults, TRL tuned for speed, and tempering, SFT and DPO, on the same batches.

    MALLOC_ARENA_MAX=2 .venv/bin/python bench/bench_train.py --base models/base --data data/clean \
        [--epoch] [--repeats 3] [--sft-steps 6] [--dpo-steps 4] [--warmup 1] [--batch 8] \
        [--no-ablations] [--only sft|dpo] [--json bench/results-train.json]

The arms (same model, same rows, same batch size, same LoRA r16/alpha32 on all linear layers, same
threads, same precision policy, progress bars and trackers off in all):

defaults_trl
    TRL as its docs show it: ``SFTTrainer(model=<folder>, train_dataset=<messages>,
    peft_config=LoraConfig(...), args=SFTConfig(output_dir=...))``, the same with ``DPOTrainer`` on
    ``{prompt, chosen, rejected}`` conversations. Every other setting is TRL's default (gradient
    checkpointing, float32 weights, ``max_length=1024``, the reference forward on every DPO step).
    Off CUDA it adds ``use_cpu=True``, without which TRL's default ``bf16=True`` refuses to start.
tuned_trl
    The best settings TRL itself offers here: ``gradient_checkpointing=False``, bf16 autocast with
    ``model_init_kwargs={"dtype": "bfloat16"}`` (the base stored in bf16) and, on a CPU,
    ``"attn_implementation": "eager"`` (the kernel tempering's ``attention: auto`` picks; faster
    than sdpa here for TRL too), the same ``max_length``
    as tempering, ``train_sampling_strategy="group_by_length"``. SFT: prompt/completion rows (the
    prompt is every turn before the last assistant turn) with ``completion_only_loss=True`` and TRL's
    default ``loss_type="nll"`` (its chunked log-prob head; ``chunked_nll`` is a deprecated alias).
    ``padding_free``/``packing`` stay off: TRL supports padding-free batches only with
    FlashAttention 2/3, which a CPU does not have. DPO: ``precompute_ref_log_probs=True`` with
    ``precompute_ref_batch_size=2 x batch`` (TRL's own precompute, timed); TRL's length-grouped
    sampler refuses DPO datasets, which does not matter here (see "same batches").
tempering
    The sft/dpo stages' own code path through ``tempering.train`` with the ``params.yaml``
    settings (only the step count changed): our chat-template tokenization (every assistant turn
    in the loss), frozen base in bf16, no gradient checkpointing, eager attention on a CPU, LM-head
    logits only at target tokens (SFT), TRL's fused DPO head scoring only completion tokens, the
    reference log-probs precomputed once and cached by content (DPO).

Ablations (unless ``--no-ablations``), each tempering with one of its own speed sources off:
``tempering_no_selective_head`` (SFT loss through TRL's head), ``tempering_sdpa`` /
``tuned_trl_sdpa`` (either arm with the model's own attention kernel), ``tempering_no_compact_head`` (DPO with TRL's fused head
as is), ``tempering_no_shared_prompts`` (DPO with each pair's prompt run twice),
``tempering_packed`` (SFT with ``sft.packing: true``: best-fit decreasing blocks of
``max_length``; other batches by construction, so it is compared on tokens/s, steps per epoch
and loss, never on the same-batches check). The cross-run reference cache is measured as the
DPO precompute of a cold build against a rebuild that hits the cache. ``MALLOC_ARENA_MAX=2``:
every arm trains in its own thread, and glibc's per-thread arenas grew 8 SFT arms to 24 GB
without it.

Same batches. Rows longer than ``max_length`` (and DPO pairs whose prompt is longer than
``max_prompt_length``) are left out, so no arm truncates differently. One batch plan is drawn
once per method: transformers' ``LengthGroupedSampler`` order over tempering's token lengths,
seed 42. Every arm's trainer gets that order as its sampler (``_get_train_sampler`` replaced), so
every arm trains on the same rows, in the same order, in the same batches, each padded to its
longest row (TRL's collators and tempering's alike). This also replaces the defaults arm's random
batches: the padding a random order would add is reported apart (``padding``), from the lengths.
Each arm records, for every step, a digest of the non-padding token sequences its policy forward
saw; ``same_batches`` in the JSON is the check that those digests agree across arms.

How it is measured. Per method, ``--repeats`` rounds (default 3). Each round builds fresh
trainers (fresh caches), then runs them in threads that take strict turns, one optimizer step
each, the first arm rotating from round to round, so machine load hits every arm alike step by
step. A step is timed from one ``on_step_begin`` to the next (the last to ``on_train_end``):
forward, backward, optimizer, the next batch's collation. The first ``--warmup`` steps are not
counted in tokens/s. Tokens are the non-padding tokens the policy's forwards with gradients see
(``attention_mask`` at a decoder pre-hook; packed blocks: the tokens of their conversations).
``os.getloadavg()`` is recorded at the start and end of every round. Every figure is reported per
round and as min / median / max over the rounds; speed-ups are computed within a round.
``--epoch`` runs one full epoch per arm and reports its timed seconds (all steps, DPO also with
its reference precompute), nothing extrapolated.

Model FLOPs utilization (SFT): FLOPs per token = 6 x params for full fine-tuning; with LoRA the
frozen weights need the forward and the activation gradients but no weight gradients, so
4 x frozen + 6 x trainable (attention scores ignored; the tied LM head counts once). MFU =
FLOPs per token x tokens/s / peak. The peak is a 2048^3 bf16 matmul on the same threads, best of
``--peak-rounds`` rounds of 7, measured before any arm is built. Model FLOPs are credited in full
even where an arm skips work (the LM head on prompt tokens), as MFU is usually defined.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
from tempering import env  # noqa: E402

env.setup()  # offline, no telemetry (the same defaults every stage uses)

SEED = 42
SFT_ARMS = ("defaults_trl", "tuned_trl", "tempering")
DPO_ARMS = ("defaults_trl", "tuned_trl", "tempering")
SFT_ABLATIONS = ("tempering_no_selective_head", "tempering_sdpa", "tuned_trl_sdpa", "tempering_packed")
DPO_ABLATIONS = ("tempering_no_compact_head", "tempering_no_shared_prompts", "tempering_sdpa", "tuned_trl_sdpa")
PACKED_ARMS = ("tempering_packed",)  # other batches by construction: not in the same-batches check


# ----------------------------------------------------------------------------- statistics


def summarize(values) -> dict | None:
    """min / median / max (and n) of the non-None values; None when there are none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"n": len(vals), "min": round(min(vals), 4), "median": round(statistics.median(vals), 4),
            "max": round(max(vals), 4)}


def loadavg() -> list[float]:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return []


# ----------------------------------------------------------------------------- measuring


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 7) -> float:
    """Best GFLOP/s of an n^3 matmul over ``repeats`` runs (after one warm-up)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def measure_peak(rounds: int = 5, n: int = 2048, repeats: int = 7) -> dict:
    """The matmul peaks as the best of ``rounds`` rounds (each the best of ``repeats``): a single
    reading swings by 2x on a shared machine (215 vs 417 GFLOP/s seen), the best is the stable one."""
    before = loadavg()
    bf16 = [round(matmul_peak("bfloat16", n, repeats), 1) for _ in range(max(1, rounds))]
    fp32 = [round(matmul_peak("float32", n, repeats), 1) for _ in range(max(1, rounds))]
    return {"bf16_gflops": max(bf16), "fp32_gflops": max(fp32), "bf16_rounds": bf16, "fp32_rounds": fp32,
            "matmul_n": n, "repeats_per_round": repeats, "loadavg_before": before, "loadavg_after": loadavg()}


class Turns:
    """Strict round-robin between trainers running in threads: one optimizer step each in turn."""

    def __init__(self, names: list[str]):
        self.cond = threading.Condition()
        self.active = list(names)
        self.turn = names[0]

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)

    def done(self, name: str, leaving: bool = False) -> None:
        with self.cond:
            if name not in self.active:
                return
            i = self.active.index(name)
            if leaving:
                self.active.pop(i)
                nxt = self.active[i % len(self.active)] if self.active else None
            else:
                nxt = self.active[(i + 1) % len(self.active)]
            self.turn = nxt
            self.cond.notify_all()


def _step_callback(name: str, turns: Turns, record: dict):
    """A step lasts from its ``on_step_begin`` to the next one (or ``on_train_end``): the forward,
    backward and optimizer step, and the collation of the next batch, all inside this arm's turn."""
    from transformers import TrainerCallback

    def close():
        if record.get("t0") is None:
            return
        record["steps"].append({"seconds": time.perf_counter() - record["t0"],
                                "tokens": record["tokens"] - record["tok0"],
                                "batch": "+".join(record["sig"][record["sig0"]:]) or None})
        record["t0"] = None

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if record.get("t0") is not None:
                close()
                turns.done(name)
            turns.wait(name)
            record["t0"] = time.perf_counter()
            record["tok0"] = record["tokens"]
            record["sig0"] = len(record["sig"])

        def on_train_end(self, args, state, control, **kw):
            close()
            turns.done(name, leaving=True)

    return StepClock()


def _batch_digest(ids, mask) -> str:
    rows = sorted(tuple(ids[i][mask[i].bool()].tolist()) for i in range(ids.shape[0]))
    return hashlib.sha1(repr(rows).encode()).hexdigest()[:16]


def _count_tokens(trainer, record: dict) -> None:
    """Count the non-padding tokens of every forward with gradients, at the decoder, and keep a
    digest of the token sequences of each (the same-batches check)."""
    import torch

    model = trainer.model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder()
    collate = trainer.data_collator

    # Packed blocks have no attention mask: their real tokens are counted at the collator.
    def counting_collator(examples):
        record["collated"] = sum(len(e["input_ids"]) for e in examples)
        return collate(examples)

    if "seq_lengths" in getattr(trainer.train_dataset, "column_names", ()):
        trainer.data_collator = counting_collator

    def top(module, args, kwargs):
        # The batch as the arm's trainer forwards it (every DPO arm calls the model with its
        # [chosen; rejected] rows): counted here, so that tempering's shared-prompt forward, whose
        # decoder sees packed rows under a 4D mask, is counted on the same tokens as the others.
        if not torch.is_grad_enabled():
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and mask.dim() == 2 and ids is not None:
            record["tokens"] += int(mask.sum())
            record["sig"].append(_batch_digest(ids, mask))
            record["counted_above"] = True

    def pre(module, args, kwargs):
        if not torch.is_grad_enabled() or record.pop("counted_above", False):
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and mask.dim() == 2 and ids is not None:
            record["tokens"] += int(mask.sum())
            record["sig"].append(_batch_digest(ids, mask))
        elif record.get("collated") is not None:
            record["tokens"] += record.pop("collated")
        elif ids is not None:
            record["tokens"] += int(ids.numel())

    model.register_forward_pre_hook(top, with_kwargs=True)
    decoder.register_forward_pre_hook(pre, with_kwargs=True)


def _record_losses(trainer, record: dict) -> None:
    """Keep every micro-batch's training loss (the value ``training_step`` returns)."""
    step = trainer.training_step

    def training_step(*args, **kwargs):
        loss = step(*args, **kwargs)
        with contextlib.suppress(Exception):
            record["losses"].append(float(loss.detach().float().item()))
        return loss

    trainer.training_step = training_step


def race(trainers: dict, warmup: int, order: list[str] | None = None) -> dict:
    """Train every trainer in its own thread, taking turns step by step in ``order``; per-arm
    throughput, every step's seconds, tokens and batch digest, and the losses."""
    from transformers.trainer_callback import PrinterCallback

    names = list(order or trainers)
    turns = Turns(names)
    for tr in trainers.values():
        tr.remove_callback(PrinterCallback)  # no log dicts on stdout
    records = {n: {"tokens": 0, "steps": [], "sig": [], "losses": []} for n in names}
    for n in names:
        tr = trainers[n]
        _count_tokens(tr, records[n])
        _record_losses(tr, records[n])
        tr.add_callback(_step_callback(n, turns, records[n]))
    errors = {}

    def go(n):
        try:
            trainers[n].train()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[n] = exc
            turns.done(n, leaving=True)

    threads = [threading.Thread(target=go, args=(n,), name=n) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"training failed: {errors}")
    out = {}
    for n in names:
        steps = records[n]["steps"]
        timed = steps[warmup:]
        secs = sum(s["seconds"] for s in timed)
        toks = sum(s["tokens"] for s in timed)
        losses = records[n]["losses"]
        out[n] = {"timed_steps": len(timed), "seconds": round(secs, 3), "tokens": toks,
                  "tokens_per_s": round(toks / secs, 2) if secs else None,
                  "s_per_step": round(secs / len(timed), 3) if timed else None,
                  "all_steps": len(steps), "all_steps_seconds": round(sum(s["seconds"] for s in steps), 3),
                  "all_steps_tokens": sum(s["tokens"] for s in steps),
                  "step_seconds": [round(s["seconds"], 3) for s in steps],
                  "step_tokens": [s["tokens"] for s in steps],
                  "step_batches": [s["batch"] for s in steps],
                  "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                  "loss_mean": round(sum(losses) / len(losses), 5) if losses else None}
    return out


def same_batches(results: dict, arms) -> dict:
    """Whether ``arms`` saw the same batches, step by step (digests of the non-padding tokens)."""
    arms = [a for a in arms if a in results]
    seqs = {a: results[a]["step_batches"] for a in arms}
    ref = seqs[arms[0]] if arms else []
    differ = {a: [i for i, (x, y) in enumerate(zip(ref, s)) if x != y] + (
        [] if len(s) == len(ref) else ["length"]) for a, s in seqs.items()}
    ok = bool(arms) and all(None not in s for s in seqs.values()) and not any(differ.values())
    return {"same": ok, "arms": arms, "steps": len(ref),
            "differing_steps": {a: d for a, d in differ.items() if d}}


# ----------------------------------------------------------------------------- data


def _good_sft(row) -> bool:
    msgs = row.get("messages")
    return (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   and m.get("role") in ("system", "user", "assistant") for m in msgs)
            and any(m["role"] == "assistant" and m["content"].strip() for m in msgs))


def _good_pref(row) -> bool:
    prompt = row.get("prompt")
    return (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                        for m in prompt)
            and all(isinstance(row.get(k), str) and row[k].strip() for k in ("chosen", "rejected")))


def load_data(folder: str | None) -> tuple[list[dict], list[dict], str]:
    """SFT and preference rows: ``folder``/sft.jsonl + preference.jsonl (the pipeline's clean data),
    else the pipeline's generated data (tasks.make_data defaults) written to a temp folder."""
    from tempering.io import read_jsonl

    if folder and (Path(folder) / "sft.jsonl").exists():
        sft = read_jsonl(Path(folder) / "sft.jsonl")
        pref = read_jsonl(Path(folder) / "preference.jsonl")
        where = str(folder)
    else:
        from tasks.make_data import run as make_data
        from tempering.config import from_dict

        tmp = Path(tempfile.mkdtemp(prefix="bench-data-")) / "generated"
        make_data(from_dict({}), out=str(tmp))
        sft = read_jsonl(tmp / "sft_messages.jsonl")
        pref = read_jsonl(tmp / "preference.jsonl")
        where = "tasks.make_data defaults (generated)"
    sft = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
           for r in sft if _good_sft(r)]
    pref = [{"prompt": [{"role": m["role"], "content": m["content"]} for m in r["prompt"]],
             "chosen": r["chosen"], "rejected": r["rejected"]} for r in pref if _good_pref(r)]
    return sft, pref, where


def prepare_sft(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], list[int], dict]:
    """The rows every SFT arm trains on: messages cut after their last assistant turn (the
    prompt/completion split needs it to be last), rows longer than ``max_length`` left out (so no
    arm truncates differently). Returns (rows, token lengths, counts)."""
    from tempering.train.data import tokenize_conversation

    kept, lengths, too_long = [], [], 0
    for r in rows:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        msgs = msgs[:last + 1]
        enc = tokenize_conversation(tokenizer, msgs)
        if len(enc["input_ids"]) > max_length:
            too_long += 1
            continue
        kept.append({"messages": msgs})
        lengths.append(len(enc["input_ids"]))
    multi = sum(1 for r in kept if sum(m["role"] == "assistant" for m in r["messages"]) > 1)
    return kept, lengths, {"rows_in": len(rows), "rows": len(kept), "left_out_over_max_length": too_long,
                           "multi_turn_rows": multi, "tokens": sum(lengths)}


def prepare_pref(rows: list[dict], tokenizer, max_length: int, max_prompt_length: int):
    """The pairs every DPO arm trains on: pairs whose prompt is over ``max_prompt_length`` or whose
    prompt + longer answer is over ``max_length`` left out. Lengths as tempering's sampler sees them."""
    from tempering.train.data import tokenize_preference

    kept, lengths, too_long = [], [], 0
    for r in rows:
        enc = tokenize_preference(tokenizer, r["prompt"], r["chosen"], r["rejected"])
        n = len(enc["prompt_ids"]) + max(len(enc["chosen_ids"]), len(enc["rejected_ids"]))
        if len(enc["prompt_ids"]) > max_prompt_length or n > max_length:
            too_long += 1
            continue
        kept.append(r)
        lengths.append(n)
    return kept, lengths, {"pairs_in": len(rows), "pairs": len(kept), "left_out_over_max_length": too_long}


def batch_plan(lengths: list[int], batch: int, seed: int = SEED) -> list[int]:
    """One length-grouped order of the row indices (transformers' LengthGroupedSampler, seeded)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return [int(i) for i in get_length_grouped_indices(lengths, batch, generator=torch.Generator().manual_seed(seed))]


def padding_share(lengths: list[int], order: list[int], batch: int) -> float:
    """Padding tokens / padded tokens when the rows are batched in ``order``, padded to the longest."""
    real = padded = 0
    for i in range(0, len(order), batch):
        group = [lengths[j] for j in order[i:i + batch]]
        real += sum(group)
        padded += max(group) * len(group)
    return round(1 - real / padded, 4) if padded else 0.0


class FixedOrder:
    """A sampler that yields the same order every time (the batch plan)."""

    def __init__(self, order: list[int]):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)

    def set_epoch(self, epoch):  # the Trainer may call it
        pass


def use_plan(trainer, order: list[int] | None):
    """Make ``trainer`` draw its training batches in ``order`` (None: leave its own sampler)."""
    if order is None:
        return trainer
    if len(order) != len(trainer.train_dataset):
        raise ValueError(f"batch plan has {len(order)} rows, the trainer's dataset {len(trainer.train_dataset)}")
    trainer._get_train_sampler = lambda *a, **k: FixedOrder(order)
    return trainer


# ----------------------------------------------------------------------------- arms


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def _device_kw(precision=None) -> dict:
    import torch

    if torch.cuda.is_available():
        return {}
    return {"use_cpu": True}  # TRL's default bf16=True refuses to start on CPU without it


def _defaults_common(out: str, steps: int, batch: int) -> dict:
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, report_to="none",
                disable_tqdm=True, **_device_kw())


def _tuned_common(out: str, steps: int, batch: int, max_length: int, precision, attention: str = "auto") -> dict:
    from tempering.train.models import attention_implementation

    kw = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, report_to="none",
              disable_tqdm=True, save_strategy="no", gradient_checkpointing=False, max_length=max_length,
              bf16=precision.bf16, fp16=precision.fp16, **_device_kw())
    init = {}
    if precision.name in ("bf16", "fp16"):
        init["dtype"] = "bfloat16" if precision.bf16 else "float16"
    # The attention kernel that is fastest here, as tempering picks it (eager on a CPU at these
    # lengths): a setting TRL takes too (model_init_kwargs). attention="sdpa": the model's own.
    impl = attention_implementation(attention, precision.device, max_length)
    if impl:
        init["attn_implementation"] = impl
    if init:
        kw["model_init_kwargs"] = init
    return kw


def defaults_sft(base: str, rows: list[dict], steps: int, batch: int, out: str, **_):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(model=base, args=SFTConfig(**_defaults_common(out, steps, batch)),
                      train_dataset=Dataset.from_list(rows), peft_config=_lora())


def sft_prompt_completion(rows: list[dict]) -> list[dict]:
    """Messages rows as TRL's prompt/completion rows: the last assistant turn is the completion."""
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def tuned_sft(base: str, rows: list[dict], steps: int, batch: int, out: str, *, max_length: int, precision,
              model_init_kwargs: dict | None = None, attention: str = "auto", **_):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    kw = _tuned_common(out, steps, batch, max_length, precision, attention)
    if model_init_kwargs:
        kw["model_init_kwargs"] = {**kw.get("model_init_kwargs", {}), **model_init_kwargs}
    args = SFTConfig(**kw, train_sampling_strategy="group_by_length", completion_only_loss=True,
                     padding_free=False, packing=False, loss_type="nll")
    return SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(sft_prompt_completion(rows)),
                      peft_config=_lora())


def defaults_dpo(base: str, rows: list[dict], steps: int, batch: int, out: str, **_):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=base, args=DPOConfig(**_defaults_common(out, steps, batch)),
                      train_dataset=Dataset.from_list(_dpo_rows(rows)), peft_config=_lora())


def _dpo_rows(rows):
    return [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def _timed_dpo_class():
    """DPOTrainer that times TRL's own reference-log-prob precompute (nothing else changed)."""
    from trl import DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.__dict__.setdefault("_bench_precompute_s", {})[name] = round(time.perf_counter() - t, 3)
            return out

    return TimedDPOTrainer


def tuned_dpo(base: str, rows: list[dict], steps: int, batch: int, out: str, *, max_length: int, precision,
              attention: str = "auto", **_):
    from datasets import Dataset
    from trl import DPOConfig

    # Not train_sampling_strategy="group_by_length": TRL's sampler refuses DPO rows ("Can only
    # automatically infer lengths ... 'input_ids'"); the batch plan gives every arm grouped batches.
    args = DPOConfig(**_tuned_common(out, steps, batch, max_length, precision, attention), precompute_ref_log_probs=True,
                     precompute_ref_batch_size=2 * batch)
    return _timed_dpo_class()(model=base, args=args, train_dataset=Dataset.from_list(_dpo_rows(rows)),
                              peft_config=_lora())


def _params(steps: int, batch: int, overrides=()):
    from tempering.config import load_params

    return load_params(ROOT / "params.yaml", [
        f"sft.max_steps={steps}", f"dpo.max_steps={steps}", f"sft.batch_size={batch}", f"dpo.batch_size={batch}",
        "sft.save_steps=1000000", "dpo.save_steps=1000000", "tracking.wandb=disabled", "tracking.dvclive=false",
        *overrides])


def tempering_sft(base: str, rows: list[dict], steps: int, batch: int, out: str, *, packing: bool = False,
                  selective_head: bool | None = None, overrides=(), **_):
    """The sft stage's code path (tasks/sft.py) without the file I/O around it."""
    from tempering.train.data import load_tokenizer, pack_sft, tokenize_sft, tokenizer_hash
    from tempering.train.models import apply_adapter, load_model, use_attention
    from tempering.train.precision import choose_precision
    from tempering.train.sft import build_sft_trainer, sft_config
    from tempering.io import content_id

    p = _params(steps, batch, [f"sft.packing={str(packing).lower()}", *overrides])
    cfg = p.sft
    precision = choose_precision(cfg.precision)
    tok = load_tokenizer(base, cfg.chat_template)
    ds, _stats = tokenize_sft(rows, tok, max_length=cfg.max_length, data_hash=content_id(rows, 32),
                              tokenizer_id=tokenizer_hash(base), chat_template=cfg.chat_template)
    if cfg.packing:
        ds, _ = pack_sft(ds, cfg.max_length)
    model = load_model(base, method=cfg.adapter.method, precision=precision, frozen=cfg.adapter.frozen_dtype)
    use_attention(model, cfg.attention, precision.device, cfg.max_length)
    model = apply_adapter(model, cfg.adapter, seed=cfg.seed)
    args = sft_config(cfg, p.tracking, output_dir=out, precision=precision, run_name="bench",
                      disable_tqdm=True)
    trainer = build_sft_trainer(model, tok, ds, args, stage="sft", checkpoints=out, live_dir=None,
                                tracking=p.tracking, cfg=cfg, selective_head=selective_head)
    trainer._bench_cfg = cfg
    return trainer


def tempering_dpo(base: str, rows: list[dict], steps: int, batch: int, out: str, *, data_id: str,
                  compact_head: bool | None = None, shared_prompts: bool = True, overrides=(), **_):
    """The dpo stage's code path (tasks/dpo.py), the base standing in for the SFT model."""
    from tempering.train.data import dpo_dataset, load_tokenizer, tokenizer_hash
    from tempering.train.dpo import build_dpo_trainer, dpo_config, reference_cache_key
    from tempering.train.models import cast_frozen, load_merged, use_attention
    from tempering.train.precision import choose_precision

    p = _params(steps, batch, overrides)
    cfg = p.dpo
    precision = choose_precision(cfg.precision)
    tok = load_tokenizer(base)
    model = load_merged(base, [])
    model.config.use_cache = False
    attention = use_attention(model, cfg.attention, precision.device, cfg.max_length)
    model = cast_frozen(model, cfg.adapter, precision)
    args = dpo_config(cfg, p.tracking, output_dir=out, precision=precision, run_name="bench",
                      disable_tqdm=True)
    key = reference_cache_key(data=data_id, reference=tokenizer_hash(base) + "-base",
                              tokenizer=tokenizer_hash(base), max_length=cfg.max_length,
                              max_prompt_length=cfg.max_prompt_length, precision=precision.name,
                              attention=attention)
    trainer = build_dpo_trainer(model, tok, dpo_dataset([dict(r) for r in rows]), args,
                                adapter=cfg.adapter, max_prompt_length=cfg.max_prompt_length, stage="dpo",
                                checkpoints=out, live_dir=None, tracking=p.tracking, ref_cache_key=key,
                                compact_head=compact_head, shared_prompts=shared_prompts)
    trainer._bench_cfg = cfg
    return trainer


SFT_BUILDERS = {
    "defaults_trl": defaults_sft,
    "tuned_trl": tuned_sft,
    "tempering": tempering_sft,
    "tempering_no_selective_head": lambda *a, **k: tempering_sft(*a, **k, selective_head=False),
    "tempering_sdpa": lambda *a, **k: tempering_sft(*a, **k, overrides=["sft.attention=sdpa"]),
    "tuned_trl_sdpa": lambda *a, **k: tuned_sft(*a, **k, attention="sdpa"),
    "tempering_packed": lambda *a, **k: tempering_sft(*a, **k, packing=True),
}
DPO_BUILDERS = {
    "defaults_trl": defaults_dpo,
    "tuned_trl": tuned_dpo,
    "tempering": tempering_dpo,
    "tempering_no_compact_head": lambda *a, **k: tempering_dpo(*a, **k, compact_head=False),
    "tempering_no_shared_prompts": lambda *a, **k: tempering_dpo(*a, **k, shared_prompts=False),
    "tempering_sdpa": lambda *a, **k: tempering_dpo(*a, **k, overrides=["dpo.attention=sdpa"]),
    "tuned_trl_sdpa": lambda *a, **k: tuned_dpo(*a, **k, attention="sdpa"),
}

SFT_SETTINGS = {
    "defaults_trl": "SFTConfig defaults (+use_cpu off CUDA): messages rows, gradient checkpointing, float32 "
                    "weights, max_length 1024, loss on every token",
    "tuned_trl": "SFTConfig(gradient_checkpointing=False, bf16, model_init_kwargs dtype bf16 and attn_implementation "
                 "eager on CPU, max_length as tempering, train_sampling_strategy=group_by_length, "
                 "completion_only_loss=True on prompt/completion rows, loss_type=nll (chunked head), "
                 "padding_free/packing off: FlashAttention only)",
    "tempering": "params.yaml sft through tempering.train (selective LM head, attention auto = eager on CPU, "
                 "frozen base bf16, no gradient checkpointing, every assistant turn in the loss)",
    "tempering_no_selective_head": "tempering with TRL's own loss head (build_sft_trainer(selective_head=False))",
    "tempering_sdpa": "tempering with sft.attention=sdpa (the model's own kernel)",
    "tuned_trl_sdpa": "tuned_trl without attn_implementation (the model's own kernel, sdpa)",
    "tempering_packed": "tempering with sft.packing=true (best-fit decreasing blocks of max_length)",
}
DPO_SETTINGS = {
    "defaults_trl": "DPOConfig defaults (+use_cpu off CUDA): gradient checkpointing, float32 weights, "
                    "reference forward (adapter disabled) on every step",
    "tuned_trl": "DPOConfig(gradient_checkpointing=False, bf16, model_init_kwargs dtype bf16 and attn_implementation "
                 "eager on CPU, max_length as tempering, precompute_ref_log_probs=True, "
                 "precompute_ref_batch_size=2x batch)",
    "tempering": "params.yaml dpo through tempering.train (reference log-probs precomputed and cached by "
                 "content, compact fused head on completion tokens, each pair's prompt run once, frozen base bf16)",
    "tempering_no_compact_head": "tempering with TRL's fused head as is (build_dpo_trainer(compact_head=False))",
    "tempering_no_shared_prompts": "tempering with each pair's prompt run twice, as TRL does "
                                   "(build_dpo_trainer(shared_prompts=False))",
    "tempering_sdpa": "tempering with dpo.attention=sdpa (the model's own kernel)",
    "tuned_trl_sdpa": "tuned_trl without attn_implementation (the model's own kernel, sdpa)",
}


def _free() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _steps(n_rows: int, batch: int) -> int:
    return max(1, math.ceil(n_rows / batch))


def _precompute_seconds(trainer) -> tuple[float | None, bool | None]:
    """(seconds, cache hit) of an arm's reference precompute: TRL's timed, or tempering's own."""
    timed = getattr(trainer, "_bench_precompute_s", None)
    if timed:
        return float(timed.get("train", 0.0)), False  # TRL: in-memory datasets never hit its cache
    cache = trainer.facts().ref_logps_cache if hasattr(trainer, "facts") else None
    if cache:
        return float(cache.get("seconds", 0.0)), bool(cache.get("hit"))
    return None, None


def run_method(kind: str, base: str, rows: list[dict], lengths: list[int], arms: list[str], *, steps: int,
               warmup: int, batch: int, repeats: int, epoch: bool, work: Path, precision, max_length: int,
               data_id: str | None = None, plans: dict | None = None, builder_kw: dict | None = None,
               log=print) -> dict:
    """Race ``arms`` of SFT or DPO ``repeats`` times on the same batch plan; per-round results."""
    from tempering.train.data import CACHE_ENV

    builders = SFT_BUILDERS if kind == "sft" else DPO_BUILDERS
    order = batch_plan(lengths, batch)
    rounds = []
    for r in range(repeats):
        names = arms[r % len(arms):] + arms[:r % len(arms)]  # rotate who goes first
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix=f"bench-cache-{kind}{r}-", dir=work)
        start_load = loadavg()
        trainers, build_s = {}, {}
        for name in arms:  # build in a fixed order (the ablations reuse tempering's cache)
            n_steps = steps
            t = time.perf_counter()
            tr = builders[name](base, rows, steps, batch, str(work / f"{kind}-{name}-{r}"), max_length=max_length,
                                precision=precision, data_id=data_id, **(builder_kw or {}))
            build_s[name] = round(time.perf_counter() - t, 3)
            n_rows = len(tr.train_dataset)
            if epoch:
                n_steps = _steps(n_rows, batch)
            tr.args.max_steps = n_steps
            plan = (plans or {}).get(name, order)
            if name not in PACKED_ARMS:
                use_plan(tr, plan)
            trainers[name] = tr
        t0 = time.time()
        res = race(trainers, warmup, names)
        for name, tr in trainers.items():
            res[name]["build_s"] = build_s[name]
            res[name]["rows_or_blocks"] = len(tr.train_dataset)
            res[name]["steps_per_epoch"] = _steps(len(tr.train_dataset), batch)
            if kind == "dpo":
                sec, hit = _precompute_seconds(tr)
                res[name]["precompute_s"] = sec
                res[name]["precompute_cache_hit"] = hit
            if epoch:
                res[name]["epoch_s"] = res[name]["all_steps_seconds"]
                if kind == "dpo":
                    res[name]["epoch_s_with_precompute"] = round(res[name]["all_steps_seconds"]
                                                                 + (res[name].get("precompute_s") or 0.0), 3)
        extra = {}
        if kind == "sft" and "tempering" in trainers and r == 0:
            with contextlib.suppress(Exception):
                extra["packing_loss_check"] = packing_loss_check(trainers["tempering"], rows, batch, max_length)
        trainers.clear()
        _free()
        if kind == "dpo" and "tempering" in arms:
            # A later run with the same data and reference: the cached log-probs are read back.
            t = time.perf_counter()
            again = tempering_dpo(base, rows, 1, batch, str(work / f"dpo-again-{r}"), data_id=data_id)
            warm_build = round(time.perf_counter() - t, 3)
            sec, hit = _precompute_seconds(again)
            extra["tempering_rebuild"] = {"build_s": warm_build, "precompute_s": sec, "cache_hit": hit}
            del again
            _free()
        rounds.append({"round": r, "order": names, "loadavg_start": start_load, "loadavg_end": loadavg(),
                       "race_wall_s": round(time.time() - t0, 1), "arms": res, **extra})
        log(f"{kind} round {r + 1}/{repeats} ({', '.join(names)}): "
            + ", ".join(f"{n} {res[n]['tokens_per_s']} tok/s" for n in arms)
            + f"; load {start_load[:1]} -> {loadavg()[:1]}")
    return {"plan": order, "rounds": rounds}


def packing_loss_check(trainer, rows: list[dict], batch: int, max_length: int) -> dict:
    """The summed token loss of the same conversations, padded vs packed, with the untrained model
    (LoRA starts at zero): the per-token loss packing trains on is the same, only the batching differs."""
    import torch
    from datasets import Dataset

    from tempering.train.data import pack_sft, packed_collator, tokenize_conversation
    from tempering.train.losses import selective_lm_loss

    model = trainer.model
    tok = trainer.processing_class
    subset = rows[: 2 * batch]
    encs = [tokenize_conversation(tok, r["messages"], max_length) for r in subset]
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in encs], "labels": [e["labels"] for e in encs],
                            "length": [len(e["input_ids"]) for e in encs]})
    packed, stats = pack_sft(ds, max_length)
    pad = tok.pad_token_id
    device = next(model.parameters()).device

    def padded_batch(items):
        width = max(len(e["input_ids"]) for e in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, e in enumerate(items):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def summed(b):
        b = {k: v.to(device) for k, v in b.items()}
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                              enabled=bool(trainer.args.bf16)):
            return float(selective_lm_loss(model, b, num_items_in_batch=torch.tensor(1.0)))

    was = model.training
    model.eval()
    try:
        plain = summed(padded_batch([ds[i] for i in range(len(ds))]))
        blocks = packed_collator(pad)([packed[i] for i in range(len(packed))])
        pk = summed(blocks)
    finally:
        model.train(was)
    targets = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in encs)
    return {"conversations": len(subset), "blocks": stats["blocks"], "target_tokens": targets,
            "padded_loss_per_token": round(plain / max(1, targets), 5),
            "packed_loss_per_token": round(pk / max(1, targets), 5),
            "relative_difference": round(abs(pk - plain) / max(abs(plain), 1e-9), 6)}


def summarize_method(kind: str, run: dict, arms: list[str], flops_tok: float | None, peak: float | None,
                     epoch: bool) -> dict:
    """Per-arm min/median/max over the rounds, speed-ups within each round, the checks."""
    rounds = run["rounds"]
    out: dict = {"arms": {}, "rounds": rounds}
    for a in arms:
        per = [rd["arms"][a] for rd in rounds]
        entry = {"tokens_per_s": summarize(p["tokens_per_s"] for p in per),
                 "s_per_step": summarize(p["s_per_step"] for p in per),
                 "settings": (SFT_SETTINGS if kind == "sft" else DPO_SETTINGS).get(a)}
        if flops_tok and peak:
            entry["mfu"] = summarize(flops_tok * p["tokens_per_s"] / (peak * 1e9) if p["tokens_per_s"] else None
                                     for p in per)
        if epoch:
            entry["epoch_s"] = summarize(p.get("epoch_s") for p in per)
            entry["epoch_loss_mean"] = summarize(p.get("loss_mean") for p in per)
            entry["epoch_loss_last"] = summarize(p.get("loss_last") for p in per)
        if kind == "dpo":
            entry["precompute_s"] = summarize(p.get("precompute_s") for p in per)
            if epoch:
                entry["epoch_s_with_precompute"] = summarize(p.get("epoch_s_with_precompute") for p in per)
        entry["steps_per_epoch"] = per[0]["steps_per_epoch"]
        entry["rows_or_blocks"] = per[0]["rows_or_blocks"]
        out["arms"][a] = entry

    def ratio(num, den, key="tokens_per_s"):
        vals = []
        for rd in rounds:
            x, y = rd["arms"].get(num, {}).get(key), rd["arms"].get(den, {}).get(key)
            vals.append(x / y if x and y else None)
        return summarize(vals)

    def time_ratio(slow, fast, key):
        vals = []
        for rd in rounds:
            x, y = rd["arms"].get(slow, {}).get(key), rd["arms"].get(fast, {}).get(key)
            vals.append(x / y if x and y else None)
        return summarize(vals)

    sp = {}
    for num, den in (("tempering", "tuned_trl"), ("tempering", "defaults_trl"), ("tuned_trl", "defaults_trl")):
        if num in arms and den in arms:
            sp[f"{num}_vs_{den}"] = ratio(num, den)
            if epoch:
                key = "epoch_s_with_precompute" if kind == "dpo" else "epoch_s"
                sp[f"{num}_vs_{den}_epoch"] = time_ratio(den, num, key)
    out["speedup_tokens_per_s"] = sp
    checks = [same_batches(rd["arms"], [a for a in arms if a not in PACKED_ARMS]) for rd in rounds]
    out["same_batches"] = all(c["same"] for c in checks)
    out["same_batches_detail"] = checks
    abl = {}
    if "tempering_no_selective_head" in arms:
        abl["selective_lm_head"] = {"speedup": ratio("tempering", "tempering_no_selective_head"),
                                    "what": "tokens/s of tempering over tempering with TRL's loss head, same batches"}
    if "tempering_no_compact_head" in arms:
        # The shared-prompt forward sits on the compact head: without the head, prompts run twice too.
        ref = "tempering_no_shared_prompts" if "tempering_no_shared_prompts" in arms else "tempering"
        abl["compact_dpo_head"] = {"speedup": ratio(ref, "tempering_no_compact_head"),
                                   "what": f"tokens/s of {ref} over tempering with TRL's fused head as is, "
                                           "same batches"}
    if "tempering_no_shared_prompts" in arms:
        abl["shared_dpo_prompts"] = {"speedup": ratio("tempering", "tempering_no_shared_prompts"),
                                     "what": "tokens/s of tempering over tempering with each pair's prompt run "
                                             "twice, same batches"}
    for arm, name in (("tempering", "tempering_sdpa"), ("tuned_trl", "tuned_trl_sdpa")):
        if name in arms and arm in arms:
            abl[f"eager_attention_{arm}"] = {"speedup": ratio(arm, name),
                                             "what": f"tokens/s of {arm} (eager attention) over {name} (sdpa), "
                                                     "same batches"}
    if "tempering_sdpa" in arms and "tuned_trl_sdpa" in arms:
        sp["tempering_sdpa_vs_tuned_trl_sdpa"] = ratio("tempering_sdpa", "tuned_trl_sdpa")
    if "tempering_packed" in arms and "tempering" in arms:
        padded, packed = out["arms"]["tempering"], out["arms"]["tempering_packed"]
        check = next((rd["packing_loss_check"] for rd in rounds if "packing_loss_check" in rd), None)
        abl["packing"] = {
            "speedup_tokens_per_s": ratio("tempering_packed", "tempering"),
            "steps_per_epoch_padded": padded["steps_per_epoch"], "steps_per_epoch_packed": packed["steps_per_epoch"],
            "tokens_per_step_padded": summarize(rd["arms"]["tempering"]["tokens"] / max(1, rd["arms"]["tempering"]
                                                ["timed_steps"]) for rd in rounds),
            "tokens_per_step_packed": summarize(rd["arms"]["tempering_packed"]["tokens"] / max(1, rd["arms"]
                                                ["tempering_packed"]["timed_steps"]) for rd in rounds),
            "loss_check_untrained": check,
            "consequences": (
                "Same per-token loss: the collator restarts positions per conversation and attention stays "
                "inside it, so the untrained model's summed loss over the same conversations matches padded "
                "batches (loss_check_untrained). What changes is the optimisation: an epoch has "
                f"{packed['steps_per_epoch']} optimizer steps instead of {padded['steps_per_epoch']}, each "
                "averaging over more target tokens, so with the same learning rate and schedule the model "
                "gets fewer, larger updates (retune the learning rate, or keep epochs x steps in mind). "
                "The first token of each packed conversation is never a target (it is -100 anyway in chat "
                "data)."),
        }
        if epoch:
            abl["packing"]["epoch_s_padded"] = padded.get("epoch_s")
            abl["packing"]["epoch_s_packed"] = packed.get("epoch_s")
            abl["packing"]["epoch_time_speedup"] = time_ratio("tempering", "tempering_packed", "epoch_s")
            abl["packing"]["epoch_loss_last_padded"] = padded.get("epoch_loss_last")
            abl["packing"]["epoch_loss_last_packed"] = packed.get("epoch_loss_last")
    if kind == "dpo" and any("tempering_rebuild" in rd for rd in rounds):
        abl["reference_cache"] = {
            "cold_precompute_s": summarize(rd["arms"]["tempering"].get("precompute_s") for rd in rounds),
            "cache_hit_precompute_s": summarize(rd["tempering_rebuild"]["precompute_s"] for rd in rounds
                                                if "tempering_rebuild" in rd),
            "cache_hit": all(rd["tempering_rebuild"]["cache_hit"] for rd in rounds if "tempering_rebuild" in rd),
            "rebuild_s": summarize(rd["tempering_rebuild"]["build_s"] for rd in rounds if "tempering_rebuild" in rd),
            "what": "tempering's reference precompute on a cold cache vs a later run with the same data and "
                    "reference (cache hit); TRL recomputes on every run (an in-memory dataset never hits its "
                    "datasets cache)"}
    out["ablations"] = abl
    return out


# ----------------------------------------------------------------------------- main


def sft_flops_per_token(base: str) -> tuple[int, str]:
    """Model FLOPs per trained token of LoRA r16 all-linear on ``base`` (see the module docstring)."""
    from tempering.train.models import apply_adapter, load_model, trainable_parameters
    from tempering.config import load_params

    cfg = load_params(ROOT / "params.yaml").sft
    model = apply_adapter(load_model(base, method="full"), cfg.adapter, seed=cfg.seed)
    trainable = trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    del model
    _free()
    if cfg.adapter.method == "full":
        return 6 * total, "6 x params (full fine-tuning)"
    return (4 * (total - trainable) + 6 * trainable,
            f"4 x frozen ({total - trainable:,}) + 6 x trainable ({trainable:,}) (LoRA)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="models/base", help="HF model folder (python -m tasks.base_model --out DIR)")
    ap.add_argument("--data", default="data/clean", help="folder with sft.jsonl + preference.jsonl (else generated)")
    ap.add_argument("--sft-steps", type=int, default=6, help="timed SFT steps per arm (without --epoch)")
    ap.add_argument("--dpo-steps", type=int, default=4, help="timed DPO steps per arm (without --epoch)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps per arm not counted in tokens/s")
    ap.add_argument("--batch", type=int, default=8, help="per-device batch (TRL's default is 8)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per method, the first arm rotating (>= 1)")
    ap.add_argument("--epoch", action="store_true", help="one full epoch per arm, timed (instead of --*-steps)")
    ap.add_argument("--no-ablations", action="store_true", help="only the three main arms")
    ap.add_argument("--arms", default=None, help="comma-separated arms to run (default: all)")
    ap.add_argument("--only", choices=["sft", "dpo"], default=None)
    ap.add_argument("--peak-rounds", type=int, default=5, help="matmul peak: best of this many rounds of 7")
    ap.add_argument("--peak-size", type=int, default=2048, help="matmul peak: n of the n^3 matmul")
    ap.add_argument("--max-rows", type=int, default=None, help="use only the first N rows / pairs (smoke runs)")
    ap.add_argument("--adapter", choices=["lora", "qlora"], default="lora",
                    help="qlora: SFT only, the base in 4-bit NF4 through bitsandbytes in both tuned_trl "
                         "(BitsAndBytesConfig in model_init_kwargs) and tempering (sft.adapter.method=qlora); CUDA only")
    ap.add_argument("--json", default=None, help="write the results here")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    sft_kw = {}
    if a.adapter == "qlora":
        import torch as _torch

        if not _torch.cuda.is_available():
            ap.error("--adapter qlora needs a CUDA GPU with bitsandbytes (4-bit NF4); this machine has no CUDA GPU")
        from transformers import BitsAndBytesConfig

        a.only = "sft"
        sft_kw = {"model_init_kwargs": {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=_torch.bfloat16,
            bnb_4bit_use_double_quant=True)}, "overrides": ["sft.adapter.method=qlora"]}
        a.arms = a.arms or "tuned_trl,tempering"

    import torch

    from tempering.train.data import load_tokenizer
    from tempering.train.precision import choose_precision, quiet_transformers, setup_torch
    from tempering.config import load_params
    from tempering.io import content_id

    quiet_transformers()
    threads = setup_torch()
    base = str(Path(a.base).resolve())
    if not (Path(base) / "config.json").exists():
        ap.error(f"{a.base}: no model folder (python -m tasks.base_model --out {a.base})")
    started = time.time()
    load0 = loadavg()
    p = load_params(ROOT / "params.yaml")
    precision = choose_precision(p.sft.precision)
    tok = load_tokenizer(base)
    sft_raw, pref_raw, where = load_data(a.data)
    if a.max_rows:
        sft_raw, pref_raw = sft_raw[:a.max_rows], pref_raw[:a.max_rows]
    sft_rows, sft_lengths, sft_counts = prepare_sft(sft_raw, tok, p.sft.max_length)
    pref_rows, pref_lengths, pref_counts = prepare_pref(pref_raw, tok, p.dpo.max_length, p.dpo.max_prompt_length)
    wanted = set(a.arms.split(",")) if a.arms else None

    def pick(main_arms, ablations):
        arms = list(main_arms) + ([] if a.no_ablations else list(ablations))
        return [x for x in arms if wanted is None or x in wanted]

    # The peak first, before any trainer exists and with nothing of ours running.
    peak = measure_peak(a.peak_rounds, a.peak_size)
    print(f"threads {threads}, load {load0[:1]}, bf16 matmul peak {peak['bf16_gflops']} GFLOP/s (rounds "
          f"{peak['bf16_rounds']}), fp32 {peak['fp32_gflops']}; {sft_counts['rows']} SFT rows "
          f"({sft_counts['left_out_over_max_length']} over max_length left out), {pref_counts['pairs']} pairs "
          f"from {where}; precision {precision.name}", flush=True)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                          "cuda": torch.cuda.is_available(), "loadavg_start": load0,
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "versions": _versions(), "precision": precision.name, "peak": peak, "data": where,
              "adapter": a.adapter, "batch": a.batch, "warmup_steps": a.warmup, "repeats": a.repeats,
              "mode": "one full epoch per arm" if a.epoch else f"{a.sft_steps} SFT / {a.dpo_steps} DPO timed steps"}
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))

    if a.only in (None, "sft") and sft_rows:
        arms = pick(SFT_ARMS, SFT_ABLATIONS)
        flops_tok, formula = sft_flops_per_token(base)
        run = run_method("sft", base, sft_rows, sft_lengths, arms, steps=a.sft_steps + a.warmup, warmup=a.warmup,
                         batch=a.batch, repeats=a.repeats, epoch=a.epoch, work=work, precision=precision,
                         max_length=p.sft.max_length, builder_kw=sft_kw)
        res = summarize_method("sft", run, arms, flops_tok, peak["bf16_gflops"], a.epoch)
        res["flops_per_token"] = flops_tok
        res["flops_formula"] = formula
        res["data"] = dict(sft_counts, padding_share_plan=padding_share(sft_lengths, run["plan"], a.batch),
                           padding_share_random_order=padding_share(
                               sft_lengths, _random_order(len(sft_lengths)), a.batch),
                           loss_tokens_note="tuned_trl's completion-only loss covers the last assistant turn; "
                                            "tempering's every assistant turn; defaults_trl's every token "
                                            f"({sft_counts['multi_turn_rows']} multi-turn rows): the inputs, "
                                            "and so the tokens counted, are the same")
        result["sft"] = res
        _print_method("SFT", res)

    if a.only in (None, "dpo") and pref_rows:
        arms = pick(DPO_ARMS, DPO_ABLATIONS)
        run = run_method("dpo", base, pref_rows, pref_lengths, arms, steps=a.dpo_steps + a.warmup, warmup=a.warmup,
                         batch=a.batch, repeats=a.repeats, epoch=a.epoch, work=work, precision=precision,
                         max_length=p.dpo.max_length, data_id=content_id(pref_rows, 32))
        res = summarize_method("dpo", run, arms, None, None, a.epoch)
        res["data"] = dict(pref_counts, padding_share_plan=padding_share(pref_lengths, run["plan"], a.batch),
                           padding_share_random_order=padding_share(
                               pref_lengths, _random_order(len(pref_lengths)), a.batch))
        result["dpo"] = res
        _print_method("DPO", res)

    result["loadavg_end"] = loadavg()
    result["wall_s"] = round(time.time() - started, 1)
    print(f"wall {result['wall_s']} s, load at end {result['loadavg_end'][:1]}", flush=True)
    text = json.dumps(result, indent=2)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    else:
        print(text)
    return 0


def _random_order(n: int, seed: int = SEED) -> list[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _print_method(name: str, res: dict) -> None:
    def med(s):
        return s["median"] if s else None

    parts = [f"{a} {med(e['tokens_per_s'])} tok/s" for a, e in res["arms"].items()]
    sp = ", ".join(f"{k} {med(v)}x" for k, v in res["speedup_tokens_per_s"].items())
    print(f"{name} (medians): {'; '.join(parts)}; {sp}; same batches {res['same_batches']}", flush=True)


def _versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out


if __name__ == "__main__":
    raise SystemExit(main())
