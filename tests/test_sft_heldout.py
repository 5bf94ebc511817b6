"""Held-out SFT rows as the domain check (issue 12 item 5): the split (stable, by prompt, never the
replay rows, only when no domain benchmark is configured), the per-row answer NLL of candidate and
base, and the gate's heldout_nll check (certified gain, or a refusal with the reason)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tasks.gate import HELDOUT_FILE, HELDOUT_NAME, decide, load_samples, to_markdown
from tempering import scorecard, sft_heldout
from tempering.config import EvaluateParams, GateParams, SftHeldoutParams, from_dict

from test_gate import BASIC, record_of

GENERAL_ONLY = {"evaluate": {"benchmarks": [{"name": "g", "path": "g.jsonl", "role": "general"}]}}
WITH_DOMAIN = {"evaluate": {"benchmarks": [{"name": "d", "path": "d.jsonl", "role": "domain"},
                                           {"name": "g", "path": "g.jsonl", "role": "general"}]}}


def conv(i: int, prompt: str | None = None, source: str = "mine.jsonl") -> dict:
    return {"id": f"r{i}", "source": f"{source}:{i + 1}",
            "messages": [{"role": "user", "content": prompt or f"question number {i}?"},
                         {"role": "assistant", "content": f"answer number {i}."}]}


# ----------------------------------------------------------------------------- the split


def test_auto_holds_out_only_without_a_domain_benchmark():
    cfg = SftHeldoutParams()
    on, why = sft_heldout.active(cfg, from_dict(GENERAL_ONLY).evaluate)
    assert on and "no domain benchmark" in why
    on, why = sft_heldout.active(cfg, from_dict(WITH_DOMAIN).evaluate)
    assert not on and "a domain benchmark is configured (d)" in why
    assert sft_heldout.active(SftHeldoutParams(enabled=True), from_dict(WITH_DOMAIN).evaluate)[0]
    assert not sft_heldout.active(SftHeldoutParams(enabled=False), from_dict(GENERAL_ONLY).evaluate)[0]


def test_the_split_is_by_prompt_stable_and_never_takes_replay_rows():
    cfg = SftHeldoutParams(share=0.2, max_rows=None)
    rows = [conv(i) for i in range(300)]
    rows += [conv(300 + i, prompt="question number 7?") for i in range(3)]  # same prompt as r7
    rows += [conv(400 + i, source="data/replay/sft.jsonl") for i in range(100)]
    train, held, info = sft_heldout.split(rows, cfg, on=True, reason="test", exclude_source="data/replay/sft.jsonl")
    assert len(train) + len(held) == len(rows) and not {r["id"] for r in train} & {r["id"] for r in held}
    assert not any(r["source"].startswith("data/replay/sft.jsonl:") for r in held)
    assert 0.12 < len(held) / 303 < 0.28 and info["rows"] == len(held) and info["eligible_rows"] == 303
    # Rows sharing a prompt go together.
    same = {"r7", "r300", "r301", "r302"}
    assert same <= {r["id"] for r in held} or not same & {r["id"] for r in held}
    # A refresh that adds rows keeps every earlier held-out prompt held out (and every trained one trained).
    more = rows + [conv(1000 + i) for i in range(200)]
    train2, held2, _ = sft_heldout.split(more, cfg, on=True, reason="test", exclude_source="data/replay/sft.jsonl")
    assert {r["id"] for r in held} <= {r["id"] for r in held2}
    assert {r["id"] for r in train} <= {r["id"] for r in train2}
    # Another seed, another split.
    _, held3, _ = sft_heldout.split(rows, SftHeldoutParams(share=0.2, max_rows=None, seed=1), on=True, reason="t")
    assert {r["id"] for r in held3} != {r["id"] for r in held}


def test_the_cap_the_off_switch_and_too_few_prompts():
    rows = [conv(i) for i in range(400)]
    _, held, info = sft_heldout.split(rows, SftHeldoutParams(share=0.4, max_rows=25), on=True, reason="t")
    assert len(held) == 25 and info["capped_at"] == 25
    train, held, info = sft_heldout.split(rows, SftHeldoutParams(), on=False, reason="a domain benchmark")
    assert train == rows and held == [] and info == dict(info, enabled=False, rows=0, reason="a domain benchmark")
    one = [conv(i, prompt="same?") for i in range(5)]
    train, held, info = sft_heldout.split(one, SftHeldoutParams(share=0.49), on=True, reason="t")
    assert train == one and not held and "1 distinct prompt" in info["note"]
    # Whatever the share, one prompt always stays for training.
    two = [conv(0), conv(1)]
    train, held, _ = sft_heldout.split(two, SftHeldoutParams(share=0.49, max_rows=None), on=True, reason="t")
    assert len(train) >= 1


def test_the_dedup_stage_writes_the_heldout_file_and_trains_on_the_rest(tmp_path):
    from tasks.dedup import run

    data = tmp_path / "validated"
    data.mkdir()
    sft = [conv(i) for i in range(80)] + [conv(100 + i, source="data/replay/sft.jsonl") for i in range(20)]
    for i, r in enumerate(sft):  # distinct enough not to be near duplicates
        r["messages"][1]["content"] = " ".join(random.Random(i).choice("abcdefghij") * 3 for _ in range(12))
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    for kind in ("preference", "text"):
        (data / f"{kind}.jsonl").write_text("")
    params = from_dict(dict(GENERAL_ONLY, dedup={"decontam_ngram": 0, "sft_heldout": {"share": 0.25}},
                            sft={"replay": {"share": 0.2, "source": "data/replay/sft.jsonl"}}))
    run(params, data=str(data), out=str(tmp_path / "clean"), quarantine=str(tmp_path / "q.jsonl"),
        metrics=str(tmp_path / "m.json"), report=str(tmp_path / "r.md"))
    held = [json.loads(x) for x in (tmp_path / "clean" / sft_heldout.FILE).read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "clean" / "sft.jsonl").read_text().splitlines()]
    assert held and len(held) + len(train) == 100
    assert not {r["id"] for r in held} & {r["id"] for r in train}
    assert all(not r["source"].startswith("data/replay/") for r in held)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["sft_heldout"]["rows"] == len(held) and metrics["sft_heldout"]["enabled"]
    assert "Held out as the domain check" in (tmp_path / "r.md").read_text()
    # With a domain benchmark configured, nothing is held out (the file is there, empty).
    params = from_dict(dict(WITH_DOMAIN, dedup={"decontam_ngram": 0}))
    run(params, data=str(data), out=str(tmp_path / "clean2"), quarantine=str(tmp_path / "q2.jsonl"),
        metrics=str(tmp_path / "m2.json"))
    assert (tmp_path / "clean2" / sft_heldout.FILE).read_text() == ""
    assert len((tmp_path / "clean2" / "sft.jsonl").read_text().splitlines()) == 100


# ----------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, one_thread):
    from tempering.testing import make_tiny_model

    root = tmp_path_factory.mktemp("heldout")
    return make_tiny_model(root / "a", seed=0), make_tiny_model(root / "b", seed=1)


def test_answer_nll_counts_the_answer_tokens_only(tiny_models):
    from tempering.train.data import tokenize_conversation

    cfg = EvaluateParams(precision="fp32")
    model, tok = scorecard.load_model(tiny_models[0])
    rows = [conv(i) for i in range(5)]
    rows[2]["messages"] += [{"role": "user", "content": "and then?"}, {"role": "assistant", "content": "then more."}]
    recs = scorecard.heldout_nll(model, tok, rows, max_length=256, batch_size=2, cfg=cfg)
    alone = scorecard.heldout_nll(model, tok, rows[2:3], max_length=256, batch_size=1, cfg=cfg)
    for row, rec in zip(rows, recs):
        labels = tokenize_conversation(tok, row["messages"], max_length=256)["labels"]
        assert rec["id"] == row["id"] and rec["tokens"] == sum(x != -100 for x in labels[1:]) > 0
        assert rec["nll"] > 0
    # Padding in a batch does not change a row's score.
    assert abs(alone[0]["nll"] - recs[2]["nll"]) < 1e-3 and alone[0]["tokens"] == recs[2]["tokens"]
    # Rows with no answer token left after truncation are skipped.
    assert scorecard.heldout_nll(model, tok, rows[:1], max_length=4, batch_size=1, cfg=cfg) == []
    gens = scorecard.heldout_generations(model, tok, rows[:2], n=1, max_new_tokens=4, cfg=cfg)
    assert len(gens) == 1 and gens[0]["reference"] == "answer number 0." and gens[0]["prompt"] == "question number 0?"


def test_evaluate_scores_the_heldout_rows_and_the_gate_reads_them(tiny_models, tmp_path):
    from tasks.evaluate import cached_heldout

    rows = [conv(i) for i in range(6)]
    path = tmp_path / "sft_heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvaluateParams(precision="fp32", cache_dir=str(tmp_path / "cache"), sft_heldout={"examples": 2,
                                                                                           "max_new_tokens": 3})
    a, b = tiny_models
    recs, summary, hit = cached_heldout(a, b, str(path), cfg, {"candidate": "a", "base": "b"})
    assert hit == "miss" and len(recs) == 6 and summary["rows"] == 6 and len(summary["examples"]) == 2
    assert all(r["nll_candidate"] != r["nll_base"] for r in recs)
    again, summary2, hit = cached_heldout(a, b, str(path), cfg, {"candidate": "a", "base": "b"})
    assert hit == "hit" and again == recs and summary2["nll_gain"] == summary["nll_gain"]
    # The same model as candidate and base: zero gain on every row.
    same, _, _ = cached_heldout(a, a, str(path), cfg, {"candidate": "a", "base": "a"})
    assert all(abs(r["nll_candidate"] - r["nll_base"]) < 1e-6 for r in same)
    assert cached_heldout(a, b, None, cfg, {})[1]["rows"] == 0
    path.write_text("")
    assert "empty" in cached_heldout(a, b, str(path), cfg, {})[1]["reason"]


# ----------------------------------------------------------------------------- the gate


def general_only_record():
    rng = random.Random(0)
    g = [int(rng.random() < 0.7) for _ in range(600)]
    return record_of({"candidate": {"g": g}, "base": {"g": g}}, {"g": "general"},
                     configured=[{"name": "g", "role": "general", "required": True}])


def heldout_rows(n: int, gain: float, noise: float = 0.3, seed: int = 0) -> list[dict]:
    """Per-row records whose mean NLL per token falls by ``gain`` on average (nats)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tokens = rng.randint(5, 40)
        base = rng.uniform(2.0, 4.0)
        cand = base - gain + rng.gauss(0, noise)
        out.append({"id": f"h{i}", "source": f"mine.jsonl:{i + 1}", "tokens": tokens,
                    "nll_candidate": cand * tokens, "nll_base": base * tokens})
    return out


