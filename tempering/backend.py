"""The training backend: the ONE module that imports trl and peft.

Stages (``tasks/cpt.py``, ``tasks/sft.py``, ``tasks/dpo.py``, ``tasks/export.py``) go through these
functions and never touch trl directly, so a TRL/PEFT upgrade is a change in one file.

What lives here:

- hardware: :func:`setup_torch` (threads = physical cores), :func:`choose_precision` (bf16
  autocast on AVX512-BF16/AMX CPUs and bf16 GPUs, fp16 on older GPUs, fp32 otherwise);
- loading: :func:`load_tokenizer`, :func:`load_model` (follows ``pointer.json``; frozen adapter
  bases in the autocast dtype, :func:`frozen_dtype`), :func:`load_merged` (base + adapters merged
  in float32), :func:`peft_config` (LoRA/rsLoRA/DoRA, QLoRA, prefix and prompt tuning),
  :func:`apply_adapter`;
- data: :func:`tokenize_conversation` / :func:`tokenize_sft` (our own chat-template tokenization:
  every assistant turn in the loss, end-of-turn token included, nothing else; cached),
  :func:`pack_sft` (best-fit-decreasing packing, attention kept per conversation),
  :func:`split_eval`, :func:`pack_text` (continued pre-training blocks), :func:`dpo_dataset`;
- trainers: :func:`training_config` (TrainParams -> ``SFTConfig``/``DPOConfig``),
  :func:`build_sft_trainer` (eval split, early stopping), :func:`build_dpo_trainer` (reference
  log-probs precomputed once and cached by content, :func:`attach_reference_logps`),
  :func:`train` (resume, NaN guard, timing, metrics);
- speed on CPU: :func:`selective_lm_loss` (SFT: LM head only at target positions) and
  :func:`install_compact_lm_head` (DPO: TRL's fused head scoring only labelled positions);
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

    @property
    def autocast_dtype(self):
        """The torch dtype to autocast to (bf16 / fp16), or None for fp32 (no autocast)."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)


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
                             "bitsandbytes (4-bit NF4 QLoRA); this machine has no CUDA GPU, where bitsandbytes "
                             "gives no speed-up (use method: lora)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TemperingError(f"{section + '.' if section else ''}adapter.method: qlora needs bitsandbytes "
                             "(pip install bitsandbytes)")


ADAPTER_METHODS = ("lora", "prefix", "prompt")  # frozen base + small trainable adapter (qlora apart)
PROMPT_LEARNING = ("prefix", "prompt")


def frozen_dtype(method: str, precision: Precision | None, setting: str = "auto"):
    """dtype of the frozen base weights. Trained weights stay float32 (bf16 weights would round
    small updates away); a frozen base under bf16/fp16 autocast is stored in that dtype: autocast
    casts it to that for every matmul anyway, so the math is the same, without the per-step cast
    and at half the memory."""
    import torch

    if method in ADAPTER_METHODS and setting == "auto" and precision is not None and precision.name in ("bf16", "fp16"):
        return torch.bfloat16 if precision.bf16 else torch.float16
    return torch.float32


def load_model(folder: str | os.PathLike, *, method: str = "lora", precision: Precision | None = None,
               section: str = "", frozen: str = "float32"):
    """A causal LM from an HF folder. Float32 weights, except a frozen adapter base with
    ``frozen="auto"`` (see :func:`frozen_dtype`); ``qlora`` loads the base in 4-bit NF4 on CUDA only."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(folder)
    if not (folder / "config.json").exists():
        raise TemperingError(f"{folder}: not a Hugging Face model folder (no config.json)")
    _check_qlora(method, section)
    kwargs: dict[str, Any] = {"dtype": frozen_dtype(method, precision, frozen)}
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


def load_for_inference(folder: str | os.PathLike, device: str | None = None):
    """(model, tokenizer) of a saved model for scoring or generation: float32 weights (autocast
    picks the compute dtype), eval mode, KV cache on, on ``device`` (default: CUDA when present).
    The one loader of evaluate, export's sweep and the replay stage."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(folder)
    if not (folder / "config.json").exists():
        raise TemperingError(f"{folder}: not a Hugging Face model folder (no config.json)")
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tok


