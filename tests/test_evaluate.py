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

from tasks.gate import decide, load_samples
from tempering import TemperingError
from tempering.benchmarks import load_items
from tempering.config import from_dict
from tempering.scorecard import bundle

SHIPPED = Path(__file__).resolve().parents[1] / "benchmarks"  # the real benchmarks, in the repo

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

    from tempering.train.data import tokenize_conversation

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
    drift = root / "drift.jsonl"  # the lab's drift texts: the general items as chat turns
    drift.write_text("".join(json.dumps({"id": f"t{i}", "kind": "chat", "messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n" for i, (q, a, _) in enumerate(GENERAL)))
    return {"root": root, "base": base, "drift": drift,
            "general": write_bench(root / "general.jsonl", GENERAL),
            "domain": write_bench(root / "domain.jsonl", DOMAIN)}


def params(lab, **gate):
    """16 items per benchmark: the lab's gate is sized for it (a 0.3 budget, 1% planned
    discordance) so that the certification rules, not the item count, decide."""
    return from_dict({
        "evaluate": {"benchmarks": [
            {"name": "domain", "path": str(lab["domain"]), "role": "domain"},
            {"name": "general", "path": str(lab["general"]), "role": "general"}],
            "batch_size": 32, "cache_dir": str(lab["root"] / "cache"),
            "generation": {"n": 2, "max_new_tokens": 4}, "drift": {"path": str(lab["drift"])}},
        "gate": {"min_domain_gain": 0.25, "max_forgetting": {"default": 0.30}, "test": "bootstrap",
                 "planning_discordance": 0.01, "min_drift_texts": 8, "max_kl": None, "max_perplexity_ratio": None,
                 **gate}})


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
    assert record["drift"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert record["drift"]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert [c.kind for c in verdict.checks if not c.passed] == ["gain"]
    # Every model's scores are cached by content: the base is the candidate here, scored once.
    assert record["models"]["candidate"]["cache"] == "miss" and record["models"]["base"]["cache"] == "hit"
    # Where the scoring time went: only the model that was scored has a record of it.
    work = record["work"]
    assert set(work) == {"candidate"} and work["candidate"]["benchmarks_s"] > 0, work
    scorer = work["candidate"]["scorer"]
    assert scorer["requests"] >= sum(b["n"] for b in record["benchmarks"].values()) and scorer["seconds"] > 0


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
    assert "general: forgetting: not certified" in failed["forgetting"].reason
    assert record["drift"]["kl"] > 0.1


def test_overtrained_on_the_domain_is_rejected_for_forgetting(lab):
    cand = train(lab["base"], lab["root"] / "over", DOMAIN, steps=200, lr=1e-2)
    record, verdict = evaluate_and_gate(lab, cand, "over", max_kl=0.5)
    failed = {c.kind for c in verdict.checks if not c.passed}
    assert record["benchmarks"]["domain"]["delta"]["acc"] >= 0.25  # it did learn the domain ...
    assert not verdict.passed and "forgetting" in failed and "gain" not in failed, verdict.reasons
    assert "kl" in failed  # ... and the label-free signal saw the damage too
    assert record["drift"]["perplexity_ratio"] > 1.0


def test_production_is_scored_once_and_reused_from_the_registry(lab):
    """The promoted candidate's per-item results are stored with its registry version; a later
    evaluate with that version as champion reuses them (no scoring), and the champion stage's
    file names it."""
    from tasks.champion import run as champion_run
    from tasks.evaluate import run
    from tempering.registry import Registry

    p = params(lab)
    cand = lab["root"] / "good"  # trained by test_good_candidate_is_promoted
    if not (cand / "config.json").exists():
        cand = train(lab["base"], cand, DOMAIN + GENERAL, steps=200, lr=3e-3)
    first = lab["root"] / "prom1"
    run(p, model=str(cand), base=str(lab["base"]), samples=str(first / "samples"), metrics=str(first / "evaluate.json"))
    reg = Registry(lab["root"] / "registry", "m")
    record = {"model_hash": json.loads((first / "evaluate.json").read_text())["models"]["candidate"]["hash"],
              "metrics": json.loads((first / "evaluate.json").read_text())}
    version = reg.register(cand, record, alias="production", samples_dir=first / "samples")
    champion = champion_run(p, registry=str(lab["root"] / "registry"), registry_name="m", alias="production",
                            out=str(lab["root"] / "champion.json"))
    assert champion["version"] == version and champion["model_hash"] == record["model_hash"]
    second = lab["root"] / "prom2"
    run(p, model=str(cand), base=str(lab["base"]), samples=str(second / "samples"),
        metrics=str(second / "evaluate.json"), registry=str(lab["root"] / "registry"), registry_name="m",
        champion=str(lab["root"] / "champion.json"))
    out = json.loads((second / "evaluate.json").read_text())
    assert out["models"]["production"] == {"path": str(reg.model_path(version)), "hash": record["model_hash"],
                                           "version": version, "cache": "registry"}
    assert out["benchmarks"]["domain"]["production"] == out["benchmarks"]["domain"]["candidate"]
    # A different scoring setting (batch size is in the key): the stored results are not reused.
    p2 = from_dict(dict(p.model_dump(mode="json", by_alias=True),
                        evaluate=dict(p.evaluate.model_dump(mode="json"), batch_size=7)))
    third = lab["root"] / "prom3"
    run(p2, model=str(cand), base=str(lab["base"]), samples=str(third / "samples"),
        metrics=str(third / "evaluate.json"), registry=str(lab["root"] / "registry"), registry_name="m",
        champion=str(lab["root"] / "champion.json"))
    out = json.loads((third / "evaluate.json").read_text())
    assert out["models"]["production"]["cache"] in ("miss", "hit") and out["models"]["base"]["cache"] == "miss"


def test_a_changed_benchmark_rescores_only_itself(lab):
    """Scores are cached per benchmark: a new domain item re-scores the domain, not the rest."""
    from tasks.evaluate import run

    domain = write_bench(lab["root"] / "domain2.jsonl", DOMAIN + [("Where does Ivo live?", "Orvane", TOWNS[1:])])
    base = params(lab)
    p = from_dict(dict(base.model_dump(mode="json", by_alias=True), evaluate=dict(
        base.evaluate.model_dump(mode="json"),
        benchmarks=[{"name": "domain", "path": str(domain), "role": "domain"},
                    {"name": "general", "path": str(lab["general"]), "role": "general"}])))
    out = lab["root"] / "partial"
    run(p, model=str(lab["base"]), base=str(lab["base"]), samples=str(out / "samples"),
        metrics=str(out / "evaluate.json"))
    record = json.loads((out / "evaluate.json").read_text())
    assert record["models"]["candidate"]["cache"] == "partial"   # general: hit; domain: scored
    assert record["benchmarks"]["domain"]["n"] == 17


def test_scoring_key_covers_what_changes_a_score(tmp_path):
    from tasks.evaluate import scoring_key

    bench = write_bench(tmp_path / "d.jsonl", DOMAIN)

    def key(**evaluate):
        cfg = from_dict({"evaluate": {"cache_dir": str(tmp_path / "c"), "benchmarks": [
            {"name": "d", "path": str(bench), "role": "domain"}], **evaluate}}).evaluate
        return scoring_key(cfg, bundle(cfg), "model-hash")

    k = key()
    assert set(k["versions"]) == {"torch", "transformers", "lm-eval"}
    assert k["task_version"] and k["scoring_version"]
    for change in ({"batch_size": 3}, {"max_length": 64}, {"precision": "fp32"}, {"limit": 3}):
        assert key(**change) != k, change


def test_power_sized_item_counts():
    from tempering.scorecard import planned_limits
    from tasks.gate import required_items

    p = from_dict({"evaluate": {"benchmarks": [
        {"name": "d", "path": "x", "role": "domain"},
        {"name": "a", "path": "x", "role": "general", "limit": "power"},
        {"name": "b", "path": "x", "role": "general", "limit": "power"},
        {"name": "c", "path": "x", "role": "general", "limit": 50}]},
        "gate": {"max_forgetting": {"default": 0.05, "b": 0.10}}})
    limits = planned_limits(p.evaluate, p.gate)
    family = 3 + 2  # three general benchmarks and the two drift checks
    assert limits == {"d": None, "a": required_items(p.gate, 0.05, family), "b": required_items(p.gate, 0.10, family),
                      "c": 50}
    assert limits["a"] > 3 * limits["b"]   # n grows as 1 / budget^2
    capped = from_dict(dict(p.model_dump(mode="json", by_alias=True),
                            evaluate=dict(p.evaluate.model_dump(mode="json"), limit=8)))
    assert set(planned_limits(capped.evaluate, capped.gate).values()) == {8}
    from tempering.config import ParamsError
    with pytest.raises(ParamsError, match="only for role general"):
        from_dict({"evaluate": {"benchmarks": [{"name": "d", "path": "x", "role": "domain", "limit": "power"}]}})


# ----------------------------------------------------------------------------- formats and bundle


# choices: {number of choices: items}. ARC's 3-choice items were padded to 4 by llm-foundry with a
# repeated choice; the loader drops the repeat, as lm-eval scores them over 3.
@pytest.mark.parametrize("fmt,file,labels,n,choices", [
    ("llmfoundry", "arc_easy_test.llmfoundry.jsonl.gz", None, 2376, {4: 2369, 3: 7}),
    ("llmfoundry", "arc_challenge_test.llmfoundry.jsonl.gz", None, 1172, {4: 1168, 3: 4}),
    ("llmfoundry", "boolq_val.llmfoundry.jsonl.gz", None, 3270, {2: 3270}),
    ("hellaswag", "hellaswag_val_sample3000.jsonl.gz", None, 3000, {4: 3000}),
    ("piqa", "piqa_valid.jsonl.gz", "piqa_valid-labels.lst.gz", 1838, {2: 1838}),
])
def test_real_benchmark_files_load(fmt, file, labels, n, choices):
    from collections import Counter

    from tempering.config import BenchmarkSpec

    spec = BenchmarkSpec(name="b", path=str(SHIPPED / file), format=fmt, role="general", chat=False,
                         labels=str(SHIPPED / labels) if labels else None)
    items = load_items(spec)
    assert len(items) == n
    assert dict(Counter(len(it["choices"]) for it in items)) == choices
    assert all(0 <= it["answer"] < len(it["choices"]) and len(set(it["choices"])) == len(it["choices"])
               for it in items)
    assert all(it["prompt"].endswith("\nAnswer:") for it in items) == (fmt != "hellaswag")
    if "arc" in file or fmt == "piqa":
        assert all(it["prompt"] == f"Question: {it['question']}\nAnswer:" for it in items)
    if "boolq" in file:  # lm-eval's boolq: the passage itself, no "Passage: " label
        assert not any(it["prompt"].startswith("Passage:") for it in items)
        assert all(it["question"].startswith("Passage: ") for it in items)  # the chat form keeps it


def test_arc_padding_repeat_is_dropped_and_the_answer_follows_its_text(tmp_path):
    from tempering.config import BenchmarkSpec

    path = tmp_path / "arc.jsonl"
    rows = [{"query": "Question: q1", "choices": ["up", "down", "up", "same"], "gold": 2},
            {"query": "Question: q2", "choices": ["up", "down", "up", "same"], "gold": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(BenchmarkSpec(name="a", path=str(path), format="llmfoundry", role="general", chat=False))
    assert [(it["choices"], it["answer"]) for it in items] == [(["up", "down", "same"], 0),
                                                               (["up", "down", "same"], 2)]


@pytest.mark.parametrize("fmt,row,field", [
    ("llmfoundry", {"query": "", "choices": ["a", "b"], "gold": 0}, "query"),
    ("llmfoundry", {"query": "Question: q", "choices": ["a", "b"], "gold": 2}, "gold"),
    ("llmfoundry", {"query": "Question: q", "choices": ["a", "a"], "gold": 0}, "choices"),
    ("hellaswag", {"query": "A: b", "endings": ["x", "[step]"], "label": 0}, "endings"),
    ("hellaswag", {"query": "A: b", "endings": ["x", "y"], "label": "1"}, "label"),
])
def test_bad_rows_of_real_layouts_name_their_own_field(tmp_path, fmt, row, field):
    from tempering.config import BenchmarkSpec

    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(TemperingError, match=rf"b.jsonl: row 1: {field}:"):
        load_items(BenchmarkSpec(name="b", path=str(path), format=fmt, role="general", chat=False))


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


def test_a_a_calibration_command_on_a_real_bundle(lab, tmp_path):
    """bench/calibrate_gate.py, as a user runs it: the lab model judged against itself (scored twice,
    at two batch sizes) on the shipped benchmarks, 20 seeds x 2 tests: 0 rejections in the
    no-forgetting and champion families; its sabotage ladder refuses the large drops."""
    import yaml

    from bench_loader import load_bench

    root = Path(__file__).resolve().parents[1]
    calibrate = load_bench("calibrate_gate")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["benchmarks"][0]["path"] = str(lab["domain"])   # the domain set: the lab's
    params["evaluate"]["cache_dir"] = str(tmp_path / "cache")
    params["evaluate"]["drift"]["n_texts"] = 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "calibration.json"
    assert calibrate.main(["--model", str(lab["base"]), "--base", str(lab["base"]), "--params",
                           str(tmp_path / "params.yaml"), "--limit", "12", "--seeds", "20", "--json", str(out),
                           "--evaluation", str(tmp_path / "none.json")]) == 0
    result = json.loads(out.read_text())
    for who in ("base", "candidate"):
        aa = result["aa"][who]["aa"]
        assert aa["runs"] == 40 and aa["rejections"] == 0, aa["rejected_checks"]
        assert aa["underpowered"] == 40 * 5   # 12 items cannot certify 0.05: refused by design, counted apart
        assert result["aa"][who]["drift"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert set(result["aa"]["candidate"]["noise"]) == {"domain", "arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq"}
    ladder = result["ladder"]
    assert len(ladder) == 5 * 5 and {r["benchmark"] for r in ladder} == {"arc_easy", "arc_challenge", "hellaswag",
                                                                          "piqa", "boolq"}
    # 12 items cannot certify a 0.05 budget: every rung is refused, as the design says.
    assert not any(r["gate_passed"] or r["design_certifies"] for r in ladder)
