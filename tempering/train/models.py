"""Models: loading, peft adapters, merging, and what a trained model's weights are.

Owns :func:`load_model` (follows ``pointer.json``; float32 weights, a frozen adapter base in the
autocast dtype, :func:`frozen_dtype`; QLoRA's 4-bit base on CUDA, :func:`check_qlora`),
:func:`load_for_inference` (the one loader of evaluate, export's sweep and replay), the peft
side (:func:`peft_config`: LoRA/rsLoRA/DoRA, QLoRA, prefix and prompt tuning;
:func:`apply_adapter`, :func:`live_adapter`, :func:`merge_adapter`, :func:`is_adapter_dir`),
merging in float32 (:func:`load_merged`, :func:`merged_float32`, :func:`cast_frozen`),
trainable-weight snapshots (:func:`snapshot_trainable`, :func:`weights_changed`), the decoder +
LM head split of a causal LM (:func:`causal_lm_parts`), the attention kernel
(:func:`attention_implementation`, :func:`use_attention`) and a model folder's ``meta.json``
(:func:`model_meta`).

The only module of tempering and tasks that imports peft (inside functions, like torch and
transformers; TRL's trainers import it too), and it never imports trl.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tempering import TemperingError
from tempering.io import read_json, resolve_model_dir
from tempering.train.data import load_tokenizer
from tempering.train.precision import Precision

ADAPTER_METHODS = ("lora", "prefix", "prompt")  # frozen base + small trainable adapter (qlora apart)

# ``attention: auto`` trains with eager attention on a CPU up to this max_length. Eager keeps each
# layer's [batch, heads, T, T] attention weights for the backward (~6 bytes an entry: 3.4 GB over
# SmolLM2's 30 layers at batch 8 and T = 512); past it, sdpa's flash kernel (memory linear in T).
EAGER_TRAIN_MAX_LENGTH = 512


def attention_implementation(setting: str, device: str, max_length: int | None = None, *,
                             training: bool = True) -> str | None:
    """The attention kernel for ``setting`` (a stage's ``attention``): eager, sdpa, or for ``auto``
    eager on a CPU (training: up to :data:`EAGER_TRAIN_MAX_LENGTH` tokens) and None otherwise
    (the model's own, sdpa). Measured on this 2-core AVX512-BF16 CPU, bf16 autocast, SmolLM2-135M
    (BENCHMARKS §2): eager beats sdpa, whose CPU flash kernel is slow at these lengths (its
    backward was 16% of an SFT step). An isolated forward + backward (batch 8, rows of 58-184
    tokens) ran 1.18-1.27x faster, the trainer's steps 1.09x (tuned TRL's 1.24x), the sft stage
    1.24x; benchmark scoring (no gradients) 1.15x."""
    if setting != "auto":
        return setting
    if device != "cpu":
        return None
    if training and (max_length is None or max_length > EAGER_TRAIN_MAX_LENGTH):
        return None
    return "eager"


def use_attention(model, setting: str, device: str, max_length: int | None = None, *, training: bool = True) -> str:
    """Switch a loaded (not yet peft-wrapped) model to :func:`attention_implementation`'s kernel;
    returns the kernel the model now uses (recorded in the stage's metrics)."""
    impl = attention_implementation(setting, device, max_length, training=training)
    if impl and getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)
    return str(getattr(model.config, "_attn_implementation", None))


PROMPT_LEARNING = ("prefix", "prompt")


def check_qlora(method: str, section: str = "") -> None:
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
    check_qlora(method, section)
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


def load_for_inference(folder: str | os.PathLike, device: str | None = None, attention: str | None = "auto"):
    """(model, tokenizer) of a saved model for scoring or generation: float32 weights (autocast
    picks the compute dtype), eval mode, KV cache on, on ``device`` (default: CUDA when present),
    the attention kernel :func:`use_attention` picks for ``attention`` (no gradients; None: the
    model's own).
    The one loader of evaluate, export's sweep and the replay stage."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(folder)
    if not (folder / "config.json").exists():
        raise TemperingError(f"{folder}: not a Hugging Face model folder (no config.json)")
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if attention is not None:
        use_attention(model, attention, torch.device(device).type, training=False)
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


def live_adapter(model, adapter_dir: str | os.PathLike):
    """``model`` with a saved peft adapter loaded on top, live (not merged)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir)


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


def causal_lm_parts(model):
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


def model_meta(folder: str | os.PathLike) -> dict:
    """``meta.json`` of a model folder (following pointers: the pointer's own meta first)."""
    folder = Path(folder)
    if (folder / "meta.json").exists():
        return read_json(folder / "meta.json")
    resolved = resolve_model_dir(folder)
    return read_json(resolved / "meta.json") if (resolved / "meta.json").exists() else {}