def is_adapter_dir(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "adapter_config.json").exists()


def peft_config(adapter) -> Any | None:
    """``AdapterParams`` -> a peft config: ``LoraConfig`` (lora, qlora), ``PrefixTuningConfig``
    (prefix), ``PromptTuningConfig`` (prompt; random init); None for full fine-tuning."""
    if adapter.method == "full":
        return None
    if adapter.method == "prefix":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, task_type="CAUSAL_LM")
    if adapter.method == "prompt":
        from peft import PromptTuningConfig

        return PromptTuningConfig(num_virtual_tokens=adapter.num_virtual_tokens, task_type="CAUSAL_LM")
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
        peft_type = str(read_json(adapter_dir / "adapter_config.json").get("peft_type", ""))
        if peft_type in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
            raise TemperingError(f"{adapter_dir}: a {peft_type.lower()} adapter (virtual tokens) cannot be merged "
                                 "into the weights, so dpo/export cannot build on it; use it with peft "
                                 "(PeftModel.from_pretrained) or train sft with adapter.method: lora")
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


def merged_float32(model, base: str | os.PathLike):
    """A trained model as a plain float32 network: a peft model's adapter is saved and merged into
    a fresh float32 copy of ``base`` (its own base may be stored in bf16, see :func:`frozen_dtype`)."""
    import tempfile

    if not hasattr(model, "peft_config"):
        return model.float()
    with tempfile.TemporaryDirectory(prefix="tempering-merge-") as tmp:
        model.save_pretrained(tmp)
        return load_merged(base, [tmp])


