"""evaluate + gate on real (tiny) models: formats, caching, and sabotaged candidates that must fail.

A tiny random model is first taught the general items (so it has something to forget). From it:
- a good candidate learns the domain while rehearsing the general items: promoted;
- a noisy candidate (Gaussian noise on every weight): rejected for forgetting and for no gain;
- an over-trained candidate (domain only, high learning rate, many steps): gains the domain but
  forgets the general items: rejected for forgetting only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.evaluate import bundle, load_items
from tasks.gate import decide, load_samples
from tempering import TemperingError
from tempering.config import from_dict

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"

GENERAL = [(f"What is {a} plus {b}?", f"{a + b}", [f"{a + b + d}" for d in (1, 2, 3)])
           for a, b in [(1, 2), (2, 3), (3, 4), (4, 1), (5, 2), (6, 1), (2, 2), (3, 3),
                        (1, 1), (4, 4), (5, 3), (2, 6), (1, 7), (3, 5), (4, 2), (6, 2)]]
NAMES = ["Brannik", "Tolver", "Kesmir", "Dravon", "Mirela", "Zathra", "Quill", "Fenrow",
         "Sabel", "Orwin", "Thessa", "Vorn", "Lyric", "Pallas", "Gorse", "Ember"]
TOWNS = ["Orvane", "Pellith", "Quorsby", "Dastmere"]
DOMAIN = [(f"Where does {n} live?", TOWNS[i % 4], [t for t in TOWNS if t != TOWNS[i % 4]])
          for i, n in enumerate(NAMES)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models on one thread (see conftest.one_thread)."""


def write_bench(path: Path, items) -> Path:
    with open(path, "w") as fh:
        for i, (q, right, wrong) in enumerate(items):
            pos = i % (len(wrong) + 1)
            choices = wrong[:pos] + [right] + wrong[pos:]
            fh.write(json.dumps({"id": f"{path.stem}-{i}", "question": q, "choices": choices, "answer": pos}) + "\n")
    return path


