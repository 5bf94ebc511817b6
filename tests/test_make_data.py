"""tasks.make_data: determinism, counts, benchmark validity, held-out wordings, planted dirty rows."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tasks import make_data
from tempering.config import MakeDataParams, Params
from tempering.io import hash_path

BENCHES = ("domain", "domain_dev", "general_knowledge", "general_arithmetic")


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("md") / "generated"
    make_data.run(Params(), out=str(out))
    return out


def load(folder: Path) -> dict:
    return {
        "alpaca": json.loads((folder / "sft_alpaca.json").read_text(encoding="utf-8")),
        "messages": [json.loads(x) for x in (folder / "sft_messages.jsonl").read_text().splitlines()],
        "preference": [json.loads(x) for x in (folder / "preference.jsonl").read_text().splitlines()],
        "corpus": (folder / "corpus.txt").read_text(encoding="utf-8"),
        "manifest": json.loads((folder / "manifest.json").read_text()),
        **{b: [json.loads(x) for x in (folder / "benchmarks" / f"{b}.jsonl").read_text().splitlines()]
           for b in BENCHES},
    }


def dirty_rows(manifest: dict, file: str) -> set[int]:
    return {d["row"] for d in manifest["dirty"] if d["file"] == file}


def clean_sft_turns(d: dict) -> list[tuple[str, str]]:
    """(user question, assistant answer) of every clean SFT turn, profile rows excluded."""
    m = d["manifest"]
    turns = []
    for i, row in enumerate(d["alpaca"], 1):
        if i in dirty_rows(m, "sft_alpaca.json"):
            continue
        for q, a in row.get("history", []):
            turns.append((q, a))
        turns.append((row["input"] or row["instruction"], row["output"]))
    for i, row in enumerate(d["messages"], 1):
        if i in dirty_rows(m, "sft_messages.jsonl"):
            continue
        msgs = [x for x in row["messages"] if x["role"] != "system"]
        turns += [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2])]
    return [(q, a) for q, a in turns if template_of(q, {"profile": make_data.PROFILE_INSTRUCTIONS}) is None]


def template_of(question: str, templates: dict[str, list[str]]) -> tuple[str, int, str] | None:
    """(attribute, template index, name) of a question built from ``templates``."""
    for attr, ts in templates.items():
        for i, t in enumerate(ts):
            pattern = "^" + re.escape(t).replace(re.escape("{name}"), r"(?P<name>[A-Z][a-z]+ [A-Z][a-z]+)") + "$"
            m = re.match(pattern, question)
            if m:
                return attr, i, m.group("name")
    return None


def test_deterministic_and_atomic(gen, tmp_path):
    again = tmp_path / "again"
    make_data.run(Params(), out=str(again))
    assert hash_path(again) == hash_path(gen)  # byte-identical (meta.json aside)
    for name in ("sft_alpaca.json", "sft_messages.jsonl", "preference.jsonl", "corpus.txt", "manifest.json"):
        assert (again / name).read_bytes() == (gen / name).read_bytes()
    assert (gen / "meta.json").exists()
    assert not [p for p in gen.parent.iterdir() if p.name.startswith(".tmp-")]
    other = tmp_path / "other"
    make_data.run(Params(make_data=MakeDataParams(seed=7)), out=str(other))
    assert hash_path(other) != hash_path(gen)


def test_counts_and_manifest(gen):
    d = load(gen)
    m, counts = d["manifest"], d["manifest"]["counts"]
    cfg = MakeDataParams()
    assert counts["entities"] == cfg.n_entities and counts["facts"] == cfg.n_entities * 4
    assert counts["sft_alpaca.json"] == len(d["alpaca"])
    assert counts["sft_messages.jsonl"] == len(d["messages"])
    assert counts["preference.jsonl"] == len(d["preference"])
    assert counts["benchmarks/domain.jsonl"] == len(d["domain"]) == cfg.n_entities * 4 * cfg.domain_bench_per_fact
    assert len(d["general_knowledge"]) == len(d["general_arithmetic"]) == cfg.n_general
    assert m["seed"] == cfg.seed
    # Paragraphs separated by blank lines, one per line (the manifest's corpus row numbers rely on it).
    paras = d["corpus"].rstrip("\n").split("\n\n")
    assert len(paras) == counts["corpus.txt paragraphs"] and all("\n" not in p for p in paras)

    # Every fact has exactly sft_paraphrases distinct question wordings across the two SFT files.
    wordings = defaultdict(set)
    for q, a in clean_sft_turns(d):
        t = template_of(q, make_data.SFT_QUESTIONS)
        assert t is not None, q
        attr, idx, name = t
        wordings[(name, attr)].add(idx)
        assert name in a
    assert len(wordings) == cfg.n_entities * 4
    assert Counter(len(v) for v in wordings.values()) == {cfg.sft_paraphrases: cfg.n_entities * 4}
    # Some messages rows have a system turn, some are multi-turn; some alpaca rows use input/history.
    assert any(r["messages"][0]["role"] == "system" for r in d["messages"])
    assert any(sum(x["role"] == "user" for x in r["messages"]) > 1 for r in d["messages"])
    assert any(isinstance(r.get("input"), str) and r["input"] for r in d["alpaca"])
    assert any(r.get("history") for r in d["alpaca"])


def facts_from_answers(d: dict) -> dict[tuple[str, str], str]:
    facts = {}
    for q, a in clean_sft_turns(d):
        attr, _, name = template_of(q, make_data.SFT_QUESTIONS)
        value = a.split(".")[0]
        assert facts.setdefault((name, attr), value) == value  # consistent answers
    return facts


def test_answers_start_with_the_bare_value(gen):
    d = load(gen)
    for q, a in clean_sft_turns(d):
        attr, _, name = template_of(q, make_data.SFT_QUESTIONS)
        value = a.split(".")[0]
        assert value in [v[0].upper() + v[1:] for v in make_data.VALUES[attr]] and a.endswith(".") and name in a
    assert "an astronomer astronomer" not in json.dumps(d["alpaca"])


def test_preference_pairs(gen):
    d = load(gen)
    facts = facts_from_answers(d)
    known = {name for name, _ in facts}
    bad = dirty_rows(d["manifest"], "preference.jsonl")
    unknown = 0
    for i, row in enumerate(d["preference"], 1):
        if i in bad:
            continue
        q = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        attr, _, name = template_of(q, make_data.SFT_QUESTIONS)
        if name not in known:
            # A person the data has no record of: an honest "no record" beats a made-up fact
            # stated exactly as the SFT answers state facts. The name appears nowhere else.
            unknown += 1
            assert name in row["chosen"] and row["chosen"].startswith("Unknown. ")
            assert abs(len(row["chosen"]) - len(row["rejected"])) <= 25  # a claim apart, not a length apart
            value = row["rejected"].split(".")[0]
            assert value.lower() in [v.lower() for v in make_data.VALUES[attr]] and name in row["rejected"]
            others = json.dumps([d["alpaca"], d["messages"], d["domain"], d["domain_dev"]]) + d["corpus"]
            assert name not in others
            continue
        chosen, rejected = row["chosen"].split(".")[0], row["rejected"].split(".")[0]
        assert chosen == facts[(name, attr)] and rejected != chosen
        assert rejected.lower() in [v.lower() for v in make_data.VALUES[attr]]
        # same style: only the value differs
        swapped = row["chosen"].replace(chosen, rejected).replace(chosen.lower(), rejected.lower())
        assert row["rejected"].replace(" an ", " a ") == swapped.replace(" an ", " a ")
    assert unknown == MakeDataParams().unknown_pairs
    # One question per unknown person: a held-out pair is about a name DPO never saw.
    names = Counter(template_of(r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"],
                                make_data.SFT_QUESTIONS)[2]
                    for i, r in enumerate(d["preference"], 1) if i not in bad)
    assert Counter(v for k, v in names.items() if k not in known) == {1: unknown}


@pytest.mark.parametrize("bench", BENCHES)
def test_benchmarks_are_valid(gen, bench):
    items = load(gen)[bench]
    assert len({it["id"] for it in items}) == len(items)
    positions = Counter()
    for it in items:
        assert set(it) == {"id", "question", "choices", "answer"}
        assert isinstance(it["question"], str) and it["question"].strip()
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert all(isinstance(c, str) and c for c in it["choices"])
        assert isinstance(it["answer"], int) and 0 <= it["answer"] < 4
        positions[it["answer"]] += 1
    # balanced answer positions (as uniform as the count allows)
    assert max(positions.values()) - min(positions.values()) <= 1 and len(positions) == 4


def test_domain_benchmark_matches_facts_with_held_out_wording(gen):
    d = load(gen)
    facts = facts_from_answers(d)
    training_text = json.dumps([d["alpaca"], d["messages"], d["preference"]]) + d["corpus"]
    seen_templates = Counter()
    for it in d["domain"]:
        t = template_of(it["question"], make_data.BENCH_QUESTIONS)
        assert t is not None, it["question"]
        attr, idx, name = t
        seen_templates[(attr, idx)] += 1
        assert it["choices"][it["answer"]] == facts[(name, attr)]
        assert all(c.lower() in [v.lower() for v in make_data.VALUES[attr]] for c in it["choices"])
        # never seen in training: neither the question nor its wording
        assert it["question"] not in training_text
        assert template_of(it["question"], make_data.SFT_QUESTIONS) is None
    assert len(seen_templates) == 4 * len(make_data.BENCH_QUESTIONS["town"])  # every held-out wording used
    # no held-out template is a substring of a training template (or vice versa)
    for attr in make_data.ATTRIBUTES:
        for b in make_data.BENCH_QUESTIONS[attr]:
            core = b.replace("{name}", "").strip(" ?.")
            assert not any(core in s or s.replace("{name}", "").strip(" ?.") in b
                           for s in make_data.SFT_QUESTIONS[attr])


def test_domain_dev_split_asks_the_same_facts_in_other_held_out_wordings(gen):
    """benchmarks/domain_dev.jsonl (export's interpolation sweep): one item per fact, the right
    value, a held-out template never used for the same fact in the benchmark, never in training."""
    d = load(gen)
    facts = facts_from_answers(d)
    training_text = json.dumps([d["alpaca"], d["messages"], d["preference"]]) + d["corpus"]
    bench = {(t[2], t[0]): t[1] for t in (template_of(it["question"], make_data.BENCH_QUESTIONS) for it in d["domain"])}
    assert len(d["domain_dev"]) == len(d["domain"]) == len(facts)
    assert not {it["question"] for it in d["domain_dev"]} & {it["question"] for it in d["domain"]}
    for it in d["domain_dev"]:
        attr, idx, name = template_of(it["question"], make_data.BENCH_QUESTIONS)
        assert idx != bench[(name, attr)]
        assert it["choices"][it["answer"]] == facts[(name, attr)] and it["question"] not in training_text
        assert it["id"].startswith("domain-dev-")
    assert d["manifest"]["counts"]["benchmarks/domain_dev.jsonl"] == len(d["domain_dev"])


def test_domain_dev_needs_held_out_wordings_left():
    from tempering import TemperingError
    from tempering.config import from_dict

    with pytest.raises(TemperingError, match="domain_dev_per_fact"):
        from_dict({"make_data": {"domain_bench_per_fact": 4, "domain_dev_per_fact": 2}})
    assert MakeDataParams(domain_bench_per_fact=4, domain_dev_per_fact=1).domain_dev_per_fact == 1


def test_general_benchmarks_answers(gen):
    d = load(gen)
    for it in d["general_arithmetic"]:
        q, answer = it["question"], it["choices"][it["answer"]]
        m = re.match(r"What is (\d) (\+|plus|-|minus) (\d)\?", q)
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert answer == (f"{a} + {b} = {a + b}" if op in "+plus" else f"{a} - {b} = {a - b}")
    capitals = dict(make_data.CAPITALS)
    for it in d["general_knowledge"]:
        m = re.match(r"(?:What is|Which city is) the capital of (.+)\?", it["question"])
        if m:
            assert it["choices"][it["answer"]] == capitals[m.group(1)]


def test_dirty_rows_are_planted_and_listed(gen):
    d = load(gen)
    dirty = d["manifest"]["dirty"]
    defects = Counter(x["defect"] for x in dirty)
    assert {"exact_duplicate", "near_duplicate", "empty_field", "wrong_type", "chosen_equals_rejected"} <= set(defects)
    rows = len(d["alpaca"]) + len(d["messages"]) + len(d["preference"])
    share = sum(1 for x in dirty if x["file"] != "corpus.txt") / rows
    assert 0.03 <= share <= 0.08, share
    by = {(x["file"], x["row"]): x for x in dirty}
    # the listed rows really are what the manifest says
    for (file, row), x in by.items():
        if file == "sft_alpaca.json":
            r = d["alpaca"][row - 1]
            if x["defect"] == "wrong_type":
                assert not isinstance(r["instruction"], str) or not isinstance(r["output"], str)
            if x["defect"] == "empty_field":
                assert r["output"] == ""
            if x["defect"] == "exact_duplicate":
                assert r == d["alpaca"][x["of_row"] - 1] and x["of_row"] < row
        if file == "preference.jsonl" and x["defect"] == "chosen_equals_rejected":
            assert d["preference"][row - 1]["chosen"] == d["preference"][row - 1]["rejected"]
    paras = d["corpus"].rstrip("\n").split("\n\n")
    corpus_dirty = [x for x in dirty if x["file"] == "corpus.txt"]
    assert {x["defect"] for x in corpus_dirty} == {"exact_duplicate", "near_duplicate"}
    for x in corpus_dirty:
        a, b = paras[(x["row"] - 1) // 2], paras[(x["of_row"] - 1) // 2]
        diff = sum(1 for u, v in zip(a.split(" "), b.split(" ")) if u != v)
        assert diff == (0 if x["defect"] == "exact_duplicate" else 1)
        assert len(a) > 2000  # longer than a text chunk: one text row of its own


def test_clean_mode_has_no_dirty_rows(tmp_path):
    out = tmp_path / "clean"
    make_data.run(Params(make_data=MakeDataParams(dirty_rows=False, n_entities=6, sft_paraphrases=2,
                                                  n_general=16)), out=str(out))
    d = load(out)
    assert d["manifest"]["dirty"] == []
    assert all(isinstance(r["output"], str) and r["output"] for r in d["alpaca"])
    assert len({json.dumps(r, sort_keys=True) for r in d["alpaca"]}) == len(d["alpaca"])
    assert all(r["chosen"] != r["rejected"] for r in d["preference"])
    assert len(d["domain"]) == 24 and len(d["general_knowledge"]) == 16


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--set", "make_data.n_entities=5", "--set", "make_data.n_general=12"]
    assert make_data.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["entities"] == 5 and (out / "benchmarks" / "domain.jsonl").exists()
