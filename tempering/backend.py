"""The training backend: the ONE module that imports trl and peft.

Stages (``tasks/cpt.py``, ``tasks/sft.py``, ``tasks/dpo.py``, ``tasks/export.py``) go through these
functions and never touch trl directly, so a TRL/PEFT upgrade is a change in one file.

What lives here:

- hardware: :func:`setup_torch` (threads = physical cores), :func:`choose_precision` (bf16
  autocast on AVX512-BF16/AMX CPUs and bf16 GPUs, fp16 on older GPUs, fp32 otherwise);
- loading: :func:`load_tokenizer`, :func:`load_model` (follows ``pointer.json``),
  :func:`load_merged` (base + adapters merged in float32), :func:`peft_config`,
  :func:`apply_adapter`;
- data: :func:`tokenize_conversation` / :func:`tokenize_sft` (our own chat-template tokenization:
  every assistant turn in the loss, end-of-turn token included, nothing else; cached),
  :func:`pack_text` (continued pre-training blocks), :func:`dpo_dataset`;
- trainers: :func:`training_config` (TrainParams -> ``SFTConfig``/``DPOConfig``),
  :func:`build_sft_trainer`, :func:`build_dpo_trainer`, :func:`train` (resume, NaN guard,
  timing, metrics);
- checkpoints: :func:`prepare_checkpoints` (fingerprint: resume when it matches, wipe otherwise);
- tracking: W&B (offline by default, never prompts) and a dvclive callback for ``dvc plots``.

Heavy imports (torch, transformers, trl, peft) stay inside functions.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tempering import TemperingError
from tempering.io import atomic_path, content_id, hash_path, read_json, resolve_model_dir, write_json

log = logging.getLogger("tempering.backend")

FINGERPRINT_FILE = "fingerprint.json"
CACHE_ENV = "TEMPERING_CACHE_DIR"
DEFAULT_CACHE = ".cache/tempering"
# Bumped when the tokenization code changes meaning, so stale caches are not reused.
TOKENIZE_VERSION = 1

# Test hook: extra transformers callbacks appended to every trainer built here (fault injection).
EXTRA_CALLBACKS: list = []


# ============================================================================ hardware


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not help matmuls)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        available = os.cpu_count() or 1
    cores = set()
    try:
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
            elif not line.strip() and core is not None:
                cores.add((phys, core))
                phys = core = None
        if core is not None:
            cores.add((phys, core))
    except OSError:
        pass
    return max(1, min(available, len(cores) or available))


def setup_torch() -> int:
    """Set torch's intra-op threads to the physical core count (unless OMP_NUM_THREADS is set)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = physical_cores()
    torch.set_num_threads(n)
    return n


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX). Without it bf16 is emulated
    and several hundred times slower than fp32 (measured: 0.3 vs 178 GFLOP/s on an AVX2 EPYC)."""
    text = cpuinfo
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


@dataclass(frozen=True)
class Precision:
    """What the trainer runs in. ``name``: bf16 | fp16 | fp32 (autocast; master weights fp32)."""

    name: str
    device: str  # "cuda" | "cpu"
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def fp16(self) -> bool:
        return self.name == "fp16"


def choose_precision(requested: str = "auto") -> Precision:
    """Pick autocast precision and device. ``requested`` is the stage's ``precision`` param."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
    if requested == "auto":
        if cuda:
            return Precision("bf16" if cuda_bf16 else "fp16", device,
                             "GPU with bf16" if cuda_bf16 else "GPU without bf16")
        if cpu_has_bf16():
            return Precision("bf16", device, "CPU has AVX512-BF16/AMX")
        return Precision("fp32", device, "CPU without native bf16 (emulated bf16 is far slower)")
    if requested == "fp16" and not cuda:
        raise TemperingError("precision: fp16 needs a CUDA GPU (use auto, bf16 or fp32 on CPU)")
    if requested == "bf16" and cuda and not cuda_bf16:
        raise TemperingError("precision: this GPU has no bf16 support (use fp16 or auto)")
    return Precision(requested, device, "set in params")


# ============================================================================ loading


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


def _check_qlora(method: str, section: str = "") -> None:
    import importlib.util

    import torch

    if method != "qlora":
        return
    if not torch.cuda.is_available():
        raise TemperingError(f"{section + '.' if section else ''}adapter.method: qlora needs a CUDA GPU with "
                             "bitsandbytes; this machine has none (use method: lora)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TemperingError(f"{section + '.' if section else ''}adapter.method: qlora needs bitsandbytes "
                             "(pip install bitsandbytes)")