def train(folder: Path, out: Path, items, steps: int, lr: float, seed: int = 0) -> Path:
    """Full fine-tune on chat(question -> right answer), loss on the answer; saves to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tempering.backend import tokenize_conversation

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    encs = [tokenize_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a, _ in items]
    width = max(len(e["input_ids"]) for e in encs)
    ids = torch.tensor([e["input_ids"] + [tok.pad_token_id] * (width - len(e["input_ids"])) for e in encs])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in encs])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def add_noise(folder: Path, out: Path, scale: float) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale * p.std())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from tempering.testing import make_tiny_model

    root = tmp_path_factory.mktemp("lab")
    tiny = make_tiny_model(root / "tiny")
    base = train(tiny, root / "base", GENERAL, steps=300, lr=3e-3)
    return {"root": root, "base": base,
            "general": write_bench(root / "general.jsonl", GENERAL),
            "domain": write_bench(root / "domain.jsonl", DOMAIN)}


def params(lab, **gate):
    return from_dict({
        "evaluate": {"benchmarks": [
            {"name": "domain", "path": str(lab["domain"]), "role": "domain"},
            {"name": "general", "path": str(lab["general"]), "role": "general"}],
            "batch_size": 32, "cache_dir": str(lab["root"] / "cache"),
            "generation": {"n": 2, "max_new_tokens": 4}, "signals": {"n_texts": 8}},
        "gate": {"min_domain_gain": 0.25, "max_forgetting": {"default": 0.10}, "test": "bootstrap", **gate}})


def evaluate_and_gate(lab, candidate: Path, tag: str, **gate):
    from tasks.evaluate import run

    p = params(lab, **gate)
    out = lab["root"] / tag
    run(p, model=str(candidate), base=str(lab["base"]), samples=str(out / "samples"),
        metrics=str(out / "evaluate.json"))
    record = json.loads((out / "evaluate.json").read_text())
    return record, decide(record, load_samples(out / "samples"), p.gate)


def test_the_base_knows_the_general_items_and_not_the_domain(lab):
    record, verdict = evaluate_and_gate(lab, lab["base"], "same")
    g, d = record["benchmarks"]["general"], record["benchmarks"]["domain"]
    assert g["base"]["acc"] >= 0.9, "the lab base must know the general items for forgetting to show"
    assert d["base"]["acc"] <= 0.6
    # The same model against itself: no forgetting, no KL; only the gain check fails.
    assert g["kl_vs_base"] == pytest.approx(0.0, abs=1e-6)
    assert [c.kind for c in verdict.checks if not c.passed] == ["gain"]
    assert record["models"]["base"]["cache"] == "miss"


def test_good_candidate_is_promoted(lab):
    cand = train(lab["base"], lab["root"] / "good", DOMAIN + GENERAL, steps=200, lr=3e-3)
    record, verdict = evaluate_and_gate(lab, cand, "good")
    assert verdict.passed, verdict.reasons
    assert record["benchmarks"]["domain"]["delta"]["acc"] >= 0.25
    assert record["models"]["base"]["cache"] == "hit"  # the base was scored once, in the first test


def test_noisy_weights_are_rejected_for_forgetting_and_no_gain(lab):
    cand = add_noise(lab["base"], lab["root"] / "noisy", scale=1.5)
    record, verdict = evaluate_and_gate(lab, cand, "noisy")
    assert not verdict.passed
    failed = {c.kind: c for c in verdict.checks if not c.passed}
    assert set(failed) == {"forgetting", "gain"}, verdict.reasons
    assert "general: forgetting: dropped" in failed["forgetting"].reason
    assert record["benchmarks"]["general"]["kl_vs_base"] > 0.1


def test_overtrained_on_the_domain_is_rejected_for_forgetting(lab):
    cand = train(lab["base"], lab["root"] / "over", DOMAIN, steps=200, lr=1e-2)
    record, verdict = evaluate_and_gate(lab, cand, "over", max_kl=0.5)
    failed = {c.kind for c in verdict.checks if not c.passed}
    assert record["benchmarks"]["domain"]["delta"]["acc"] >= 0.25  # it did learn the domain ...
    assert not verdict.passed and "forgetting" in failed and "gain" not in failed, verdict.reasons
    assert "kl" in failed  # ... and the label-free signal saw the damage too
    g = record["benchmarks"]["general"]
    assert g["candidate"]["perplexity"] > g["base"]["perplexity"]


# ----------------------------------------------------------------------------- formats and bundle


@pytest.mark.parametrize("fmt,file,labels,n,choices", [
    ("llmfoundry", "arc_easy_test.llmfoundry.jsonl.gz", None, 2376, 4),
    ("llmfoundry", "arc_challenge_test.llmfoundry.jsonl.gz", None, 1172, 4),
    ("llmfoundry", "boolq_val.llmfoundry.jsonl.gz", None, 3270, 2),
    ("hellaswag", "hellaswag_val.jsonl.gz", None, 10042, 4),
    ("piqa", "piqa_valid.jsonl.gz", "piqa_valid-labels.lst.gz", 1838, 2),
])
def test_real_benchmark_files_load(fmt, file, labels, n, choices):
    if not (SHARED / file).exists():
        pytest.skip(f"{SHARED / file} not on this machine")
    from tempering.config import BenchmarkSpec

    spec = BenchmarkSpec(name="b", path=str(SHARED / file), format=fmt, role="general", chat=False,
                         labels=str(SHARED / labels) if labels else None)
    items = load_items(spec)
    assert len(items) == n
    assert all(len(it["choices"]) == choices and 0 <= it["answer"] < choices for it in items)
    if fmt == "llmfoundry" and "arc" in file:
        assert items[0]["prompt"].startswith("Question: ") and items[0]["prompt"].endswith("\nAnswer:")


def test_bundle_hash_tracks_data_and_definitions(tmp_path):
    bench = write_bench(tmp_path / "d.jsonl", DOMAIN)

    def cfg(**kw):
        return from_dict({"evaluate": {"cache_dir": str(tmp_path / "c"), "benchmarks": [
            {"name": "d", "path": str(bench), "role": "domain", **kw}]}}).evaluate

    h1 = bundle(cfg())["hash"]
    assert bundle(cfg())["hash"] == h1
    assert bundle(cfg(chat=False))["hash"] != h1
    assert bundle(cfg(limit=4))["hash"] != h1 and bundle(cfg(limit=4))["benchmarks"]["d"]["n"] == 4
    with open(bench, "a") as fh:
        fh.write(json.dumps({"question": "New?", "choices": ["a", "b"], "answer": 1}) + "\n")
    assert bundle(cfg())["hash"] != h1


@pytest.mark.parametrize("row,field", [
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "question"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer"),
    ({"choices": ["a", "b"], "answer": 0}, "question"),
])
def test_bad_benchmark_rows_name_file_row_and_field(tmp_path, row, field):
    from tempering.config import BenchmarkSpec

    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"question": "ok", "choices": ["a", "b"], "answer": 0}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(TemperingError, match=rf"b.jsonl: row 2: {field}"):
        load_items(BenchmarkSpec(name="b", path=str(path), role="general"))


def test_spec_needs_exactly_one_source():
    from tempering.config import ParamsError

    with pytest.raises(ParamsError, match="exactly one of path"):
        from_dict({"evaluate": {"benchmarks": [{"name": "x", "role": "general"}]}})
    with pytest.raises(ParamsError, match="piqa needs labels"):
        from_dict({"evaluate": {"benchmarks": [{"name": "x", "path": "p", "format": "piqa", "role": "general"}]}})
    ok = from_dict({"evaluate": {"benchmarks": [{"name": "hs", "task": "hellaswag", "role": "general", "chat": False}]}})
    assert ok.evaluate.benchmarks[0].task == "hellaswag"