def with_heldout(per_row, **info):
    record, samples = general_only_record()
    record["sft_heldout"] = dict({"rows": len(per_row or []), "held_out": len(per_row or [])}, **info)
    if per_row is not None:
        samples = dict(samples, sft_heldout=per_row)
    return record, samples


def heldout_check(verdict):
    found = [c for c in verdict.checks if c.kind == "heldout_nll"]
    assert len(found) <= 1
    return found[0] if found else None


def test_without_a_domain_benchmark_or_heldout_rows_nothing_shows_the_candidate_is_better():
    record, samples = general_only_record()
    v = decide(record, samples, GateParams(**BASIC))
    assert not v.passed and any("no SFT rows were held out (dedup.sft_heldout)" in r for r in v.reasons)


def test_a_clear_gain_on_heldout_rows_is_the_domain_check():
    record, samples = with_heldout(heldout_rows(60, gain=0.5))
    v = decide(record, samples, GateParams(**BASIC))
    c = heldout_check(v)
    assert v.passed, v.reasons
    assert c.benchmark == HELDOUT_NAME and c.family == "gain" and c.passed and c.ci[0] >= 0.05
    assert c.delta == pytest.approx(c.reference - c.candidate) and 0.4 < c.delta < 0.6
    assert "lowered by" in c.reason and "rows never trained on" in c.reason
    assert any("held-out SFT rows only" in line for line in v.certifies)
    assert HELDOUT_NAME in to_markdown(v)