def load_model(folder: str | os.PathLike, *, method: str = "lora", precision: Precision | None = None,
               section: str = ""):
    """A causal LM from an HF folder. Float32 weights (bf16 weights would lose small updates);
    ``qlora`` loads the base in 4-bit NF4 on CUDA only."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(folder)
    if not (folder / "config.json").exists():
        raise TemperingError(f"{folder}: not a Hugging Face model folder (no config.json)")
    _check_qlora(method, section)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision is None or precision.bf16 else torch.float16
        kwargs = {"dtype": compute, "device_map": {"": 0}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    return model


def is_adapter_dir(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "adapter_config.json").exists()


def peft_config(adapter) -> Any | None:
    """``AdapterParams`` -> a peft ``LoraConfig`` (None for full fine-tuning)."""
    if adapter.method == "full":
        return None
    from peft import LoraConfig

    targets = adapter.target_modules
    if not isinstance(targets, str):
        targets = list(targets)
    return LoraConfig(
        r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
        target_modules=targets, use_rslora=adapter.use_rslora, use_dora=adapter.use_dora,
        bias="none", task_type="CAUSAL_LM",
    )


def apply_adapter(model, adapter, seed: int = 42):
    """Wrap ``model`` with a fresh LoRA (or leave every weight trainable for ``full``)."""
    import torch

    config = peft_config(adapter)
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    torch.manual_seed(seed)  # adapter init is random: make it reproducible
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise TemperingError(f"adapter.target_modules: {str(exc).splitlines()[0]}") from None


def merge_adapter(model, adapter_dir: str | os.PathLike):
    """Merge a saved peft adapter (or swap in a full fine-tuned model) into ``model``."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if is_adapter_dir(adapter_dir):
        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    if (adapter_dir / "config.json").exists():  # method: full saved a whole model
        return load_model(adapter_dir, method="full")
    raise TemperingError(f"{adapter_dir}: neither a peft adapter (adapter_config.json) nor a model folder")