def cast_frozen(model, adapter, precision: Precision):
    """Store a (not yet adapted) model's weights in the frozen dtype for ``adapter`` (no-op for full)."""
    dtype = frozen_dtype(adapter.method, precision, adapter.frozen_dtype)
    return model.to(dtype) if adapter.method != "qlora" else model


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
    ``max_prompt_length`` tokens (see ``_guarded``), then prompt + answer keeps its first
    ``max_length`` (TRL's collator, ``keep_start``)."""
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


# ============================================================================ checkpoints


def fingerprint(section, **inputs: str) -> str:
    """Hash of a stage's params section plus its input hashes: checkpoints resume only under it."""
    params = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return content_id({"params": params, "inputs": inputs}, 32)


def checkpoint_step(path: str | os.PathLike | None) -> int | None:
    """The global step of a Trainer checkpoint folder (``checkpoint-<step>``), or None: the one
    parser of checkpoint names (resume, tests, the stages' ``resumed_from``)."""
    if path is None:
        return None
    path = Path(path)
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
        step = checkpoint_step(path)
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
    evaluate = getattr(cfg, "eval_share", 0.0) > 0
    early = evaluate and getattr(cfg, "early_stopping_patience", 0) > 0
    common = dict(
        output_dir=str(output_dir),
        run_name=run_name,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
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
        # Eval loss on the held-out split at every checkpoint; with early stopping the best
        # checkpoint is kept (save_total_limit never deletes it) and loaded at the end.
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.save_steps if evaluate else None,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        report_to=report,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device == "cpu",
        # TRL defaults to True: the forward runs twice (~1.3-1.5x slower), only worth it for memory.
        gradient_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=0,
        dataloader_pin_memory=precision.device == "cuda",
        train_sampling_strategy="group_by_length",  # similar lengths per batch = little padding
        include_num_input_tokens_seen="non_padding",
        max_length=cfg.max_length,
        pad_to_multiple_of=None,
        push_to_hub=False,
        save_only_model=False,  # optimizer + scheduler + RNG states are needed to resume exactly
        disable_tqdm=_quiet(),
    )
    common.update(extra)
    if kind == "dpo":
        # precompute_ref_log_probs=True makes TRL keep no reference model and read the reference
        # log-probs from the dataset; we compute and cache them ourselves (see _guarded).
        return DPOConfig(**common, beta=cfg.beta, loss_type=[cfg.loss_type],
                         truncation_mode="keep_start", precompute_ref_log_probs=cfg.precompute_ref)
    # TRL's packing/padding-free stay off: we tokenize and pack ourselves (tokenize_sft, pack_sft),
    # TRL's dataset preparation is skipped and packed blocks get our own collator.
    return SFTConfig(**common, packing=False, padding_free=False,
                     dataset_kwargs={"skip_prepare_dataset": True},
                     completion_only_loss=False, assistant_only_loss=False)


def _quiet() -> bool:
    """Progress bars off in CI (CI=true) and when TQDM_DISABLE is set."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or bool(os.environ.get("TQDM_DISABLE"))


def _causal_lm_parts(model):
    """(decoder, lm_head) of a causal LM (through a peft/accelerate wrapper), or None when the
    model is not the plain decoder + head layout (prompt-learning peft models prepend tokens)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "peft_config"):
        if getattr(inner, "active_peft_config", None) is not None and inner.active_peft_config.is_prompt_learning:
            return None
        inner = inner.get_base_model()
    get_decoder = getattr(inner, "get_decoder", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder else None
    if decoder is None or head is None or decoder is inner:
        return None
    return decoder, head


def selective_lm_loss(model, inputs: dict, num_items_in_batch=None):
    """Causal-LM cross-entropy computing logits only where a label is trained.

    Same loss as the model's own (shifted labels, -100 ignored, sum / number of target tokens),
    but the LM head (49k x 576 for SmolLM2, ~20% of a forward) and the float32 softmax run only
    on target positions (assistant tokens in SFT) instead of every position. Returns None when
    the model does not have the decoder + LM head layout (the caller falls back)."""
    import torch.nn.functional as F

    parts = _causal_lm_parts(model)
    if parts is None:
        return None
    decoder, head = parts
    labels = inputs["labels"]
    kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    hidden = decoder(**kwargs, use_cache=False).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = head(hidden[keep]).float()
    loss = F.cross_entropy(logits, target[keep], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    return loss / denom.to(loss.device) if hasattr(denom, "to") else loss / denom


def install_compact_lm_head(model) -> bool:
    """Make TRL's fused LM head (``model(..., labels=..., fused_lm_head=True)``, used by DPO for the
    policy and the reference) score only the positions with a label, on devices without Triton.

    TRL 1.16 scores every position (prompt and padding included) and computes the entropy, mean
    logit and top-1 of each over the whole vocabulary unless Triton is available, i.e. on every
    CPU. DPO only needs completion tokens, a small share of each sequence. Same outputs
    (``FusedCausalLMOutput``, zeros where the label is -100), same loss. Returns whether it was
    installed (not for MoE router losses or pre-shifted labels, which keep TRL's path)."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    inner = getattr(model, "module", model)
    if hasattr(inner, "peft_config"):
        inner = inner.get_base_model()
    if getattr(inner, "_tempering_compact_head", False):
        return True
    if getattr(inner.config.get_text_config(), "output_router_logits", False):
        return False
    fused = inner.forward  # TRL's patched forward (falls back to the original without fused_lm_head)
    softcap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
    if softcap or getattr(inner.config.get_text_config(), "logit_scale", None) not in (None, 1.0):
        return False  # scaled heads keep TRL's kernel

    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or labels is None or kwargs.get("output_router_logits"):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = inner.get_decoder()(*args, **kwargs).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        picked = target[mask]
        logits = inner.get_output_embeddings()(hidden[mask]).float()
        logz = torch.logsumexp(logits, dim=-1)
        log_probs = logits.gather(-1, picked[:, None]).squeeze(-1) - logz
        with torch.no_grad():
            entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
            mean_logits = logits.mean(-1)
            is_top1 = logits.argmax(-1) == picked

        def full(x):
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs_full = full(log_probs)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs_full.sum() / denom, log_probs=log_probs_full,
                                   entropy=full(entropy), mean_logits=full(mean_logits),
                                   is_top1=torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
                                   .masked_scatter(mask, is_top1), label_mask=mask)

    inner.forward = forward
    inner._tempering_compact_head = True
    return True


def _packed_collator(pad_token_id: int):
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


def _ref_logps_path(key: str) -> Path:
    return cache_root() / "dpo_ref" / f"ref-{key}.json"


def _guarded(trainer_cls, stage: str, checkpoints: str, plain_loss: bool = False, dpo_cache: dict | None = None,
             compact_head: bool = False):
    """A trainer subclass that stops on a non-finite loss before the optimizer step.

    ``plain_loss``: compute the loss with :func:`selective_lm_loss` (logits at target positions
    only) instead of TRL's chunked log-prob kernel. On CPU with a 49k vocabulary the kernel made an
    SFT step ~35% slower (SmolLM2-135M, batch 8, fp32: 3.4 vs 2.5 s/step); it pays off on GPUs,
    where it saves the logits' memory. Same loss: labels carry the -100 mask.

    ``dpo_cache`` (DPO): ``{"max_prompt_length", "key"}``: prompts are cut to their last
    ``max_prompt_length`` tokens right after TRL tokenizes them, and TRL's reference-log-prob
    precompute is replaced by a content-addressed cache (see :func:`reference_cache_key`).
    ``compact_head`` (DPO): :func:`install_compact_lm_head` before the reference precompute.
    """
    from transformers import Trainer

    class Guarded(trainer_cls):
        if plain_loss:
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs["use_cache"] = False
                if not return_outputs:
                    loss = selective_lm_loss(model, inputs, num_items_in_batch)
                    if loss is not None:
                        return loss
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        if dpo_cache is not None:
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
                keep = dpo_cache["max_prompt_length"]

                # TRL 1.16 has no max_prompt_length: keep the end of long prompts (the latest turns
                # and the generation prompt), then the collator cuts prompt+completion at max_length.
                def _cut(ex):
                    prompt = ex["prompt_ids"][-keep:]
                    return {"prompt_ids": prompt,
                            "length": len(prompt) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))}

                return dataset.map(_cut)

            def _precompute_ref_logps(self, dataset, name, batch_size):
                if compact_head:
                    install_compact_lm_head(self.model)
                key = dpo_cache.get("key")
                if key and name != "train":  # the held-out split has its own reference set
                    key = content_id({"key": key, "split": name}, 32)
                return attach_reference_logps(self, dataset, key, batch_size)

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

        def _get_eval_sampler(self, eval_dataset):
            # The same for held-out DPO pairs (eval_share), whose rows have no input_ids either.
            full = self.eval_dataset
            if (self.args.train_sampling_strategy == "group_by_length" and eval_dataset is not None
                    and "input_ids" not in getattr(eval_dataset, "column_names", ("input_ids",))
                    and full is not None and "length" in getattr(full, "column_names", ())
                    and len(full) == len(eval_dataset)):
                import torch
                from transformers.trainer_pt_utils import LengthGroupedSampler

                return LengthGroupedSampler(self.args.eval_batch_size, lengths=list(full["length"]),
                                            generator=torch.Generator().manual_seed(self.args.seed))
            return super()._get_eval_sampler(eval_dataset)

    Guarded.__name__ = f"Guarded{trainer_cls.__name__}"
    return Guarded


def reference_cache_key(*, data: str, reference: str, tokenizer: str, max_length: int, max_prompt_length: int,
                        precision: str) -> str:
    """Content address of a DPO reference log-prob set: the preference data, the reference model
    (its weights' hash), the tokenizer + chat template, the max lengths and the autocast precision
    (bf16 and fp32 log-probs differ), plus the TRL version (its tokenization of pairs)."""
    import trl

    return content_id({"v": 1, "data": data, "reference": reference, "tokenizer": tokenizer,
                       "max_length": max_length, "max_prompt_length": max_prompt_length,
                       "precision": precision, "trl": trl.__version__}, 32)


def attach_reference_logps(trainer, dataset, key: str | None, batch_size: int):
    """Add ``ref_chosen_logps``/``ref_rejected_logps`` columns to a tokenized DPO dataset.

    With a ``key`` they are read from ``<cache>/dpo_ref/ref-<key>.json`` when present, else
    computed once with the reference (the policy with its adapter disabled, or the untouched
    full model: this runs before the first optimizer step) and written there atomically. Rows are
    processed longest-first in batches of ``2 * batch_size`` (no gradients: twice the batch fits)
    so padding is minimal, then put back in dataset order."""
    import torch

    n = len(dataset)
    path = _ref_logps_path(key) if key else None
    if path is not None and path.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, TemperingError):
            blob = read_json(path)
            if blob["rows"] == n:
                trainer._tempering_ref_cache = {"key": key, "hit": True, "seconds": 0.0}
                return dataset.add_column("ref_chosen_logps", blob["chosen"]).add_column(
                    "ref_rejected_logps", blob["rejected"])
    started = time.time()
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    rows = [{c: dataset[i][c] for c in cols} for i in range(n)]
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    order = sorted(range(n), key=lambda i: -lengths[i])
    chosen, rejected = [0.0] * n, [0.0] * n
    device = trainer.accelerator.device
    model = trainer.ref_model or trainer.model
    size = max(1, 2 * batch_size)
    for start in range(0, n, size):
        idx = order[start:start + size]
        batch = trainer.data_collator([rows[i] for i in idx])
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.no_grad():
            c, r = trainer.compute_ref_log_probs(model, batch)
        for j, i in enumerate(idx):
            chosen[i], rejected[i] = float(c[j]), float(r[j])
    if path is not None:
        write_json(path, {"rows": n, "chosen": chosen, "rejected": rejected})
    trainer._tempering_ref_cache = {"key": key, "hit": False, "seconds": round(time.time() - started, 2)}
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


def _callbacks(stage: str, checkpoints: str, live_dir: str | None, tracking, resume_step: int | None, cfg=None):
    LiveCallback, GuardCallback = _callbacks_module()
    guard = GuardCallback(stage, checkpoints)
    cbs = [guard]
    if live_dir and tracking.dvclive:
        cbs.append(LiveCallback(live_dir, resume_step))
    if cfg is not None and getattr(cfg, "eval_share", 0) > 0 and getattr(cfg, "early_stopping_patience", 0) > 0:
        from transformers import EarlyStoppingCallback

        cbs.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience,
                                         early_stopping_threshold=cfg.early_stopping_threshold))
    return guard, cbs + list(EXTRA_CALLBACKS)


def build_sft_trainer(model, tokenizer, dataset, args, *, stage: str, checkpoints: str,
                      live_dir: str | None, tracking, resume_step: int | None = None, eval_dataset=None,
                      cfg=None, selective_head: bool | None = None):
    """SFTTrainer on a pre-tokenized dataset (input_ids + labels; TRL's preparation skipped).
    Packed datasets (a ``seq_lengths`` column, see :func:`pack_sft`) get the packed collator.
    ``selective_head``: the loss through :func:`selective_lm_loss` (None = off CUDA only, the
    default; False = TRL's own loss, for the speed ablation in ``bench/bench_train.py``)."""
    from trl import SFTTrainer

    guard, callbacks = _callbacks(stage, checkpoints, live_dir, tracking, resume_step, cfg)
    plain = not str(args.device).startswith("cuda") if selective_head is None else bool(selective_head)
    collator = None
    if "seq_lengths" in dataset.column_names:
        collator = _packed_collator(tokenizer.pad_token_id)
    trainer = _guarded(SFTTrainer, stage, checkpoints, plain_loss=plain)(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        callbacks=callbacks, data_collator=collator)
    trainer._tempering_guard = guard
    return trainer


def build_dpo_trainer(model, tokenizer, dataset, args, *, adapter, max_prompt_length: int, stage: str,
                      checkpoints: str, live_dir: str | None, tracking, resume_step: int | None = None,
                      ref_cache_key: str | None = None, eval_dataset=None, cfg=None,
                      compact_head: bool | None = None):
    """DPOTrainer. The reference is the model as passed (the SFT result): with LoRA the ``model``
    gets a fresh adapter and the reference is the same network with the adapter disabled (no
    second copy); with ``full`` it is the untouched model. ``eval_dataset`` (held-out pairs) gets an
    eval loss at every checkpoint, and ``cfg.early_stopping_patience`` stops on it.

    With ``args.precompute_ref_log_probs`` the reference log-probs are computed once before
    training and cached under ``ref_cache_key`` (see :func:`attach_reference_logps`): no
    reference forward during training, and none at all on a later run with the same key. Without
    it LoRA runs the reference forward every step, and ``full`` keeps a frozen copy.
    ``compact_head``: :func:`install_compact_lm_head` (None = off CUDA only, the default; False =
    TRL's own fused head, for the speed ablation in ``bench/bench_train.py``)."""
    import copy

    from trl import DPOTrainer

    guard, callbacks = _callbacks(stage, checkpoints, live_dir, tracking, resume_step, cfg)
    config = peft_config(adapter)
    import torch

    ref_model = None
    if config is None and not args.precompute_ref_log_probs:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    torch.manual_seed(args.seed)
    compact = not str(args.device).startswith("cuda") if compact_head is None else bool(compact_head)
    # (TRL's kernel is compact with Triton, i.e. on GPUs)
    trainer = _guarded(DPOTrainer, stage, checkpoints,
                       dpo_cache={"max_prompt_length": max_prompt_length, "key": ref_cache_key},
                       compact_head=compact)(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, peft_config=config, callbacks=callbacks)
    if compact:
        install_compact_lm_head(trainer.model)
        if trainer.ref_model is not None:
            install_compact_lm_head(trainer.ref_model)
    trainer._tempering_guard = guard
    return trainer


def _finished(checkpoint: Path) -> bool:
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]:
        return True
    # Early stopping (or any callback) ended the run at this step: it is finished too.
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    return bool((control.get("args") or {}).get("should_training_stop"))


def train(trainer, resume_from: Path | None, before: dict) -> dict:
    """Run training (resuming when given a checkpoint); return the metrics every stage reports."""
    started = time.time()
    guard = trainer._tempering_guard
    if resume_from is not None and _finished(resume_from):
        # The run already reached its last step (the stage died after training, or DVC re-ran it):
        # load that checkpoint instead of training. (transformers would train one extra step here.)
        from transformers.trainer_callback import TrainerState

        trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        best = trainer.state.best_model_checkpoint
        if trainer.args.load_best_model_at_end and best and Path(best).exists():
            trainer._load_from_checkpoint(best)  # what the finished run ended with
        else:
            trainer._load_from_checkpoint(str(resume_from))
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
    evals = [(h["step"], float(h["eval_loss"])) for h in state.log_history if "eval_loss" in h]
    if evals:
        metrics["eval_loss_curve"] = [{"step": k, "eval_loss": v} for k, v in evals]
        metrics["eval_loss_last"] = evals[-1][1]
        metrics["eval_loss_best"] = min(v for _, v in evals)
        metrics["best_checkpoint"] = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
        planned = state.max_steps or 0
        metrics["stopped_early"] = bool(planned and state.global_step < planned)
    ref = getattr(trainer, "_tempering_ref_cache", None)
    if ref is not None:
        metrics["ref_logps_cache"] = dict(ref)
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
