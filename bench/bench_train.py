"""Training speed: plain TRL defaults vs tempering's settings, SFT and DPO, in one run on the same data.

    .venv/bin/python bench/bench_train.py --base models/base --data data/clean \
        [--sft-steps 6] [--dpo-steps 4] [--warmup 1] [--json bench/results-train.json]

What is compared (same model, same data, same batch size, same LoRA r16/alpha32 on all linear
layers, same threads, progress bars and trackers off in both):

(a) plain TRL, written the way TRL's docs show it: ``SFTTrainer(model=<folder>, train_dataset=<messages
    dataset>, peft_config=LoraConfig(...), args=SFTConfig(output_dir=...))`` and the same with
    ``DPOTrainer`` / ``DPOConfig`` on ``{prompt, chosen, rejected}`` conversations. Everything else is
    TRL's default (bf16 autocast, gradient checkpointing, TRL's chunked log-prob loss, random batches,
    the reference forward on every DPO step, float32 weights). On a machine without CUDA TRL's default
    ``bf16=True`` stops with "Your setup doesn't support bf16/gpu. You need to assign use_cpu", so the
    plain arm sets ``use_cpu=True`` there, as that message says.
(b) tempering: the sft/dpo stages' own code path through ``tempering.backend`` with the ``params.yaml``
    settings (only ``max_steps`` changed): our chat-template tokenization, length-grouped batches,
    frozen base stored in bf16, no gradient checkpointing, loss logits only on target tokens, and
    for DPO the reference log-probs precomputed once (timed separately, with the cache hit a later
    run gets).

How it is measured: the two trainers of a method are built first, then run in two threads that take
strict turns, one optimizer step each, so both see the same machine load step by step (the
machine is shared; ratios within a run are what count). A step is timed from the trainer's
``on_step_begin`` to its ``on_step_end``; the first ``--warmup`` steps of each are not counted.
Tokens are the non-padding tokens the policy's forward passes with gradients see (a forward
pre-hook on the decoder counting ``attention_mask``), the same definition for both arms.

Model FLOPs utilization (SFT): FLOPs per token = 6 x params for full fine-tuning; with LoRA the
frozen weights need the forward and the activation gradients but no weight gradients, so
4 x frozen + 6 x trainable (attention scores ignored; the tied LM head counts once, as a matmul).
MFU = FLOPs per token x tokens/s / peak, the peak being a 2048^3 bf16 matmul measured in this run
on the same threads. Model FLOPs are credited in full even where an arm skips work (the LM head
on prompt tokens), as MFU is usually defined.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
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
            i = self.active.index(name)
            if leaving:
                self.active.pop(i)
                nxt = self.active[i % len(self.active)] if self.active else None
            else:
                nxt = self.active[(i + 1) % len(self.active)]
            self.turn = nxt
            self.cond.notify_all()


def _step_callback(name: str, turns: Turns, record: dict):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            turns.wait(name)
            record["t0"] = time.perf_counter()
            record["tok0"] = record["tokens"]

        def on_step_end(self, args, state, control, **kw):
            record["steps"].append((time.perf_counter() - record["t0"], record["tokens"] - record["tok0"]))
            turns.done(name)

        def on_train_end(self, args, state, control, **kw):
            if name in turns.active:
                turns.done(name, leaving=True)

    return StepClock()


def _count_tokens(model, record: dict) -> None:
    """Count non-padding tokens of every forward with gradients, at the decoder."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder()

    def pre(module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and mask.dim() == 2:
            record["tokens"] += int(mask.sum())
        elif ids is not None:
            record["tokens"] += int(ids.numel())

    decoder.register_forward_pre_hook(pre, with_kwargs=True)


def race(trainers: dict, warmup: int) -> dict:
    """Train every trainer in its own thread, taking turns step by step; per-arm throughput."""
    from transformers.trainer_callback import PrinterCallback

    names = list(trainers)
    turns = Turns(names)
    for tr in trainers.values():
        tr.remove_callback(PrinterCallback)  # no log dicts on stdout
    records = {n: {"tokens": 0, "steps": []} for n in names}
    for n, tr in trainers.items():
        _count_tokens(tr.model, records[n])
        tr.add_callback(_step_callback(n, turns, records[n]))
    errors = {}

    def go(n):
        try:
            trainers[n].train()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[n] = exc
            if n in turns.active:
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
        timed = records[n]["steps"][warmup:]
        secs = sum(s for s, _ in timed)
        toks = sum(k for _, k in timed)
        out[n] = {"timed_steps": len(timed), "seconds": round(secs, 3), "tokens": toks,
                  "tokens_per_s": round(toks / secs, 2) if secs else None,
                  "s_per_step": round(secs / len(timed), 3) if timed else None,
                  "step_seconds": [round(s, 3) for s, _ in records[n]["steps"]],
                  "step_tokens": [k for _, k in records[n]["steps"]]}
    return out


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


# ----------------------------------------------------------------------------- arms


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def _plain_common(out: str, steps: int, batch: int) -> dict:
    import torch

    kw = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, report_to="none",
              disable_tqdm=True)
    if not torch.cuda.is_available():
        kw["use_cpu"] = True  # TRL's default bf16=True refuses to start on CPU without it
    return kw