def load_merged(base: str | os.PathLike, adapters: list[str | os.PathLike] = ()):
    """Base model (float32) with each adapter merged in order; merging in float32 keeps small
    LoRA deltas that bf16 weights would round away."""
    model = load_model(base, method="full")
    for adapter_dir in adapters:
        model = merge_adapter(model, adapter_dir)
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def snapshot_trainable(model, exact_limit: int = 20_000_000) -> dict:
    """A copy of the trainable weights (strided samples past ``exact_limit`` elements)."""
    total = trainable_parameters(model)
    stride = 1 if total <= exact_limit else 97
    return {name: p.detach().flatten()[::stride].float().cpu().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def weights_changed(model, snapshot: dict) -> bool:
    import torch

    current = snapshot_trainable(model)
    if set(current) != set(snapshot):
        return True
    return any(not torch.equal(current[k], snapshot[k]) for k in snapshot)


# ============================================================================ SFT tokenization


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


# ============================================================================ checkpoints


def fingerprint(section, **inputs: str) -> str:
    """Hash of a stage's params section plus its input hashes: checkpoints resume only under it."""
    params = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return content_id({"params": params, "inputs": inputs}, 32)


def _checkpoint_step(path: Path) -> int | None:
    if not path.is_dir() or not path.name.startswith("checkpoint-"):
        return None
    try:
        return int(path.name.split("-", 1)[1])
    except ValueError:
        return None


def valid_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first. ``trainer_state.json`` is written last by the Trainer,
    so a checkpoint without a readable one was cut off mid-save."""
    folder = Path(folder)
    found = []
    for path in folder.glob("checkpoint-*"):
        step = _checkpoint_step(path)
        if step is None:
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.append((step, path))
    return [p for _, p in sorted(found)]


def prepare_checkpoints(folder: str | os.PathLike, fp: str) -> Path | None:
    """Return the checkpoint to resume from, or None after wiping ``folder`` for a fresh start.

    Resume only when ``fingerprint.json`` matches ``fp`` (same params section, data and base
    model); otherwise the old checkpoints belong to another run and are removed. Partial
    (killed mid-save) checkpoints are removed too.
    """
    folder = Path(folder)
    old = None
    if (folder / FINGERPRINT_FILE).exists():
        with contextlib.suppress(TemperingError, AttributeError):
            old = read_json(folder / FINGERPRINT_FILE).get("fingerprint")
    if folder.exists() and old == fp:
        good = valid_checkpoints(folder)
        for path in folder.glob("checkpoint-*"):
            if path.is_dir() and path not in good:
                shutil.rmtree(path, ignore_errors=True)
        if good:
            return good[-1]
    elif folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / FINGERPRINT_FILE, {"fingerprint": fp})
    return None


# ============================================================================ tracking


def setup_wandb(tracking, run_name: str) -> bool:
    """Configure W&B from ``tracking``; returns whether the trainer reports to it. Never prompts:
    offline by default, online only with credentials, ``WANDB_MODE=disabled`` in the env wins."""
    mode = tracking.wandb
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return False
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            raise TemperingError("tracking.wandb: online needs WANDB_API_KEY (or `wandb login`); "
                                 "use offline and `wandb sync` later")
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_DIR", str(Path.cwd()))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ["WANDB_PROJECT"] = tracking.project
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    os.environ.setdefault("WANDB_WATCH", "false")
    return True


def _trim_live(live_dir: Path, max_step: int) -> None:
    """Drop dvclive rows logged after the checkpoint we resume from (they will be logged again)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        with open(tsv, newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        i = rows[0].index("step")
        keep = [rows[0]] + [r for r in rows[1:] if len(r) > i and r[i].isdigit() and int(r[i]) <= max_step]
        with open(tsv, "w", newline="") as fh:
            csv.writer(fh, delimiter="\t", lineterminator="\n").writerows(keep)


def _callbacks_module():
    from transformers import TrainerCallback

    class LiveCallback(TrainerCallback):
        """Step-indexed training curves under ``<dir>/plots/metrics`` (what dvc.yaml's plots read)."""

        def __init__(self, live_dir: str, resume_step: int | None):
            self.dir = Path(live_dir)
            self.resume_step = resume_step
            self.live = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            from dvclive import Live

            resume = self.resume_step is not None and self.dir.exists()
            if resume:
                _trim_live(self.dir, self.resume_step)
            self.live = Live(dir=str(self.dir), resume=resume, save_dvc_exp=False, dvcyaml=None,
                             report=None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.live is None or not logs:
                return
            values = {k: float(v) for k, v in logs.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                      and k not in {"epoch", "total_flos", "step"} and not k.startswith("train_")}
            if not values:
                return
            self.live.step = state.global_step
            for key, value in values.items():
                self.live.log_metric(f"train/{key}", value)
            self.live.make_summary()

        def on_train_end(self, args, state, control, **kwargs):
            if self.live is not None:
                self.live.end()
                self.live = None

    class GuardCallback(TrainerCallback):
        """Stop with a TemperingError when a step leaves non-finite trainable weights, *before* the
        Trainer saves a checkpoint for that step (on_step_end runs before the save)."""

        def __init__(self, stage: str, checkpoints: str):
            self.stage, self.checkpoints = stage, checkpoints
            self.model = None
            self.t0 = None
            self.tokens0 = 0
            self.step0 = 0
            self.t_end = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model
            self.t0 = time.time()
            self.tokens0 = state.num_input_tokens_seen
            self.step0 = state.global_step

        def on_step_end(self, args, state, control, model=None, **kwargs):
            import torch

            model = model or self.model
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if not params:
                return
            with torch.no_grad():  # one device sync per step, not one per tensor
                ok = torch.stack([torch.isfinite(p).all() for _, p in params]).all().item()
            if not ok:
                name = next(n for n, p in params if not torch.isfinite(p).all())
                raise TemperingError(_nan_message(self.stage, state.global_step, self.checkpoints,
                                                  f"weights became non-finite ({name})"))

        def on_train_end(self, args, state, control, **kwargs):
            self.t_end = time.time()

    return LiveCallback, GuardCallback


def _nan_message(stage: str, step: int, checkpoints: str, what: str) -> str:
    good = valid_checkpoints(checkpoints)
    kept = f"last good checkpoint kept: {good[-1]}" if good else "no checkpoint saved yet"
    return (f"{stage}: training diverged at step {step}: {what}; lower {stage}.learning_rate or raise "
            f"{stage}.warmup_ratio ({kept})")


# ============================================================================ trainers


def training_config(kind: str, cfg, tracking, *, output_dir: str, precision: Precision, run_name: str,
                    **extra):
    """Map a TrainParams section to ``SFTConfig`` (kind sft/cpt) or ``DPOConfig`` (kind dpo)."""
    from trl import DPOConfig, SFTConfig

    report = ["wandb"] if setup_wandb(tracking, run_name) else []
    common = dict(
        output_dir=str(output_dir),
        run_name=run_name,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps (transformers 5)
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # never hide a NaN loss behind an average
        eval_strategy="no",
        report_to=report,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device == "cpu",
        gradient_checkpointing=False,  # TRL defaults to True: ~20% slower, not needed at this size
        dataloader_num_workers=0,
        dataloader_pin_memory=precision.device == "cuda",
        train_sampling_strategy="group_by_length",  # similar lengths per batch = little padding
        include_num_input_tokens_seen="non_padding",
        max_length=cfg.max_length,
        pad_to_multiple_of=None,
        push_to_hub=False,
        save_only_model=False,  # optimizer + scheduler + RNG states are needed to resume exactly
    )
    common.update(extra)
    if kind == "dpo":
        return DPOConfig(**common, beta=cfg.beta, loss_type=[cfg.loss_type],
                         truncation_mode="keep_start",
                         precompute_ref_log_probs=cfg.adapter.method == "full")
    return SFTConfig(**common, packing=False, dataset_kwargs={"skip_prepare_dataset": True},
                     completion_only_loss=False, assistant_only_loss=False)


def _guarded(trainer_cls, stage: str, checkpoints: str, plain_loss: bool = False):
    """A trainer subclass that stops on a non-finite loss before the optimizer step.

    ``plain_loss``: compute the loss with the model's own cross-entropy (transformers'
    ``Trainer.compute_loss``) instead of TRL's chunked log-prob kernel. On CPU with a 49k vocabulary
    the kernel made an SFT step ~35% slower (SmolLM2-135M, batch 8, fp32: 3.4 vs 2.5 s/step); it pays
    off on GPUs, where it saves the logits' memory. Same loss: labels carry the -100 mask.
    """
    from transformers import Trainer

    class Guarded(trainer_cls):
        if plain_loss:
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs["use_cache"] = False
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            value = float(loss.detach().float().item())
            step = self.state.global_step + 1  # global_step counts finished optimizer steps
            if not math.isfinite(value):
                raise TemperingError(_nan_message(stage, step, checkpoints, f"loss is {value}"))
            # Micro-batch losses are already scaled for gradient accumulation: their sum is the step loss.
            losses = self.__dict__.setdefault("_tempering_step_losses", {})
            losses[step] = losses.get(step, 0.0) + value
            return loss

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            # Runs after each optimizer step, before a checkpoint is saved: keep the exact loss of
            # every step in the trainer state, so it survives a resume (the logged "loss" is a
            # window mean every logging_steps).
            step = self.state.global_step
            losses = self.__dict__.get("_tempering_step_losses", {})
            recorded = self.__dict__.setdefault("_tempering_recorded", set())
            if step in losses and step not in recorded:
                self.state.log_history.append({"step": step, "step_loss": losses[step]})
                recorded.add(step)
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            # Length grouping from our precomputed "length" column (the Trainer drops unused
            # columns before building the sampler, and DPO rows have no input_ids to infer from).
            full = self.train_dataset
            if (self.args.train_sampling_strategy == "group_by_length" and full is not None
                    and "length" in getattr(full, "column_names", ())):
                from transformers.trainer_pt_utils import LengthGroupedSampler

                return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            lengths=list(full["length"]))
            return super()._get_train_sampler(train_dataset)

    Guarded.__name__ = f"Guarded{trainer_cls.__name__}"
    return Guarded


def _callbacks(stage: str, checkpoints: str, live_dir: str | None, tracking, resume_step: int | None):
    LiveCallback, GuardCallback = _callbacks_module()
    guard = GuardCallback(stage, checkpoints)
    cbs = [guard]
    if live_dir and tracking.dvclive:
        cbs.append(LiveCallback(live_dir, resume_step))
    return guard, cbs + list(EXTRA_CALLBACKS)


def build_sft_trainer(model, tokenizer, dataset, args, *, stage: str, checkpoints: str,
                      live_dir: str | None, tracking, resume_step: int | None = None):
    """SFTTrainer on a pre-tokenized dataset (input_ids + labels; TRL's preparation skipped)."""
    from trl import SFTTrainer

    guard, callbacks = _callbacks(stage, checkpoints, live_dir, tracking, resume_step)
    plain = not str(args.device).startswith("cuda")
    trainer = _guarded(SFTTrainer, stage, checkpoints, plain_loss=plain)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    trainer._tempering_guard = guard
    return trainer


def build_dpo_trainer(model, tokenizer, dataset, args, *, adapter, max_prompt_length: int, stage: str,
                      checkpoints: str, live_dir: str | None, tracking, resume_step: int | None = None):
    """DPOTrainer. With LoRA the plain ``model`` gets a fresh adapter and the reference is the same
    network with the adapter disabled (no second copy). With ``full`` the reference log-probs are
    computed once before training from the untouched model."""
    from trl import DPOTrainer

    guard, callbacks = _callbacks(stage, checkpoints, live_dir, tracking, resume_step)
    config = peft_config(adapter)
    import torch

    torch.manual_seed(args.seed)
    trainer = _guarded(DPOTrainer, stage, checkpoints)(
        model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=config, callbacks=callbacks)
    # TRL 1.16 has no max_prompt_length: keep the end of long prompts (the latest turns and the
    # generation prompt), then the collator cuts prompt+completion at max_length.
    def _cut(ex):
        prompt = ex["prompt_ids"][-max_prompt_length:]
        return {"prompt_ids": prompt,
                "length": len(prompt) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))}

    trainer.train_dataset = trainer.train_dataset.map(_cut)
    trainer._tempering_guard = guard
    return trainer