@pytest.mark.parametrize("gain", [0.0, 0.06, -0.3])
def test_no_gain_or_a_gain_the_interval_cannot_certify_is_refused(gain):
    record, samples = with_heldout(heldout_rows(60, gain=gain))
    v = decide(record, samples, GateParams(**BASIC))
    c = heldout_check(v)
    assert not v.passed and not c.passed and "not certified" in c.reason and c.ci[0] < 0.05


def test_too_few_rows_and_broken_evidence_are_refused():
    record, samples = with_heldout(heldout_rows(10, gain=1.0))
    c = heldout_check(decide(record, samples, GateParams(**BASIC)))
    assert not c.passed and "10 held-out SFT rows cannot certify a gain (gate.min_heldout_rows 30" in c.reason
    rows = heldout_rows(60, gain=1.0)
    rows[3]["nll_candidate"] = float("nan")
    c = heldout_check(decide(*with_heldout(rows), GateParams(**BASIC)))
    assert not c.passed and "h3 is NaN" in c.reason
    record, _ = with_heldout(heldout_rows(60, gain=1.0))
    _, samples = general_only_record()
    c = heldout_check(decide(record, samples, GateParams(**BASIC)))
    assert not c.passed and f"eval/samples/{HELDOUT_FILE}) are missing" in c.reason
    record, samples = with_heldout(heldout_rows(60, gain=1.0), rows=61)
    c = heldout_check(decide(record, samples, GateParams(**BASIC)))
    assert not c.passed and "says 61 held-out rows but 60" in c.reason


def test_a_null_gain_measures_but_does_not_check():
    record, samples = with_heldout(heldout_rows(60, gain=1.0))
    v = decide(record, samples, GateParams(**dict(BASIC, min_heldout_nll_gain=None)))
    assert heldout_check(v) is None and any("not checked (gate.min_heldout_nll_gain is null)" in x for x in v.not_checked)


def test_the_stage_reads_the_per_row_file(tmp_path):
    from tasks.gate import run

    record, samples = with_heldout(heldout_rows(60, gain=0.5))
    folder = tmp_path / "samples"
    for who, per in samples.items():
        if who == "sft_heldout":
            continue
        (folder / who).mkdir(parents=True)
        for name, items in per.items():
            (folder / who / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (folder / HELDOUT_FILE).write_text("".join(json.dumps(r) + "\n" for r in samples["sft_heldout"]))
    assert len(load_samples(folder)["sft_heldout"]) == 60
    (tmp_path / "evaluate.json").write_text(json.dumps(record))
    out = run(from_dict({"gate": BASIC}), evaluation=str(tmp_path / "evaluate.json"), samples=str(folder),
              report=str(tmp_path / "gate.md"), metrics=str(tmp_path / "gate.json"))
    assert out["passed"], out["reasons"]
    assert "heldout_nll" in Path(tmp_path / "gate.md").read_text()
