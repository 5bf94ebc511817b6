"""export: base + SFT + DPO merged into a standalone model that generates what the adapter model
generates (LLaMA-Factory #5232 is a merge that silently does not), with card and lineage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tempering import TemperingError
from tempering.config import from_dict, load_params
from tempering.train.data import CACHE_ENV, load_tokenizer
from tempering.train.models import load_merged

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "sft": {"max_steps": 4, "batch_size": 4, "save_steps": 10, "learning_rate": 1e-2, "max_length": 96},
    "dpo": {"max_steps": 2, "batch_size": 4, "save_steps": 10, "learning_rate": 1e-2, "max_length": 96,
            "max_prompt_length": 64},
    # The interpolation sweep has its own tests below (it needs a dev split).
    "export": {"dtype": "float32", "check_prompts": 3, "check_max_new_tokens": 8, "interpolation": {"enabled": False}},
    "tracking": {"wandb": "disabled", "dvclive": False},
}


def _params(**export):
    raw = {k: dict(v) for k, v in SMALL.items()}
    raw["export"].update(export)
    return from_dict(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base with SFT and DPO adapters trained on it."""
    from tasks.dpo import run as dpo
    from tasks.sft import run as sft
    from tempering.testing import make_tiny_model

    root = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(root / "cache"))
    base = make_tiny_model(root / "base")
    (base / "meta.json").write_text(json.dumps({"stage": "base_model", "source": "tiny-test-model", "n_params": 1}))
    data = root / "clean"
    data.mkdir()
    sft_rows = [{"id": str(i), "source": f"s:{i}", "messages": [
        {"role": "user", "content": f"what is the colour of {i}?"},
        {"role": "assistant", "content": f"the colour is {['red', 'blue', 'green'][i % 3]}"}]} for i in range(12)]
    pref = [{"id": str(i), "source": f"p:{i}", "prompt": [{"role": "user", "content": f"colour of {i}?"}],
             "chosen": "red", "rejected": "the dog"} for i in range(8)]
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    (data / "preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    p = _params()
    try:
        sft(p, base=str(base), data=str(data), out=str(root / "sft"), checkpoints=str(root / "ck_sft"),
            metrics=str(root / "sft.json"))
        dpo(p, base=str(base), sft=str(root / "sft"), data=str(data), out=str(root / "dpo"),
            checkpoints=str(root / "ck_dpo"), metrics=str(root / "dpo.json"))
    finally:
        mp.undo()
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models on one thread (see conftest.one_thread)."""


def _export(root: Path, out: Path, params) -> dict:
    from tasks.export import run

    return run(params, base=str(root / "base"), sft=str(root / "sft"), dpo=str(root / "dpo"), data=str(root / "clean"),
               out=str(out), metrics=str(out.parent / "export.json"))


def test_export_is_standalone_and_matches_the_adapter_model(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.export import check_prompts, greedy

    out = tmp_path / "export"
    summary = _export(trained, out, _params())
    assert summary["match_rate"] == 1.0 and summary["token_agreement"] == 1.0 and summary["prompts"] == 3
    metrics = json.loads((tmp_path / "export.json").read_text())
    assert metrics["match_rate"] == 1.0 and metrics["max_logit_diff"] < 1e-4  # float32 export: exact merge
    assert list(out.glob("*.safetensors")) and not (out / "adapter_config.json").exists()
    # Independent check: reload as a user would (no peft) and compare with base+SFT merged+DPO adapter.
    tok = load_tokenizer(out)
    assert tok.chat_template
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in exported.state_dict())
    reference = PeftModel.from_pretrained(load_merged(trained / "base", [trained / "sft"]), trained / "dpo")
    prompts = check_prompts(str(trained / "clean"), 3)
    assert prompts[0] == [{"role": "user", "content": "what is the colour of 0?"}]
    assert greedy(exported, tok, prompts, 8) == greedy(reference, tok, prompts, 8)
    # Greedy text from a tiny random model is degenerate, so also compare the logits: the export
    # computes what the adapter model computes, and not what base + SFT alone computes.
    import torch

    enc = tok.apply_chat_template(prompts[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    without_dpo = load_merged(trained / "base", [trained / "sft"])
    with torch.no_grad():
        got, want, sft_only = (m.eval()(**enc).logits for m in (exported, reference, without_dpo))
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, sft_only, atol=1e-4)
    # The tuned model differs from the base (the adapters were really merged).
    base = AutoModelForCausalLM.from_pretrained(trained / "base")
    assert any((a != b).any() for a, b in zip(exported.parameters(), base.parameters()))


def test_model_card_and_lineage(trained, tmp_path):
    out = tmp_path / "export"
    _export(trained, out, _params())
    meta = json.loads((out / "meta.json").read_text())
    lineage = meta["lineage"]
    assert lineage["base_model"]["source"] == "tiny-test-model"
    assert lineage["sft"]["params"]["learning_rate"] == 1e-2 and lineage["dpo"]["params"]["beta"] == 0.1
    assert lineage["sft"]["train"]["steps"] == 4 and lineage["dpo"]["train"]["steps"] == 2
    assert set(meta["data_hashes"]) == {"sft", "dpo"}
    card = (out / "model_card.md").read_text()
    assert "tiny-test-model" in card and meta["data_hashes"]["sft"] in card
    assert "### sft" in card and "### dpo" in card and "3/3" in card


def test_bfloat16_export_is_checked_and_saved_in_bf16(trained, tmp_path):
    out = tmp_path / "export"
    # The stage's own check at the project's default minimum: the bf16 weights must still
    # generate what the float32 adapter model generates (bf16 may flip a late near-tie, not more).
    default = load_params(ROOT / "params.yaml").export.min_agreement
    summary = _export(trained, out, _params(dtype="bfloat16", min_agreement=default))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert default <= summary["token_agreement"] <= 1.0, summary


def test_a_broken_merge_fails_and_writes_nothing(trained, tmp_path, monkeypatch):
    """Simulate #5232: the merged weights are not what the adapter model computes."""
    import torch

    import tasks.export as export

    real = export._merged

    def broken(adapter_model):
        model = real(adapter_model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        return model

    monkeypatch.setattr(export, "_merged", broken)
    out = tmp_path / "export"
    with pytest.raises(TemperingError, match="disagrees with the adapter model") as err:
        _export(trained, out, _params(min_agreement=0.9))
    assert "\n" not in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_lineage_through_an_enabled_cpt(trained, tmp_path, monkeypatch):
    """base -> cpt (merged) -> sft -> dpo -> export: the card still names the original base."""
    from tasks.cpt import run as cpt
    from tasks.dpo import run as dpo
    from tasks.export import run as export
    from tasks.sft import run as sft

    import shutil

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    shutil.copytree(trained / "clean", tmp_path / "clean")
    text = tmp_path / "clean" / "text.jsonl"
    text.write_text("".join(json.dumps({"id": str(i), "text": "the quick brown fox jumps over the lazy dog " * 3})
                            + "\n" for i in range(4)))
    raw = {k: dict(v) for k, v in SMALL.items()}
    raw["cpt"] = {"enabled": True, "max_steps": 2, "batch_size": 2, "block_size": 16, "save_steps": 10}
    p = from_dict(raw)
    data, m = str(tmp_path / "clean"), tmp_path
    cpt(p, base=str(trained / "base"), data=data, out=str(m / "cpt"), checkpoints=str(m / "ck_c"),
        metrics=str(m / "cpt.json"))
    sft(p, base=str(m / "cpt"), data=data, out=str(m / "sft"), checkpoints=str(m / "ck_s"), metrics=str(m / "s.json"))
    dpo(p, base=str(m / "cpt"), sft=str(m / "sft"), data=data, out=str(m / "dpo"), checkpoints=str(m / "ck_d"),
        metrics=str(m / "d.json"))
    summary = export(p, base=str(m / "cpt"), sft=str(m / "sft"), dpo=str(m / "dpo"), data=data,
                     out=str(m / "export"), metrics=str(m / "e.json"))
    assert summary["match_rate"] == 1.0
    lineage = json.loads((m / "export" / "meta.json").read_text())["lineage"]
    assert lineage["base_model"]["source"] == "tiny-test-model"
    assert lineage["cpt"]["enabled"] is True and lineage["cpt"]["train"]["steps"] == 2
    assert set(json.loads((m / "export" / "meta.json").read_text())["data_hashes"]) == {"cpt", "sft", "dpo"}


def test_export_when_dpo_passed_the_sft_model_through(trained, tmp_path):
    """dpo.enabled: false (or no preference rows): export merges base + SFT alone, checks it
    against the live SFT adapter, and the card says why DPO did not train."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.dpo import run as dpo
    from tasks.export import check_prompts
    from tasks.export import run as export

    p = _params()
    off = p.model_copy(update={"dpo": p.dpo.model_copy(update={"enabled": False})})
    dpo(off, base=str(trained / "base"), sft=str(trained / "sft"), data=str(trained / "clean"),
        out=str(tmp_path / "dpo"), checkpoints=str(tmp_path / "ck"), metrics=str(tmp_path / "dpo.json"))
    out = tmp_path / "export"
    summary = export(p, base=str(trained / "base"), sft=str(trained / "sft"), dpo=str(tmp_path / "dpo"),
                     data=str(trained / "clean"), out=str(out), metrics=str(tmp_path / "export.json"))
    assert summary["match_rate"] == 1.0 and summary["max_logit_diff"] < 1e-4
    tok = load_tokenizer(out)
    enc = tok.apply_chat_template(check_prompts(str(trained / "clean"), 1)[0], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    exported = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = exported.eval()(**enc).logits
        sft_only = load_merged(trained / "base", [trained / "sft"]).eval()(**enc).logits
        base = AutoModelForCausalLM.from_pretrained(trained / "base").eval()(**enc).logits
    assert torch.allclose(got, sft_only, atol=1e-4) and not torch.allclose(got, base, atol=1e-4)
    lineage = json.loads((out / "meta.json").read_text())["lineage"]
    assert lineage["dpo"]["trained"] is False and lineage["dpo"]["note"].startswith("dpo.enabled is false")
    assert "Not trained: dpo.enabled is false" in (out / "model_card.md").read_text()

    # A pass-through that points at another SFT folder is refused, in one line.
    (tmp_path / "other_sft").mkdir()
    (tmp_path / "dpo" / "pointer.json").write_text(json.dumps({"model": "../other_sft"}))
    with pytest.raises(TemperingError, match="passes through '../other_sft', which is not the SFT model") as err:
        export(p, base=str(trained / "base"), sft=str(trained / "sft"), dpo=str(tmp_path / "dpo"),
               data=str(trained / "clean"), out=str(tmp_path / "export2"), metrics=str(tmp_path / "e2.json"))
    assert "\n" not in str(err.value) and not (tmp_path / "export2").exists()


# ----------------------------------------------------------------------------- interpolation


def _dev_split(root: Path) -> dict:
    """A dev split in the real layout: 8 domain questions (tempering format) and 12 dev drift texts."""
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    items = [{"id": f"d{i}", "question": f"which colour goes with {i}?", "choices": ["red", "blue", "green", "grey"],
              "answer": i % 3} for i in range(8)]
    (dev / "domain_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    texts = [{"id": f"t{i}", "kind": "text", "source": f"x:{i}", "text": f"the colour of thing {i} is red and blue"}
             for i in range(6)]
    texts += [{"id": f"c{i}", "kind": "chat", "source": f"y:{i}", "messages": [
        {"role": "user", "content": f"name a colour for {i}"}, {"role": "assistant", "content": "green"}]}
        for i in range(6)]
    (dev / "drift_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    return {"benchmarks": [{"name": "domain", "path": str(dev / "domain_dev.jsonl"), "role": "domain",
                            "chat": True}],
            "drift": {"path": str(dev / "drift_dev.jsonl"), "max_tokens": 32, "batch_size": 4}}


def _interp_params(root: Path, alphas, **gate):
    raw = {k: dict(v) for k, v in SMALL.items()}
    raw["export"] = dict(raw["export"], interpolation={"enabled": True, "alphas": list(alphas)})
    raw["evaluate"] = {"benchmarks": [], "dev": _dev_split(root), "drift": {"path": None},
                       "cache_dir": str(root / "bench_cache"), "batch_size": 8}
    raw["gate"] = {"min_drift_texts": 8, **gate}
    return from_dict(raw)


def test_interpolation_saves_base_plus_alpha_times_the_delta(trained, tmp_path):
    """The saved model is exactly base + alpha * (tuned - base), the sweep's curve and choice are
    in the metrics and the card, and the saved folder is checked against the interpolated model."""
    import torch
    from transformers import AutoModelForCausalLM

    full = tmp_path / "full"
    _export(trained, full, _params())
    half = tmp_path / "half"
    summary = _export(trained, half, _interp_params(tmp_path, [0.5]))
    assert summary["alpha"] == 0.5
    interp = summary["interpolation"]
    assert [p["alpha"] for p in interp["points"]] == [0.5] and interp["chosen"] == 0.5 and interp["reason"]
    point = interp["points"][0]
    assert point["domain"]["domain"]["n"] == 8 and point["drift"]["texts"] == 12
    assert math.isfinite(point["drift"]["kl"]) and point["drift"]["kl_upper"] >= point["drift"]["kl"] >= 0
    assert set(point["drift"]["by_kind"]) == {"text", "chat"}
    assert summary["reference"] == "interpolated" and summary["merge_check"]["matches"] == 3
    assert summary["match_rate"] == 1.0 and summary["max_logit_diff"] < 1e-4

    tuned = dict(AutoModelForCausalLM.from_pretrained(full).named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(trained / "base").named_parameters())
    got = dict(AutoModelForCausalLM.from_pretrained(half).named_parameters())
    moved = 0
    for name, p in got.items():
        want = base[name] + 0.5 * (tuned[name] - base[name])
        assert torch.allclose(p, want, atol=1e-6), name
        moved += int(not torch.equal(tuned[name], base[name]))
    assert moved > 0
    card = (half / "model_card.md").read_text()
    assert "alpha kept: **0.5**" in card and "| 0.5 |" in card
    assert json.loads((half / "meta.json").read_text())["alpha"] == 0.5


def test_interpolation_sweep_keeps_alpha_one_when_it_is_within_the_limits(trained, tmp_path):
    """With limits a tiny model cannot break, the largest dev gain within them is kept; the
    points are scored in descending alpha and KL shrinks towards the base."""
    summary = _export(trained, tmp_path / "out", _interp_params(tmp_path, [0.25, 1.0], max_kl=50.0,
                                                                 max_perplexity_ratio=50.0))
    interp = summary["interpolation"]
    assert [p["alpha"] for p in interp["points"]] == [1.0, 0.25]
    assert all(p["within_limits"] for p in interp["points"])
    kl = {p["alpha"]: p["drift"]["kl"] for p in interp["points"]}
    assert kl[0.25] < kl[1.0]
    gains = {p["alpha"]: p["domain_gain"] for p in interp["points"]}
    best = max(gains.values())
    assert interp["chosen"] == min(a for a, g in gains.items() if g == best)
    if interp["chosen"] == 1.0:
        assert summary["reference"] == "adapter" and "merge_check" not in summary


def test_interpolation_refuses_a_dev_split_that_is_the_gate_s(trained, tmp_path):
    p = _interp_params(tmp_path, [0.5])
    dev = p.evaluate.dev.benchmarks[0]
    same = p.model_copy(update={"evaluate": p.evaluate.model_copy(update={"benchmarks": (dev,)})})
    with pytest.raises(TemperingError, match="also a gate benchmark") as err:
        _export(trained, tmp_path / "out", same)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