def _finished(checkpoint: Path) -> bool:
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def train(trainer, resume_from: Path | None, before: dict) -> dict:
    """Run training (resuming when given a checkpoint); return the metrics every stage reports."""
    started = time.time()
    guard = trainer._tempering_guard
    if resume_from is not None and _finished(resume_from):
        # The run already reached its last step (the stage died after training, or DVC re-ran it):
        # load that checkpoint instead of training. (transformers would train one extra step here.)
        from transformers.trainer_callback import TrainerState

        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        guard.step0, guard.tokens0 = trainer.state.global_step, trainer.state.num_input_tokens_seen
        guard.t0 = guard.t_end = time.time()
        output = None
    else:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.time() - started
    state = trainer.state
    session_steps = state.global_step - guard.step0
    train_time = (guard.t_end or time.time()) - (guard.t0 or started)
    session_tokens = state.num_input_tokens_seen - guard.tokens0
    losses_by_step = {h["step"]: float(h["step_loss"]) for h in state.log_history if "step_loss" in h}
    if not losses_by_step:  # a checkpoint from elsewhere: fall back to the logged window means
        losses_by_step = {h["step"]: float(h["loss"]) for h in state.log_history if "loss" in h and "step" in h}
    ordered = [losses_by_step[k] for k in sorted(losses_by_step)]
    last = ordered[-1] if ordered else float("nan")
    model = trainer.model
    metrics = {
        "steps": state.global_step,
        "session_steps": session_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "epochs": round(float(state.epoch or 0.0), 4),
        "train_loss_first": ordered[0] if ordered else None,
        "train_loss_last": last,
        "train_loss_mean": (sum(ordered) / len(ordered)) if ordered else None,
        "train_loss_session_mean": float(output.training_loss) if output and session_steps else None,
        "final_loss_finite": math.isfinite(last),
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_s": round(session_tokens / train_time, 2) if train_time > 0 and session_tokens else None,
        "s_per_step": round(train_time / session_steps, 4) if session_steps else None,
        "train_wall_s": round(wall, 2),
        "trainable_params": trainable_parameters(model),
        "weights_changed": weights_changed(model, before),
        "loss_curve": [{"step": k, "loss": losses_by_step[k]} for k in sorted(losses_by_step)],
    }
    extra_keys = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                  "mean_token_accuracy")
    for key in extra_keys:
        vals = [float(h[key]) for h in state.log_history if key in h]
        if vals:
            name = key.replace("/", "_")
            metrics[f"{name}_last"] = vals[-1]
            metrics[f"{name}_mean"] = sum(vals) / len(vals)
    return metrics


def save_trained(trainer, tokenizer, out: str | os.PathLike) -> None:
    """Adapter (or full model) + tokenizer, written atomically."""
    model = trainer.model
    if not hasattr(model, "peft_config"):  # a full model: readers generate with it
        model.config.use_cache = True
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def model_meta(folder: str | os.PathLike) -> dict:
    """``meta.json`` of a model folder (following pointers: the pointer's own meta first)."""
    folder = Path(folder)
    if (folder / "meta.json").exists():
        return read_json(folder / "meta.json")
    resolved = resolve_model_dir(folder)
    return read_json(resolved / "meta.json") if (resolved / "meta.json").exists() else {}


def quiet_transformers() -> None:
    """Fewer advisory warnings in stage logs (errors still show)."""
    import warnings

    # TRL 1.16 still calls transformers' pre-v6 gradient-checkpointing names on every step.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*",
                            category=FutureWarning)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
