"""cpt / sft / dpo stages on a tiny random Llama (the TRL way: real code paths, millisecond steps).

Covers: loss finite and adapter weights changed, metrics and dvclive curves, DPO's reference being
the SFT model with the adapter disabled, CPT pass-through and merge, resume after SIGKILL,
fingerprint mismatch restarting, and the NaN guard keeping the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tempering import TemperingError, stats
from tempering.config import from_dict
from tempering.io import resolve_model_dir
from tempering.train.callbacks import EXTRA_CALLBACKS
from tempering.train.checkpoints import checkpoint_step, valid_checkpoints
from tempering.train.data import CACHE_ENV, dpo_dataset, dpo_truncate, load_tokenizer, tokenize_preference
from tempering.train.dpo import build_dpo_trainer, dpo_config, reference_logps_path
from tempering.train.models import load_merged
from tempering.train.precision import choose_precision

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "sft": {"max_steps": 6, "batch_size": 4, "save_steps": 3, "logging_steps": 2, "learning_rate": 5e-3,
            "max_length": 96},
    "dpo": {"max_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1, "max_length": 96,
            "max_prompt_length": 64},
    "cpt": {"enabled": True, "max_steps": 3, "batch_size": 2, "block_size": 32, "save_steps": 2},
    "tracking": {"wandb": "disabled", "dvclive": True},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def make_params(**sections):
    return from_dict(_merge(SMALL, sections))


def write_rows(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "yellow", "black", "white"]
    sft, pref, text = [], [], []
    for i, colour in enumerate(colours * 3):
        sft.append({"id": f"s{i}", "source": f"sft.jsonl:{i + 1}", "messages": [
            {"role": "system", "content": "answer the question"},
            {"role": "user", "content": f"what is the colour of {i}?"},
            {"role": "assistant", "content": f"the colour is {colour}"},
            {"role": "user", "content": "and the town?"},
            {"role": "assistant", "content": f"the town is {colours[(i + 1) % 6]} town"}]})
    for i, colour in enumerate(colours * 2):
        pref.append({"id": f"p{i}", "source": f"preference.jsonl:{i + 1}",
                     "prompt": [{"role": "user", "content": f"what colour is {i}?"}],
                     "chosen": f"it is {colour}", "rejected": "the lazy dog"})
    for i in range(8):
        text.append({"id": f"t{i}", "source": f"text.jsonl:{i + 1}",
                     "text": f"the quick brown fox {i} jumps over the lazy dog. " * 4})
    for name, rows in (("sft", sft), ("preference", pref), ("text", text)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tempering.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "clean")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models on one thread (see conftest.one_thread)."""


@pytest.fixture(autouse=True)
def _no_injected_callbacks():
    yield
    EXTRA_CALLBACKS.clear()


def run_sft(params, tiny, data, root: Path, **kw) -> dict:
    from tasks.sft import run

    return run(params, base=str(tiny), data=str(data), out=str(root / "sft"), checkpoints=str(root / "ck_sft"),
               metrics=str(root / "sft.json"), live=kw.get("live", str(root / "live_sft")))


