"""Tiny random-weight models for tests and smoke runs (the TRL way: fast, real code paths).

``make_tiny_model(folder)`` writes a 2-layer Llama with a 512-token byte-level BPE tokenizer
(trained in about a second, deterministic) and a ChatML chat template, as a normal HF folder that
``base_model.source`` can point at. A train step takes milliseconds on CPU, so the whole DAG runs
in a test.

    python -m tempering.testing /tmp/tiny-model
"""

from __future__ import annotations

import sys
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an are be this which or "
    "have had not but what all were when we there can been one who will more no if out so said "
    "question answer user assistant system works lives colour color favourite town profession "
    "capital country city number larger smaller plus minus equals week days year red blue green "
    "yellow black white orange purple brown grey music piano sonata beethoven letter symphony "
    "quick brown fox jumps over lazy dog hello world model data train test a b c d e f g h i j k "
    "l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 ? ! . , : ; ' \" ( ) - + = / *"
).split()


def _corpus() -> list[str]:
    lines = []
    for i in range(len(_WORDS)):
        window = _WORDS[i:i + 12] + _WORDS[: max(0, i + 12 - len(_WORDS))]
        lines.append(" ".join(window))
        lines.append(" ".join(w.capitalize() for w in window[:6]) + ".")
    lines += ["".join(chr(c) for c in range(32, 127))]
    return lines


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 512
    return fast


def make_tiny_model(folder: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random Llama + tokenizer as an HF folder; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    out = make_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")
    print(out)