def plain_sft(base: str, rows: list[dict], steps: int, batch: int, out: str):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(model=base, args=SFTConfig(**_plain_common(out, steps, batch)),
                      train_dataset=Dataset.from_list(rows), peft_config=_lora())


def plain_dpo(base: str, rows: list[dict], steps: int, batch: int, out: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    return DPOTrainer(model=base, args=DPOConfig(**_plain_common(out, steps, batch)), train_dataset=ds,
                      peft_config=_lora())


def _params(steps: int, batch: int):
    from tempering.config import load_params

    return load_params(ROOT / "params.yaml", [
        f"sft.max_steps={steps}", f"dpo.max_steps={steps}", f"sft.batch_size={batch}", f"dpo.batch_size={batch}",
        "sft.save_steps=1000000", "dpo.save_steps=1000000", "tracking.wandb=disabled", "tracking.dvclive=false"])


def tempering_sft(base: str, rows: list[dict], steps: int, batch: int, out: str):
    """The sft stage's code path (tasks/sft.py) without the file I/O around it."""
    from tempering import backend
    from tempering.io import content_id

    p = _params(steps, batch)
    cfg = p.sft
    precision = backend.choose_precision(cfg.precision)
    tok = backend.load_tokenizer(base, cfg.chat_template)
    ds, stats = backend.tokenize_sft(rows, tok, max_length=cfg.max_length, data_hash=content_id(rows, 32),
                                     tokenizer_id=backend.tokenizer_hash(base), chat_template=cfg.chat_template)
    if cfg.packing:
        ds, _ = backend.pack_sft(ds, cfg.max_length)
    model = backend.load_model(base, method=cfg.adapter.method, precision=precision, frozen=cfg.adapter.frozen_dtype)
    model = backend.apply_adapter(model, cfg.adapter, seed=cfg.seed)
    args = backend.training_config("sft", cfg, p.tracking, output_dir=out, precision=precision, run_name="bench",
                                   disable_tqdm=True)
    return backend.build_sft_trainer(model, tok, ds, args, stage="sft", checkpoints=out, live_dir=None,
                                     tracking=p.tracking, cfg=cfg), cfg


def tempering_dpo(base: str, rows: list[dict], steps: int, batch: int, out: str, data_id: str):
    """The dpo stage's code path (tasks/dpo.py), the base standing in for the SFT model."""
    from tempering import backend

    p = _params(steps, batch)
    cfg = p.dpo
    precision = backend.choose_precision(cfg.precision)
    tok = backend.load_tokenizer(base)
    model = backend.load_merged(base, [])
    model.config.use_cache = False
    model = backend.cast_frozen(model, cfg.adapter, precision)
    args = backend.training_config("dpo", cfg, p.tracking, output_dir=out, precision=precision, run_name="bench",
                                   disable_tqdm=True)
    key = backend.reference_cache_key(data=data_id, reference=backend.tokenizer_hash(base) + "-base",
                                      tokenizer=backend.tokenizer_hash(base), max_length=cfg.max_length,
                                      max_prompt_length=cfg.max_prompt_length, precision=precision.name)
    t = time.perf_counter()
    trainer = backend.build_dpo_trainer(model, tok, backend.dpo_dataset([dict(r) for r in rows]), args,
                                        adapter=cfg.adapter, max_prompt_length=cfg.max_prompt_length, stage="dpo",
                                        checkpoints=out, live_dir=None, tracking=p.tracking, ref_cache_key=key)
    build_s = time.perf_counter() - t
    return trainer, cfg, build_s


def _free(*objs) -> None:
    for o in objs:
        del o
    gc.collect()


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="models/base", help="HF model folder (python -m tasks.base_model --out DIR)")
    ap.add_argument("--data", default="data/clean", help="folder with sft.jsonl + preference.jsonl (else generated)")
    ap.add_argument("--sft-steps", type=int, default=6, help="timed SFT steps per arm")
    ap.add_argument("--dpo-steps", type=int, default=4, help="timed DPO steps per arm")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per arm")
    ap.add_argument("--batch", type=int, default=8, help="per-device batch (TRL's default is 8)")
    ap.add_argument("--only", choices=["sft", "dpo"], default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)

    import torch

    from tempering import backend

    backend.quiet_transformers()
    threads = backend.setup_torch()
    base = str(Path(a.base).resolve())
    if not (Path(base) / "config.json").exists():
        ap.error(f"{a.base}: no model folder (python -m tasks.base_model --out {a.base})")
    started = time.time()
    load = os.getloadavg()
    sft_rows, pref_rows, where = load_data(a.data)
    peak = {"bf16_gflops": round(matmul_peak("bfloat16"), 1), "fp32_gflops": round(matmul_peak("float32"), 1)}
    print(f"threads {threads}, load {load[0]:.2f}, bf16 matmul peak {peak['bf16_gflops']} GFLOP/s "
          f"(fp32 {peak['fp32_gflops']}); data: {len(sft_rows)} SFT rows, {len(pref_rows)} pairs from {where}",
          flush=True)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                          "cuda": torch.cuda.is_available(), "loadavg_start": [round(x, 2) for x in load]},
              "versions": _versions(), "peak": peak, "data": where, "warmup_steps": a.warmup}
    cache = tempfile.mkdtemp(prefix="bench-cache-")
    os.environ[backend.CACHE_ENV] = cache  # cold caches: nothing reused from earlier runs
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))

    if a.only in (None, "sft"):
        n = a.sft_steps + a.warmup
        plain = plain_sft(base, sft_rows, n, a.batch, str(work / "plain_sft"))
        ours, cfg = tempering_sft(base, sft_rows, n, a.batch, str(work / "ours_sft"))
        res = race({"plain_trl": plain, "tempering": ours}, a.warmup)
        trainable = backend.trainable_parameters(ours.model)
        total = sum(p.numel() for p in ours.model.parameters())
        flops_tok = 6 * total if cfg.adapter.method == "full" else 4 * (total - trainable) + 6 * trainable
        for arm in res.values():
            arm["mfu"] = round(flops_tok * arm["tokens_per_s"] / (peak["bf16_gflops"] * 1e9), 4)
        res["speedup"] = round(res["tempering"]["tokens_per_s"] / res["plain_trl"]["tokens_per_s"], 2)
        res["flops_per_token"] = flops_tok
        res["flops_formula"] = ("6 x params (full fine-tuning)" if cfg.adapter.method == "full" else
                                f"4 x frozen ({total - trainable:,}) + 6 x trainable ({trainable:,}) (LoRA)")
        res["settings"] = {"plain_trl": "SFTConfig defaults (+use_cpu on CPU), LoRA r16/a32 all-linear",
                           "tempering": f"params.yaml sft: {cfg.adapter.method}, frozen_dtype "
                                        f"{cfg.adapter.frozen_dtype}, gradient_checkpointing "
                                        f"{cfg.gradient_checkpointing}, packing {cfg.packing}"}
        result["sft"] = res
        print(f"SFT  plain TRL {res['plain_trl']['tokens_per_s']} tok/s, tempering {res['tempering']['tokens_per_s']} "
              f"tok/s: {res['speedup']}x; MFU {res['plain_trl']['mfu']:.1%} vs {res['tempering']['mfu']:.1%}",
              flush=True)
        _free(plain, ours)
        plain = ours = None
        gc.collect()

    if a.only in (None, "dpo"):
        from tempering.io import content_id

        n = a.dpo_steps + a.warmup
        plain = plain_dpo(base, pref_rows, n, a.batch, str(work / "plain_dpo"))
        ours, cfg, build_cold = tempering_dpo(base, pref_rows, n, a.batch, str(work / "ours_dpo"),
                                              content_id(pref_rows, 32))
        cold = dict(getattr(ours, "_tempering_ref_cache", {}) or {})
        res = race({"plain_trl": plain, "tempering": ours}, a.warmup)
        res["speedup"] = round(res["tempering"]["tokens_per_s"] / res["plain_trl"]["tokens_per_s"], 2)
        _free(ours)
        ours = None
        gc.collect()
        # A later run with the same data and reference: the cached log-probs are read back.
        again, _, build_warm = tempering_dpo(base, pref_rows, n, a.batch, str(work / "ours_dpo2"),
                                             content_id(pref_rows, 32))
        warm = dict(getattr(again, "_tempering_ref_cache", {}) or {})
        # One epoch over all pairs, paying the cold precompute once: the amortized comparison.
        epoch_tokens = _dpo_epoch_tokens(again)
        t_plain = epoch_tokens / res["plain_trl"]["tokens_per_s"]
        t_ours = epoch_tokens / res["tempering"]["tokens_per_s"] + float(cold.get("seconds", 0.0))
        res["reference_precompute"] = {"cold_seconds": cold.get("seconds"), "cold_hit": cold.get("hit"),
                                       "warm_seconds": warm.get("seconds"), "warm_hit": warm.get("hit"),
                                       "trainer_build_cold_s": round(build_cold, 2),
                                       "trainer_build_warm_s": round(build_warm, 2)}
        res["one_epoch_with_cold_precompute"] = {"epoch_tokens": epoch_tokens,
                                                 "plain_trl_s": round(t_plain, 1), "tempering_s": round(t_ours, 1),
                                                 "speedup": round(t_plain / t_ours, 2)}
        res["settings"] = {"plain_trl": "DPOConfig defaults (+use_cpu on CPU), LoRA r16/a32 all-linear, reference "
                                        "= adapter disabled, every step",
                           "tempering": f"params.yaml dpo: {cfg.adapter.method}, precompute_ref "
                                        f"{cfg.precompute_ref}, gradient_checkpointing {cfg.gradient_checkpointing}"}
        result["dpo"] = res
        print(f"DPO  plain TRL {res['plain_trl']['tokens_per_s']} tok/s, tempering {res['tempering']['tokens_per_s']} "
              f"tok/s: {res['speedup']}x (reference precompute {cold.get('seconds')} s once, cache hit "
              f"{warm.get('seconds')} s; one epoch incl. precompute: {res['one_epoch_with_cold_precompute']['speedup']}x)",
              flush=True)
        _free(plain, again)

    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.time() - started, 1)
    print(f"wall {result['wall_s']} s, load at end {result['loadavg_end'][0]}", flush=True)
    text = json.dumps(result, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    else:
        print(text)
    return 0


def _dpo_epoch_tokens(trainer) -> int:
    """Non-padding tokens of one epoch of DPO forwards: (prompt + chosen) + (prompt + rejected), cut
    at max_length as the collator cuts them."""
    ds = trainer.train_dataset
    cap = trainer.args.max_length or 10**9
    total = 0
    for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]):
        total += min(len(p) + len(c), cap) + min(len(p) + len(r), cap)
    return total


def _versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "trl", "peft"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out


if __name__ == "__main__":
    raise SystemExit(main())