@pytest.fixture(scope="module")
def sft_done(tiny, data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft_done")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "cache"))
        run_sft(make_params(), tiny, data, root)
    return root


# ----------------------------------------------------------------------------- sft


def _lora_b_nonzero(folder: Path) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    bs = [t for k, t in tensors.items() if "lora_B" in k]
    assert bs, "adapter has no LoRA B matrices"
    return any(t.abs().sum().item() > 0 for t in bs)  # B starts at zero: nonzero = trained


def test_sft_trains_the_adapter_and_reports(sft_done: Path):
    m = json.loads((sft_done / "sft.json").read_text())
    assert m["steps"] == 6 and m["session_steps"] == 6 and m["resumed_from"] is None
    assert math.isfinite(m["train_loss_first"]) and math.isfinite(m["train_loss_last"])
    assert m["final_loss_finite"] is True and m["weights_changed"] is True
    assert m["tokens_seen"] > 0 and m["tokens_per_s"] > 0 and m["s_per_step"] > 0
    assert 0 < m["trainable_params"] < 200_000
    assert m["data"]["examples"] == 18 and m["data"]["target_tokens"] > 0
    out = sft_done / "sft"
    assert (out / "adapter_config.json").exists() and (out / "meta.json").exists()
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert _lora_b_nonzero(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "sft" and meta["params"]["learning_rate"] == 5e-3 and meta["train"]["steps"] == 6
    # dvclive curves where dvc.yaml's plots read them, indexed by optimizer step.
    tsv = sft_done / "live_sft" / "plots" / "metrics" / "train" / "loss.tsv"
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["step", "loss"] and len(lines) >= 3
    assert not list(sft_done.glob(".tmp-*"))


def test_sft_full_finetune_saves_a_model(tiny, data, tmp_path):
    from transformers import AutoModelForCausalLM

    params = make_params(sft={"adapter": {"method": "full"}, "max_steps": 2, "learning_rate": 1e-3})
    run_sft(params, tiny, data, tmp_path)
    m = json.loads((tmp_path / "sft.json").read_text())
    assert m["weights_changed"] is True and m["trainable_params"] > 100_000
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert any((a != b).any() for a, b in zip(tuned.parameters(), base.parameters()))


# ----------------------------------------------------------------------------- dpo


def test_dpo_starts_from_the_sft_model_and_learns(sft_done, tiny, data, tmp_path):
    from tasks.dpo import run
    from tempering.train.dpo import SHARED_PROMPT_BATCHES

    before = dict(SHARED_PROMPT_BATCHES)
    run(make_params(), base=str(tiny), sft=str(sft_done / "sft"), data=str(data), out=str(tmp_path / "dpo"),
        checkpoints=str(tmp_path / "ck"), metrics=str(tmp_path / "dpo.json"), live=str(tmp_path / "live"))
    m = json.loads((tmp_path / "dpo.json").read_text())
    # Every batch (the reference precompute's and the 4 training steps') ran each prompt once; the
    # reference log-probs checked below come from that shared forward.
    assert SHARED_PROMPT_BATCHES["shared"] - before["shared"] >= 5
    assert SHARED_PROMPT_BATCHES["unshared"] == before["unshared"]
    # At step 1 the policy (SFT merged + fresh LoRA) equals the reference (adapter disabled), so
    # the sigmoid DPO loss is exactly log 2. That alone holds for any reference equal to the policy.
    assert m["train_loss_first"] == pytest.approx(math.log(2), abs=1e-4)
    assert m["steps"] == 4 and math.isfinite(m["train_loss_last"]) and m["weights_changed"] is True
    assert "rewards_accuracies_last" in m and "rewards_margins_last" in m
    assert _lora_b_nonzero(tmp_path / "dpo")
    assert (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").exists()
    # No pairs held out (dpo.heldout_share 0): no per-pair file, and the meta says why.
    assert not (tmp_path / "dpo" / "heldout.jsonl").exists()
    assert json.loads((tmp_path / "dpo" / "meta.json").read_text())["heldout"] == {
        "file": None, "pairs": 0, "reason": "dpo.heldout_share is 0.0: no preference pairs were held out"}
    # ...so check what the reference is: the reference log-probs DPO trained against are the SFT
    # model's own, computed here independently, and not the base model's.
    cache = m["ref_logps_cache"]
    assert cache["hit"] is False and cache["key"]
    blob = json.loads(reference_logps_path(cache["key"]).read_text())
    rows = [json.loads(x) for x in (data / "preference.jsonl").read_text().splitlines()]
    assert blob["rows"] == len(rows)
    p = make_params().dpo
    tok = load_tokenizer(sft_done / "sft")
    sft_model = load_merged(tiny, [sft_done / "sft"])
    base_model = load_merged(tiny, [])
    ours_sft, ours_base = [], []
    for row in rows:
        enc = dpo_truncate(tokenize_preference(tok, row["prompt"], row["chosen"], row["rejected"]),
                           p.max_length, p.max_prompt_length)
        ours_sft.append(_completion_logp(sft_model, enc["prompt_ids"], enc["chosen_ids"]))
        ours_base.append(_completion_logp(base_model, enc["prompt_ids"], enc["chosen_ids"]))
    gap_sft = max(abs(a - b) for a, b in zip(blob["chosen"], ours_sft))
    gap_base = max(abs(a - b) for a, b in zip(blob["chosen"], ours_base))
    assert gap_sft < 0.05, (gap_sft, blob["chosen"][:3], ours_sft[:3])
    assert gap_base > 10 * max(gap_sft, 1e-3), (gap_base, gap_sft)


def _completion_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Summed log p(completion | prompt), float32, by hand (no TRL)."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits.float()[0, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt_ids) - 1:].sum())


def test_full_dpo_uses_precomputed_reference_from_the_sft_model(sft_done, tiny, data, tmp_path):
    from tasks.dpo import run

    run(make_params(dpo={"adapter": {"method": "full"}, "max_steps": 2}), base=str(tiny), sft=str(sft_done / "sft"),
        data=str(data), out=str(tmp_path / "dpo"), checkpoints=str(tmp_path / "ck"),
        metrics=str(tmp_path / "dpo.json"))
    m = json.loads((tmp_path / "dpo.json").read_text())
    assert m["train_loss_first"] == pytest.approx(math.log(2), abs=1e-4)
    assert m["weights_changed"] is True and m["trainable_params"] > 100_000
    assert (tmp_path / "dpo" / "config.json").exists() and not (tmp_path / "dpo" / "adapter_config.json").exists()


def test_dpo_reference_is_the_policy_with_adapter_disabled(sft_done, tiny, data, tmp_path):
    """No second model in memory: TRL gets no ref_model and disables the adapter instead."""
    from peft import PeftModel

    p = make_params()
    tok = load_tokenizer(sft_done / "sft")
    model = load_merged(tiny, [sft_done / "sft"])
    args = dpo_config(p.dpo, p.tracking, output_dir=str(tmp_path),
                      precision=choose_precision("fp32"), run_name="dpo")
    trainer = build_dpo_trainer(
        model, tok, dpo_dataset([json.loads(x) for x in (data / "preference.jsonl").read_text().splitlines()]),
        args, adapter=p.dpo.adapter, max_prompt_length=5, stage="dpo", checkpoints=str(tmp_path),
        live_dir=None, tracking=p.tracking)
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    assert max(len(x) for x in trainer.train_dataset["prompt_ids"]) <= 5  # dpo.max_prompt_length
    # validate's preference token checks see exactly what DPO trains on (tokenize_preference + dpo_truncate)
    rows = [json.loads(x) for x in (data / "preference.jsonl").read_text().splitlines()]
    for row, ex in zip(rows, trainer.train_dataset):
        enc = tokenize_preference(tok, row["prompt"], row["chosen"], row["rejected"])
        cut = dpo_truncate(enc, p.dpo.max_length, 5)
        assert (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) == \
            (cut["prompt_ids"], enc["chosen_ids"], enc["rejected_ids"])
        assert len(enc["prompt_ids"]) > 5  # the cut happened, and both sides agree on it


# ----------------------------------------------------------------------------- the same run in another folder


def test_saved_models_name_no_folder_and_hash_the_same_in_any_clone(tmp_path, monkeypatch):
    """The same run in two clones (two folders) saves the same SFT and DPO adapters: no saved file
    names the folder (peft wrote the base's absolute path into adapter_config.json and README.md),
    so their content hashes, and DPO's fingerprint and reference log-prob cache key built on the
    SFT adapter's hash, agree. meta.json is provenance (it records the arguments as given) and is
    not part of a hash."""
    from tasks.dpo import run as run_dpo
    from tempering.io import hash_path
    from tempering.testing import make_tiny_model

    params = make_params(sft={"max_steps": 2, "save_steps": 2}, dpo={"max_steps": 2, "save_steps": 2})
    seen = []
    for clone in (tmp_path / "a" / "clone", tmp_path / "b" / "elsewhere" / "clone"):
        monkeypatch.setenv(CACHE_ENV, str(clone / "cache"))  # each clone computes its own
        base, data, models = make_tiny_model(clone / "models" / "base"), write_rows(clone / "data" / "clean"), \
            clone / "models"
        run_sft(params, base, data, models)
        run_dpo(params, base=str(base), sft=str(models / "sft"), data=str(data), out=str(models / "dpo"),
                checkpoints=str(models / "ck_dpo"), metrics=str(models / "dpo.json"))
        for stage in ("sft", "dpo"):
            folder = models / stage
            assert not (folder / "README.md").exists()
            leaks = [f.name for f in folder.iterdir() if f.name != "meta.json" and str(clone).encode() in f.read_bytes()]
            assert leaks == [], f"{stage}: {leaks} name the folder {clone}"
        base_hash, sft_hash = hash_path(base), hash_path(models / "sft")
        named = {stage: json.loads((models / stage / "adapter_config.json").read_text())["base_model_name_or_path"]
                 for stage in ("sft", "dpo")}
        assert named == {"sft": base_hash, "dpo": f"{base_hash}+{sft_hash}"}
        seen.append({"base": base_hash, "sft": sft_hash, "dpo": hash_path(models / "dpo"),
                     "sft_fingerprint": json.loads((models / "sft" / "meta.json").read_text())["fingerprint"],
                     "dpo_fingerprint": json.loads((models / "dpo" / "meta.json").read_text())["fingerprint"],
                     "ref_logps_key": json.loads((models / "dpo.json").read_text())["ref_logps_cache"]["key"]})
    assert seen[0] == seen[1]
    # ...and the adapters still load onto the base tempering passes them.
    assert load_merged(base, [models / "sft", models / "dpo"]) is not None


# ----------------------------------------------------------------------------- cpt


def test_cpt_disabled_passes_the_base_through(tiny, data, tmp_path):
    from tasks.cpt import run

    out = tmp_path / "models" / "cpt"
    summary = run(make_params(cpt={"enabled": False}), base=str(tiny), data=str(data), out=str(out),
                  checkpoints=str(tmp_path / "ck"), metrics=str(tmp_path / "cpt.json"))
    assert summary["enabled"] is False
    pointer = json.loads((out / "pointer.json").read_text())
    assert not Path(pointer["model"]).is_absolute()
    assert resolve_model_dir(out) == tiny.resolve()
    assert not list(out.glob("*.safetensors")) and (out / "meta.json").exists()
    assert json.loads((tmp_path / "cpt.json").read_text())["steps"] == 0


def test_cpt_enabled_trains_and_saves_a_merged_model(tiny, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from tasks.cpt import run

    out = tmp_path / "cpt"
    run(make_params(), base=str(tiny), data=str(data), out=str(out), checkpoints=str(tmp_path / "ck"),
        metrics=str(tmp_path / "cpt.json"))
    m = json.loads((tmp_path / "cpt.json").read_text())
    assert m["enabled"] is True and m["steps"] == 3 and m["weights_changed"] is True
    assert math.isfinite(m["train_loss_last"])
    assert not (out / "pointer.json").exists() and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert not any("lora" in k for k in merged.state_dict())
    assert any((a != b).any() for a, b in zip(merged.parameters(), base.parameters()))
    assert merged.config.use_cache is True


# ----------------------------------------------------------------------------- resume


def _write_params(path: Path, **sections) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    path.write_text(yaml.safe_dump(_merge(_merge(raw, SMALL), sections)))
    return path


def _sft_cmd(params: Path, tiny: Path, data: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "tasks.sft", "--params", str(params), "--base", str(tiny), "--data", str(data),
            "--out", str(root / "sft"), "--checkpoints", str(root / "ck"), "--metrics", str(root / "sft.json"),
            "--live", str(root / "live")]


def test_resume_after_sigkill(tiny, data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CI="true", WANDB_MODE="disabled",
               **{CACHE_ENV: str(tmp_path / "cache")})
    params = _write_params(tmp_path / "params.yaml", sft={"max_steps": 100, "save_steps": 5, "logging_steps": 1})
    cmd = _sft_cmd(params, tiny, data, tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not valid_checkpoints(tmp_path / "ck"):
            assert proc.poll() is None, f"sft exited before its first checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "sft").exists(), "killed run must not leave a final output"
    killed_at = checkpoint_step(valid_checkpoints(tmp_path / "ck")[-1])
    assert killed_at < 100

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((tmp_path / "sft.json").read_text())
    resumed = int(Path(m["resumed_from"]).name.removeprefix("checkpoint-"))  # the name, as a user reads it
    assert resumed >= killed_at
    assert m["steps"] == 100 and m["session_steps"] == 100 - resumed
    # The trainer state carried over: the loss log starts at step 1, from the killed run.
    state = json.loads((valid_checkpoints(tmp_path / "ck")[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 100 and state["log_history"][0]["step"] == 1
    # Every step's exact loss, across the kill: steps 1..killed from the first process.
    curve = json.loads((tmp_path / "sft" / "meta.json").read_text())["loss_curve"]
    assert [c["step"] for c in curve] == list(range(1, 101))
    steps = [int(x.split("\t")[0]) for x in (tmp_path / "live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 100


def test_same_fingerprint_resumes_other_fingerprint_restarts(tiny, data, tmp_path):
    p = make_params(sft={"max_steps": 4, "save_steps": 2})
    first = run_sft(p, tiny, data, tmp_path)
    assert first["resumed_from"] is None
    again = run_sft(p, tiny, data, tmp_path)  # e.g. the stage crashed after training
    assert again["resumed_from"].endswith("checkpoint-4") and again["steps"] == 4
    assert (again["train_loss_first"], again["train_loss_last"]) == (first["train_loss_first"], first["train_loss_last"])
    assert json.loads((tmp_path / "sft.json").read_text())["session_steps"] == 0
    changed = run_sft(make_params(sft={"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3}), tiny, data, tmp_path)
    assert changed["resumed_from"] is None and changed["steps"] == 4
    fp = json.loads((tmp_path / "ck_sft" / "fingerprint.json").read_text())["fingerprint"]
    assert fp == json.loads((tmp_path / "sft" / "meta.json").read_text())["fingerprint"]


def test_a_run_that_crashed_after_its_last_step_still_writes_its_curves(tiny, data, tmp_path):
    """DVC removes a stage's outputs before it runs. A stage that crashed after training (say in
    held-out scoring) resumes from its last checkpoint with nothing left to train: its dvclive
    curves must still be there (DVC fails the stage on a missing output), logged again from the
    checkpoint's trainer state."""
    import shutil

    p = make_params(sft={"max_steps": 4, "save_steps": 2, "logging_steps": 1})
    run_sft(p, tiny, data, tmp_path)
    loss = tmp_path / "live_sft/plots/metrics/train/loss.tsv"
    first = loss.read_text().splitlines()
    shutil.rmtree(tmp_path / "live_sft")   # what `dvc repro` does to the stage's outs
    again = run_sft(p, tiny, data, tmp_path)
    assert again["resumed_from"].endswith("checkpoint-4")
    assert json.loads((tmp_path / "sft.json").read_text())["session_steps"] == 0
    assert loss.read_text().splitlines() == first and len(first) == 1 + 4


# ----------------------------------------------------------------------------- NaN guard


def _poison(when: str, step: int):
    """A callback that breaks training at ``step`` (NaN weights before the forward, or inf grads
    before the optimizer step)."""
    import torch
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if when == "loss" and state.global_step + 1 == step:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if when == "grad" and state.global_step + 1 == step:
                next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("inf"))

    return Poison()


@pytest.mark.parametrize("when", ["loss", "grad"])
def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny, data, tmp_path, when):
    EXTRA_CALLBACKS.append(_poison(when, 3))
    with pytest.raises(TemperingError) as err:
        run_sft(make_params(sft={"max_steps": 6, "save_steps": 1}), tiny, data, tmp_path)
    msg = str(err.value)
    assert "step 3" in msg and "checkpoint-2" in msg and "\n" not in msg
    good = valid_checkpoints(tmp_path / "ck_sft")
    assert good[-1].name == "checkpoint-2"  # the poisoned step was never saved
    from safetensors.torch import load_file

    import torch

    weights = load_file(good[-1] / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "sft").exists()


# ----------------------------------------------------------------------------- other adapters


@pytest.mark.parametrize("method,peft_type", [("prefix", "PREFIX_TUNING"), ("prompt", "PROMPT_TUNING")])
def test_prefix_and_prompt_tuning_train_and_refuse_to_merge(tiny, data, tmp_path, method, peft_type):
    p = make_params(sft={"adapter": {"method": method, "num_virtual_tokens": 4}, "max_steps": 2})
    run_sft(p, tiny, data, tmp_path)
    m = json.loads((tmp_path / "sft.json").read_text())
    assert m["method"] == method and m["weights_changed"] is True and math.isfinite(m["train_loss_last"])
    assert 0 < m["trainable_params"] < 10_000  # virtual tokens only (4 x hidden, x layers for prefix)
    cfg = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type and cfg["num_virtual_tokens"] == 4
    # Virtual tokens cannot be folded into weights: dpo/export say so in one line.
    with pytest.raises(TemperingError, match="cannot be merged") as err:
        load_merged(tiny, [tmp_path / "sft"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flag", ["use_rslora", "use_dora"])
def test_rslora_and_dora_train(tiny, data, tmp_path, flag):
    from safetensors.torch import load_file

    run_sft(make_params(sft={"adapter": {flag: True}, "max_steps": 2}), tiny, data, tmp_path)
    m = json.loads((tmp_path / "sft.json").read_text())
    assert m["weights_changed"] is True and math.isfinite(m["train_loss_last"])
    assert json.loads((tmp_path / "sft" / "adapter_config.json").read_text())[flag] is True
    keys = load_file(tmp_path / "sft" / "adapter_model.safetensors").keys()
    assert any("lora_magnitude_vector" in k for k in keys) == (flag == "use_dora")
    merged = load_merged(tiny, [tmp_path / "sft"])  # both merge into plain weights
    assert not any("lora" in k for k in merged.state_dict())


def test_sft_packing_trains_on_fewer_fuller_batches(tiny, data, tmp_path):
    p = make_params(sft={"packing": True, "max_steps": 2, "batch_size": 2, "max_length": 256})
    run_sft(p, tiny, data, tmp_path)
    m = json.loads((tmp_path / "sft.json").read_text())
    packing = m["data"]["packing"]
    assert packing["blocks"] < m["data"]["examples"] and 0.5 < packing["fill"] <= 1.0
    assert m["weights_changed"] is True and math.isfinite(m["train_loss_last"])
    assert m["tokens_seen"] > 2 * 2 * 100  # two steps of two ~full 256-token blocks


def test_early_stopping_on_eval_loss_keeps_the_best_checkpoint(tiny, data, tmp_path):
    # A threshold no eval can beat: the first eval sets the best, the next one exhausts patience 1.
    p = make_params(sft={"max_steps": 12, "save_steps": 2, "eval_share": 0.25, "early_stopping_patience": 1,
                         "early_stopping_threshold": 100.0})
    run_sft(p, tiny, data, tmp_path)
    m = json.loads((tmp_path / "sft.json").read_text())
    assert m["data"]["eval_examples"] == 4 and m["data"]["train_examples"] == 14
    assert m["stopped_early"] is True and m["steps"] == 4
    curve = json.loads((tmp_path / "sft" / "meta.json").read_text())["eval_loss_curve"]
    assert [c["step"] for c in curve] == [2, 4]
    # The best checkpoint (lowest eval loss, whatever the stopping threshold) is the one kept.
    best = min(curve, key=lambda c: c["eval_loss"])
    assert m["best_checkpoint"] == f"checkpoint-{best['step']}" and m["eval_loss_best"] == best["eval_loss"]
    # Re-running the stage after an early stop does not train on: the run is finished.
    again = run_sft(p, tiny, data, tmp_path)
    assert again["steps"] == 4 and json.loads((tmp_path / "sft.json").read_text())["session_steps"] == 0


def test_early_stopping_without_a_held_out_split_is_refused():
    from tempering.config import ParamsError

    with pytest.raises(ParamsError, match="early_stopping_patience needs eval_share"):
        make_params(sft={"early_stopping_patience": 2})
    with pytest.raises(ParamsError, match="sft only"):
        make_params(dpo={"adapter": {"method": "prompt"}})


# ----------------------------------------------------------------------------- DPO reference cache


def _run_dpo(params, tiny, sft_done, data, root: Path) -> dict:
    from tasks.dpo import run

    run(params, base=str(tiny), sft=str(sft_done / "sft"), data=str(data), out=str(root / "dpo"),
        checkpoints=str(root / "ck"), metrics=str(root / "dpo.json"))
    return json.loads((root / "dpo.json").read_text())


def test_dpo_reference_logps_are_cached_by_content_and_reused(sft_done, tiny, data, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    p = make_params(dpo={"max_steps": 2})
    first = _run_dpo(p, tiny, sft_done, data, tmp_path / "a")
    assert first["ref_logps_cache"]["hit"] is False
    files = list((tmp_path / "cache" / "dpo_ref").glob("ref-*.json"))
    assert len(files) == 1
    blob = json.loads(files[0].read_text())
    assert blob["rows"] == 12 and all(x < 0 for x in blob["chosen"] + blob["rejected"])
    # Another run (other learning rate, other checkpoint folder) with the same data, reference and
    # lengths reads them back: policy = reference at step 1 again, so the loss is log 2 again.
    second = _run_dpo(make_params(dpo={"max_steps": 2, "learning_rate": 1e-4}), tiny, sft_done, data, tmp_path / "b")
    assert second["ref_logps_cache"]["hit"] is True and second["ref_logps_cache"]["key"] == first["ref_logps_cache"]["key"]
    assert second["train_loss_first"] == first["train_loss_first"] == pytest.approx(math.log(2), abs=1e-4)
    # Another max_length is another reference set.
    third = _run_dpo(make_params(dpo={"max_steps": 1, "max_length": 80}), tiny, sft_done, data, tmp_path / "c")
    assert third["ref_logps_cache"]["hit"] is False
    assert len(list((tmp_path / "cache" / "dpo_ref").glob("ref-*.json"))) == 2


def test_dpo_without_precompute_uses_the_reference_forward(sft_done, tiny, data, tmp_path):
    m = _run_dpo(make_params(dpo={"max_steps": 2, "precompute_ref": False}), tiny, sft_done, data, tmp_path)
    assert "ref_logps_cache" not in m
    assert m["train_loss_first"] == pytest.approx(math.log(2), abs=1e-4) and m["weights_changed"] is True


@pytest.mark.parametrize("case", ["disabled", "no_rows"])
def test_dpo_optional_passes_the_sft_model_through(sft_done, tiny, data, tmp_path, case):
    """dpo.enabled: false, or no preference rows (none given, or all quarantined): no training, a
    pointer to the SFT model, and a note saying why (an SFT-only project runs end to end)."""
    from tasks.dpo import run

    if case == "no_rows":
        empty = tmp_path / "clean"
        empty.mkdir()
        (empty / "preference.jsonl").write_text("")
        params, folder = make_params(), empty
    else:
        params, folder = make_params(dpo={"enabled": False}), data
    stale = tmp_path / "ck" / "checkpoint-2"  # a trained run's checkpoint is stale now
    stale.mkdir(parents=True)
    out = tmp_path / "models" / "dpo"
    live = tmp_path / "live"
    (live / "plots" / "metrics" / "train").mkdir(parents=True)
    (live / "plots" / "metrics" / "train" / "loss.tsv").write_text("step\tloss\n1\t0.69\n")  # a stale curve
    summary = run(params, base=str(tiny), sft=str(sft_done / "sft"), data=str(folder), out=str(out),
                  checkpoints=str(tmp_path / "ck"), metrics=str(tmp_path / "dpo.json"), live=str(live))
    m = json.loads((tmp_path / "dpo.json").read_text())
    assert summary["trained"] is False and m["trained"] is False and m["steps"] == 0
    assert m["enabled"] is (case == "no_rows")
    expected = "dpo.enabled is false" if case == "disabled" else f"no preference rows to train on ({folder}"
    assert m["note"].startswith(expected)
    assert resolve_model_dir(out) == (sft_done / "sft").resolve()
    assert not Path(json.loads((out / "pointer.json").read_text())["model"]).is_absolute()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "dpo" and meta["trained"] is False and meta["note"] == m["note"]
    assert not list(out.glob("*.safetensors")) and not stale.exists()
    assert not (out / "heldout.jsonl").exists() and "heldout" not in meta  # no alignment claim to check
    # dvc.yaml's plots output still exists, with no points (the stale curve is gone)
    assert (live / "plots" / "metrics" / "train" / "loss.tsv").read_text() == "step\tloss\n"


def test_dpo_without_a_preference_file_names_it(sft_done, tiny, tmp_path):
    from tasks.dpo import run

    with pytest.raises(TemperingError, match=r"preference.jsonl: not found .*dpo.enabled: false"):
        run(make_params(), base=str(tiny), sft=str(sft_done / "sft"), data=str(tmp_path), out=str(tmp_path / "o"),
            checkpoints=str(tmp_path / "ck"), metrics=str(tmp_path / "dpo.json"))


def test_dpo_early_stopping_on_held_out_pairs(sft_done, tiny, data, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    # A threshold no eval can beat: the first eval sets the best, the next one exhausts patience 1.
    p = make_params(dpo={"max_steps": 12, "save_steps": 2, "batch_size": 2, "eval_share": 0.25,
                         "early_stopping_patience": 1, "early_stopping_threshold": 100.0})
    m = _run_dpo(p, tiny, sft_done, data, tmp_path)
    assert m["eval_pairs"] == 3 and m["train_pairs"] == 9 and m["pairs"] == 12
    assert m["stopped_early"] is True and m["steps"] == 4
    curve = json.loads((tmp_path / "dpo" / "meta.json").read_text())["eval_loss_curve"]
    assert [c["step"] for c in curve] == [2, 4] and all(math.isfinite(c["eval_loss"]) for c in curve)
    best = min(curve, key=lambda c: c["eval_loss"])
    assert m["best_checkpoint"] == f"checkpoint-{best['step']}" and m["eval_loss_best"] == best["eval_loss"]
    # the held-out pairs have their own reference log-probs, cached beside the training split's
    blobs = sorted(json.loads(f.read_text())["rows"] for f in (tmp_path / "cache" / "dpo_ref").glob("ref-*.json"))
    assert blobs == [3, 9]
    # a re-run after the early stop does not train on
    again = _run_dpo(p, tiny, sft_done, data, tmp_path)
    assert again["steps"] == 4 and again["session_steps"] == 0
    from tempering.config import ParamsError

    with pytest.raises(ParamsError, match="dpo: .*early_stopping_patience needs eval_share"):
        make_params(dpo={"early_stopping_patience": 2})


# ----------------------------------------------------------------------------- dpo, measured


def test_heldout_split_keeps_whole_prompts_out_of_training():
    from tasks.dpo import _prompt_key, heldout_split

    rows = [{"prompt": [{"role": "user", "content": f"Q {i // 2}"}], "chosen": "a", "rejected": f"b{i}"}
            for i in range(20)]  # 10 prompts, two pairs each
    train, held = heldout_split(rows, 0.2, seed=0)
    assert len(held) == 4 and len(train) == 16
    assert not {_prompt_key(r) for r in held} & {_prompt_key(r) for r in train}
    assert heldout_split(rows, 0.2, seed=0) == (train, held)  # seeded
    assert heldout_split(rows, 0.0, seed=0) == (rows, [])
    one = rows[:2]  # a single prompt always stays for training
    assert heldout_split(one, 0.5, seed=0) == (one, [])


def test_heldout_report_accuracy_margin_and_paired_interval():
    from tasks.dpo import heldout_report

    # 40 pairs: DPO prefers chosen on all, SFT on half, the base on a quarter.
    scores = {"dpo": [(-1.0, -3.0)] * 40,
              "sft": [(-2.0, -2.5)] * 20 + [(-2.5, -2.0)] * 20,
              "base": [(-2.0, -2.5)] * 10 + [(-2.5, -2.0)] * 30}
    r = heldout_report(scores, beta=0.1, seed=0)
    assert r["pairs"] == 40 and r["accuracy"] == {"dpo": 1.0, "sft": 0.5, "base": 0.25}
    assert r["margin"]["dpo"] == pytest.approx(2.0) and r["margin"]["sft"] == pytest.approx(0.0)
    assert r["implicit_reward"]["accuracy"] == 1.0 and r["implicit_reward"]["margin"] == pytest.approx(0.2)
    assert r["dpo_vs_sft"]["accuracy_delta"] == pytest.approx(0.5) and r["dpo_vs_sft"]["gain_certified"] is True
    assert r["dpo_vs_sft"]["ci"][0] > 0.3
    same = heldout_report({"dpo": scores["sft"], "sft": scores["sft"], "base": scores["sft"]}, beta=0.1, seed=0)
    assert same["dpo_vs_sft"]["accuracy_delta"] == 0.0 and same["dpo_vs_sft"]["gain_certified"] is False


def test_dpo_scores_its_heldout_pairs_with_base_sft_and_dpo(sft_done, tiny, data, tmp_path):
    from tasks.dpo import heldout_split, run
    from tempering import preference

    p = make_params(dpo={"heldout_share": 0.25, "precision": "fp32"})
    run(p, base=str(tiny), sft=str(sft_done / "sft"), data=str(data),
        out=str(tmp_path / "dpo"), checkpoints=str(tmp_path / "ck"), metrics=str(tmp_path / "dpo.json"))
    m = json.loads((tmp_path / "dpo.json").read_text())
    h = m["heldout"]
    assert m["heldout_pairs"] == 3 and m["train_pairs"] == 9 and m["pairs"] == 12
    assert h["pairs"] == 3 and h["prompts"] == 3 and set(h["accuracy"]) == {"dpo", "sft", "base"}
    assert all(0.0 <= v <= 1.0 for v in h["accuracy"].values())
    # The SFT model is the DPO reference; its margins differ from the base's (SFT trained).
    assert h["margin"]["sft"] != h["margin"]["base"]
    assert set(h["dpo_vs_sft"]) == {"accuracy_delta", "ci", "p_no_gain", "gain_certified"}

    # The per-pair file (the gate's alignment evidence): the held-out pairs, never trained on,
    # with each model's log-probs; the aggregates above are computed from exactly these.
    rows = preference.read_heldout(tmp_path / "dpo" / "heldout.jsonl")
    _, held = heldout_split([json.loads(x) for x in (data / "preference.jsonl").read_text().splitlines()],
                            0.25, p.dpo.seed)
    assert [r["id"] for r in rows] == [r["id"] for r in held]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == \
        [(r["prompt"], r["chosen"], r["rejected"]) for r in held]
    for who in ("base", "sft", "dpo"):
        margins = [preference.margin(r["logp"][who]) for r in rows]
        assert h["margin"][who] == pytest.approx(sum(margins) / 3, abs=1e-4)
        assert h["accuracy"][who] == pytest.approx(sum(map(stats.preference_accuracy, margins)) / 3, abs=1e-4)
    meta = json.loads((tmp_path / "dpo" / "meta.json").read_text())["heldout"]
    assert meta["file"] == "heldout.jsonl" and meta["pairs"] == 3 and meta["scoring"]["precision"] == "fp32"
    assert (meta["scoring"]["max_length"], meta["scoring"]["max_prompt_length"]) == (96, 64)
    # The SFT log-probs are the SFT model's own, by hand, on DPO's truncated tokens.
    tok = load_tokenizer(tmp_path / "dpo")
    sft_model = load_merged(tiny, [sft_done / "sft"])
    for row in rows:
        enc = dpo_truncate(tokenize_preference(tok, row["prompt"], row["chosen"], row["rejected"]),
                           96, 64)
        assert row["tokens"] == preference.tokens_id(enc)
        assert row["logp"]["sft"]["chosen"] == pytest.approx(
            _completion_logp(sft_model, enc["prompt_ids"], enc["chosen_ids"]), abs=1e-3)
        assert row["logp"]["sft"]["rejected"] == pytest.approx(
            _completion_logp(sft_model, enc["prompt_ids"], enc["rejected_ids"]), abs=1e-3)
    assert any(abs(r["logp"]["dpo"]["chosen"] - r["logp"]["sft"]["chosen"]) > 1e-4 for r in rows)  # DPO moved
