"""Does torch.compile speed up a LoRA training step here, and what does compiling cost?

    .venv/bin/python bench/probe_compile.py models/base 8 256 5 eager
    .venv/bin/python bench/probe_compile.py models/base 8 256 5 compile       # static shapes
    .venv/bin/python bench/probe_compile.py models/base 8 256 6 compile-dyn   # dynamic=True,
                                                                              # lengths 256 and 216 alternating

A probe, not an arm of bench_train.py: SmolLM2's decoder with a bf16 frozen base, LoRA r16 on
every linear layer (float32 adapters), eager attention, bf16 autocast, AdamW, random token batches
of [batch, length] with the loss at every position (the full LM head, in both modes alike). Only
the decoder (``model.model``) is compiled, as ``torch.compile`` would wrap it in a trainer. It
prints the first step (compilation included) and the median and best of the timed steps.
"""
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
folder, B, T, steps, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if mode not in ("eager", "compile", "compile-dyn"):
    raise SystemExit(f"mode {mode!r}: eager, compile or compile-dyn")
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager")
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
batches = [torch.randint(3, 49000, (B, T)), torch.randint(3, 49000, (B, T - 40))]


def step(ids) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


if mode.startswith("compile"):
    model.base_model.model.model = torch.compile(model.base_model.model.model, dynamic=mode == "compile-dyn")
t = time.perf_counter()
step(batches[0])
first = time.perf_counter() - t
times, tokens = [], 0
for k in range(steps):
    ids = batches[k % 2] if mode == "compile-dyn" else batches[0]
    t = time.perf_counter()
    step(ids)
    times.append(time.perf_counter() - t)
    tokens += ids.numel()
times.sort()
print(f"{mode}: first step {first:.1f} s; median {times[len(times) // 2]:.3f} s, best {times[0]:.3f} s; "
      f"{tokens / sum(times):.0f} tok/s over the timed steps", flush=True)
