"""tasks.dedup: exact and near duplicates, decontamination against evaluate.benchmarks, templated rows kept."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tasks import dedup, make_data, validate
from tempering import TemperingError
from tempering import dedup as dedup_lib
from tempering.config import (BenchmarkSpec, DedupParams, DevParams, DriftParams, EvaluateParams, Params, SourceSpec,
                              ValidateParams)


def bench_params(folder: Path | None, drift: str | None = None) -> EvaluateParams:
    """evaluate.benchmarks = every JSONL file of ``folder`` but the dev split, which is
    evaluate.dev (dedup decontaminates against exactly these)."""
    files = sorted(folder.glob("*.jsonl")) if folder else []
    specs = tuple(BenchmarkSpec(name=p.stem, path=str(p), role="domain" if p.stem == "domain" else "general")
                  for p in files if p.stem != "domain_dev")
    dev = tuple(BenchmarkSpec(name="domain", path=str(p), role="domain") for p in files if p.stem == "domain_dev")
    return EvaluateParams(benchmarks=specs, drift=DriftParams(path=drift), dev=DevParams(benchmarks=dev))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """make_data -> validate -> dedup on the default generated data."""
    root = tmp_path_factory.mktemp("dd")
    gen = root / "generated"
    make_data.run(Params(), out=str(gen))
    sources = tuple(SourceSpec(path=str(gen / f), kind=k, format=fmt) for f, k, fmt in (
        ("sft_alpaca.json", "sft", "alpaca"), ("sft_messages.jsonl", "sft", "messages"),
        ("preference.jsonl", "preference", "pairs"), ("corpus.txt", "text", "text")))
    params = Params(validate_=ValidateParams(sources=sources), evaluate=bench_params(gen / "benchmarks"))
    validate.run(params, out=str(root / "validated"), quarantine=str(root / "vq.jsonl"),
                 report=str(root / "v.md"), metrics=str(root / "v.json"))
    summary = dedup.run(params, data=str(root / "validated"),
                        out=str(root / "clean"), quarantine=str(root / "dq.jsonl"), metrics=str(root / "d.json"))
    return {"root": root, "gen": gen, "summary": summary}


def _folder_bytes(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_data_stages_rerun_to_byte_identical_folders(pipeline, tmp_path, monkeypatch):
    """make_data, validate and dedup re-run on the same inputs (later, from another commit) write
    the same bytes, meta.json included, so DVC sees unchanged outputs and training does not re-run
    after a code change that leaves the data alone; the run's git SHA and times go to --metrics."""
    import time

    from tempering import io

    root = pipeline["root"]
    monkeypatch.setattr(io, "git_sha", lambda: "another-commit")
    time.sleep(1.1)  # a later finished_at, were it still written into the folder
    make_data.run(Params(), out=str(tmp_path / "generated"))
    assert _folder_bytes(tmp_path / "generated") == _folder_bytes(pipeline["gen"])
    sources = tuple(SourceSpec(path=str(pipeline["gen"] / f), kind=k, format=fmt) for f, k, fmt in (
        ("sft_alpaca.json", "sft", "alpaca"), ("sft_messages.jsonl", "sft", "messages"),
        ("preference.jsonl", "preference", "pairs"), ("corpus.txt", "text", "text")))
    params = Params(validate_=ValidateParams(sources=sources), evaluate=bench_params(pipeline["gen"] / "benchmarks"))
    validate.run(params, out=str(tmp_path / "validated"), quarantine=str(tmp_path / "vq.jsonl"),
                 report=str(tmp_path / "v.md"), metrics=str(tmp_path / "v.json"))
    assert _folder_bytes(tmp_path / "validated") == _folder_bytes(root / "validated")
    dedup.run(params, data=str(root / "validated"), out=str(tmp_path / "clean"), quarantine=str(tmp_path / "dq.jsonl"),
              metrics=str(tmp_path / "d.json"))
    assert _folder_bytes(tmp_path / "clean") == _folder_bytes(root / "clean")
    for name in ("v.json", "d.json"):
        got = json.loads((tmp_path / name).read_text())["provenance"]
        assert got["git_sha"] == "another-commit" and got["finished_at"] and got["wall_time_s"] >= 0, name
        assert json.loads((root / name).read_text())["provenance"]["git_sha"] != "another-commit"


def test_generated_data_only_planted_duplicates_removed(pipeline):
    root, gen = pipeline["root"], pipeline["gen"]
    manifest = json.loads((gen / "manifest.json").read_text())
    removed = read_jsonl(root / "dq.jsonl")
    validated = {k: read_jsonl(root / "validated" / f"{k}.jsonl") for k in dedup.KINDS}
    clean = {k: read_jsonl(root / "clean" / f"{k}.jsonl") for k in dedup.KINDS}
    by_source = {r["source"]: r for rows in validated.values() for r in rows}

    planted = {(str(gen / d["file"]), d["row"]): d for d in manifest["dirty"] if d["caught_by"] == "dedup"}
    got = {(q["source"], q["row"]): q for q in removed}
    # Exactly the planted duplicates go; every templated row stays.
    assert set(got) == set(planted)
    for key, q in got.items():
        d = planted[key]
        assert q["reason"] == d["defect"] and q["stage"] == "dedup"
        original = by_source[f"{gen / d.get('of_file', d['file'])}:{d['of_row']}"]
        assert q["duplicate_of"] == original["id"]
        if q["reason"] == "near_duplicate":
            assert 0.8 <= q["similarity"] < 1.0
    # kept + removed = read, per kind; clean ids unique and all pointed-to rows kept
    metrics = json.loads((root / "d.json").read_text())
    for kind in dedup.KINDS:
        k = metrics["kinds"][kind]
        assert k["kept"] + k["exact_duplicate"] + k["near_duplicate"] + k["contaminated"] == k["read"]
        assert k["read"] == len(validated[kind]) and k["kept"] == len(clean[kind])
        assert len({r["id"] for r in clean[kind]}) == len(clean[kind])
    kept_ids = {r["id"] for rows in clean.values() for r in rows}
    assert all(q["duplicate_of"] in kept_ids for q in removed)
    assert metrics["contaminated"] == 0
    assert metrics["contaminated_by_benchmark"] == {"domain": 0, "general_arithmetic": 0, "general_knowledge": 0,
                                                    "dev_domain": 0}
    assert sorted(p.name for p in (root / "clean").iterdir()) == ["meta.json", "preference.jsonl", "sft.jsonl",
                                                                 "sft_heldout.jsonl", "text.jsonl"]
    # A domain benchmark is configured: nothing held out (the file is there, empty).
    assert (root / "clean" / "sft_heldout.jsonl").read_text() == "" and not metrics["sft_heldout"]["enabled"]


def test_templated_rows_stay_below_threshold(pipeline):
    """The closest pair of clean generated SFT rows is far from the near-duplicate threshold."""
    clean = read_jsonl(pipeline["root"] / "clean" / "sft.jsonl")
    hasher = dedup_lib.WordHasher()
    sets = [np.unique(dedup_lib.shingle_hashes(hasher(dedup_lib.words(dedup_lib.row_text("sft", r))), 5)) for r in clean]
    worst = 0.0
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            inter = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
            worst = max(worst, inter / (len(sets[i]) + len(sets[j]) - inter))
    assert worst < 0.6, worst


def row(i: int, text: str, kind: str = "text") -> dict:
    if kind == "sft":
        return {"id": f"id{i}", "source": f"f.jsonl:{i}", "messages": [{"role": "user", "content": "q"},
                                                                      {"role": "assistant", "content": text}]}
    return {"id": f"id{i}", "source": f"f.jsonl:{i}", "text": text}


def sentence(rng: random.Random, n: int) -> str:
    vocab = [f"w{i}" for i in range(500)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_exact_and_near_duplicates():
    rng = random.Random(0)
    base = sentence(rng, 60)
    words = base.split()
    near = " ".join(words[:30] + ["changed"] + words[31:])  # one word changed: Jaccard ~0.85
    far = " ".join(words[:20] + [sentence(rng, 40)])  # a third shared
    rows = [row(1, base), row(2, base.upper() + " !!"), row(3, near), row(4, far), row(5, "..."), row(6, "?!")]
    kept, removed, metrics = dedup_lib.dedup_rows({"text": rows}, DedupParams())
    reasons = {q["row"]: (q["reason"], q["duplicate_of"]) for q in removed}
    assert reasons == {2: ("exact_duplicate", "id1"), 3: ("near_duplicate", "id1")}
    assert [r["id"] for r in kept["text"]] == ["id1", "id4", "id5", "id6"]  # punctuation-only rows differ
    assert metrics["kinds"]["text"]["near_duplicate"] == 1 and metrics["exact_duplicate"] == 1
    # a stricter threshold keeps the near duplicate
    kept, removed, _ = dedup_lib.dedup_rows({"text": rows}, DedupParams(threshold=0.95))
    assert {q["row"] for q in removed} == {2}


def test_dedup_is_per_kind_and_uses_message_text():
    text = sentence(random.Random(1), 30)
    rows = {"sft": [row(1, text, "sft"), row(2, text, "sft")], "text": [row(3, "q\n" + text)]}
    kept, removed, _ = dedup_lib.dedup_rows(rows, DedupParams())
    assert [q["row"] for q in removed] == [2] and len(kept["text"]) == 1


def test_near_duplicate_recall_at_default_threshold():
    """One changed word in a ~100-word row (exact Jaccard ~0.9) is found: LSH recall there is ~99.9% a pair."""
    rng = random.Random(2)
    rows, expected = [], set()
    for i in range(40):
        doc = sentence(rng, 100).split()
        rows.append(row(len(rows) + 1, " ".join(doc)))
        doc[rng.randrange(10, 90)] = "zz"
        rows.append(row(len(rows) + 1, " ".join(doc)))
        expected.add(len(rows))
    _, removed, _ = dedup_lib.dedup_rows({"text": rows}, DedupParams())
    assert {q["row"] for q in removed} == expected


def test_decontamination():
    bench = {"quiz": [{"id": "quiz-1", "question": "Which river flows through the ancient city of Zarnak in spring?",
                       "choices": ["The Ollo", "The Pim", "The Varr", "The Uze"], "answer": 2},
                      {"id": "quiz-2", "question": "What is 2 + 2?", "choices": ["4", "5", "6", "7"], "answer": 0}]}
    rows = [
        row(1, "Q: Which river flows through the ancient city of Zarnak in spring? A: The Varr."),  # whole question
        row(2, "Which river flows through the ancient city of Zarnak?"),  # 9 words, below n and not the whole item
        row(3, "What is 2 + 2? It is 4."),  # too short to count
        row(4, "An unrelated sentence about rivers and cities and spring floods in general terms only."),
    ]
    kept, removed, metrics = dedup_lib.dedup_rows({"text": rows}, DedupParams(), bench)
    assert [(q["row"], q["reason"], q["benchmark"], q["benchmark_item"]) for q in removed] == \
        [(1, "contaminated", "quiz", "quiz-1")]
    assert metrics["contaminated_by_benchmark"] == {"quiz": 1}
    # a short whole item (8..12 words) counts when quoted whole
    short = {"s": [{"id": "s-1", "question": "Name the capital city of Freedonia today", "choices": ["A", "B", "C",
                                                                                                    "D"], "answer": 0}]}
    _, removed, _ = dedup_lib.dedup_rows({"text": [row(1, "so: name the capital city of freedonia today, a!")]},
                                     DedupParams(), short)
    assert [q["reason"] for q in removed] == ["contaminated"]
    # decontam_ngram 0 disables it
    _, removed, _ = dedup_lib.dedup_rows({"text": rows}, DedupParams(decontam_ngram=0), bench)
    assert not removed
    # contamination runs first: a duplicate of a contaminated row is contaminated too, never "of" it
    _, removed, _ = dedup_lib.dedup_rows({"text": [rows[0], rows[0]]}, DedupParams(), bench)
    assert [q["reason"] for q in removed] == ["contaminated", "contaminated"]


def test_preference_decontamination_reads_rejected():
    bench = {"b": [{"id": "b-1", "question": "one two three four five six seven eight nine ten eleven twelve",
                    "choices": ["x", "y", "z", "w"], "answer": 0}]}
    pref = {"id": "p1", "source": "p.jsonl:1", "prompt": [{"role": "user", "content": "hi"}], "chosen": "fine",
            "rejected": "one two three four five six seven eight nine ten eleven twelve x"}
    _, removed, _ = dedup_lib.dedup_rows({"preference": [pref]}, DedupParams(), bench)
    assert removed and removed[0]["reason"] == "contaminated"


def test_minhash_matches_datasketch():
    from datasketch import MinHash

    hasher = dedup_lib.WordHasher()
    sh = dedup_lib.shingle_hashes(hasher(dedup_lib.words("the quick brown fox jumps over the lazy dog again and again")), 3)
    ours = dedup_lib.MinHasher(64).values(sh)
    folded = [int(x) for x in ((sh ^ (sh >> np.uint64(32))) & np.uint64(0xFFFFFFFF))]
    ref = MinHash(num_perm=64, seed=dedup_lib.MINHASH_SEED, scheme="affine32", hashfunc=lambda v: v)
    ref.update_batch(folded)
    assert np.array_equal(ours, ref.hashvalues)


def test_normal_form():
    text = "Hello,   World! It's  a\tTEST-case."
    assert dedup_lib.normalize(text) == " ".join(dedup_lib.words(text)) == "hello world it s a test case"




def test_cli_errors(tmp_path, capsys):
    rc = dedup.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                     "--quarantine", str(tmp_path / "q.jsonl"), "--metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "sft.jsonl: file not found" in err and err.count("\n") == 1
    (tmp_path / "v").mkdir()
    for k in dedup.KINDS:
        (tmp_path / "v" / f"{k}.jsonl").write_text("", encoding="utf-8")
    missing = EvaluateParams(benchmarks=(BenchmarkSpec(name="gone", path=str(tmp_path / "nob.jsonl"), role="general"),))
    with pytest.raises(TemperingError, match="nob.jsonl: benchmark file not found"):
        dedup.run(Params(evaluate=missing), data=str(tmp_path / "v"), out=str(tmp_path / "o"),
                  quarantine=str(tmp_path / "q.jsonl"), metrics=str(tmp_path / "m.json"))


# ----------------------------------------------------------------------------- incremental index


def _snapshot(tmp: Path, name: str, rows: list[dict]) -> Path:
    folder = tmp / name
    folder.mkdir()
    for kind in dedup.KINDS:
        (folder / f"{kind}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in (rows if kind == "text" else [])), encoding="utf-8")
    return folder


def _run_snapshot(tmp: Path, data: Path, label: str, **cfg) -> tuple[dict, list[dict]]:
    params = Params(dedup=DedupParams(snapshot=label, **cfg), evaluate=bench_params(None))
    dedup.run(params, data=str(data), out=str(tmp / f"clean-{label}"),
              quarantine=str(tmp / f"q-{label}.jsonl"), metrics=str(tmp / f"m-{label}.json"),
              index=str(tmp / "index"), report=str(tmp / f"r-{label}.md"))
    return json.loads((tmp / f"m-{label}.json").read_text()), read_jsonl(tmp / f"q-{label}.jsonl")


def test_incremental_index_dedups_against_earlier_snapshots(tmp_path):
    rng = random.Random(7)
    docs = [sentence(rng, 120) for _ in range(6)]
    week1 = [{"id": f"a{i}", "source": f"w1.jsonl:{i + 1}", "text": d} for i, d in enumerate(docs[:4])]
    m1, q1 = _run_snapshot(tmp_path, _snapshot(tmp_path, "d1", week1), "w1")
    assert m1["kept"] == 4 and not q1 and m1["index"]["earlier_snapshots"] == {}
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["snapshots"]["w1"]["rows"]["text"] == 4 and meta["num_perm"] == 128
    assert not any("text" in p.name for p in (tmp_path / "index").iterdir())  # signatures only, no text

    near = docs[1].split()
    near[60] = "changed"
    week2 = [{"id": "b1", "source": "w2.jsonl:1", "text": docs[0].upper() + "!"},  # exact (normalized) copy
             {"id": "b2", "source": "w2.jsonl:2", "text": " ".join(near)},        # near copy
             {"id": "b3", "source": "w2.jsonl:3", "text": docs[4]},               # new
             {"id": "b4", "source": "w2.jsonl:4", "text": docs[4]}]               # duplicate within week 2
    data2 = _snapshot(tmp_path, "d2", week2)
    m2, q2 = _run_snapshot(tmp_path, data2, "w2")  # week 1's rows are not given: only the index knows them
    got = {q["row"]: (q["reason"], q["duplicate_of"], q.get("of_snapshot")) for q in q2}
    assert got == {1: ("exact_duplicate", "a0", "w1"), 2: ("near_duplicate", "a1", "w1"),
                   4: ("exact_duplicate", "b3", None)}
    near_q = next(q for q in q2 if q["row"] == 2)
    assert 0.8 <= near_q["similarity"] < 1.0 and "in earlier snapshot w1" in near_q["message"]
    assert m2["of_earlier_snapshot"] == 2 and m2["index"]["earlier_snapshots"] == {"w1": 4}
    assert m2["sources"]["w2.jsonl"] == {"kind": "text", "read": 4, "kept": 1, "exact_duplicate": 2,
                                         "near_duplicate": 1, "contaminated": 0}
    report = (tmp_path / "r-w2.md").read_text()
    assert "| `w2.jsonl` | text | 4 | 1 | 2 | 1 | 0 |" in report and "w1 (4 rows)" in report

    # re-running the same snapshot label replaces its entry: never deduplicated against itself
    m2b, q2b = _run_snapshot(tmp_path, data2, "w2")
    assert [(q["row"], q["reason"]) for q in q2b] == [(q["row"], q["reason"]) for q in q2]
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert {k: v["rows"]["text"] for k, v in meta["snapshots"].items()} == {"w1": 4, "w2": 1}
    # without the index the same rows only lose their in-snapshot duplicate
    _, removed, _ = dedup_lib.dedup_rows({"text": week2}, DedupParams())
    assert [q["row"] for q in removed] == [4]


def test_index_rejects_incompatible_params(tmp_path):
    rows = [{"id": "a", "source": "a.jsonl:1", "text": sentence(random.Random(8), 40)}]
    _run_snapshot(tmp_path, _snapshot(tmp_path, "d1", rows), "w1")
    with pytest.raises(TemperingError, match="built with num_perm=128 but dedup.num_perm is 64"):
        _run_snapshot(tmp_path, _snapshot(tmp_path, "d2", rows), "w2", num_perm=64)
    # the same label alone may change params (its own entry is rebuilt)
    m, _ = _run_snapshot(tmp_path, _snapshot(tmp_path, "d3", rows), "w1", num_perm=64)
    assert m["kept"] == 1
    (tmp_path / "index" / "index.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(TemperingError, match="unreadable dedup index"):
        _run_snapshot(tmp_path, _snapshot(tmp_path, "d4", rows), "w2")
    with pytest.raises(Exception, match="snapshot"):
        DedupParams(snapshot="../escape")


# ----------------------------------------------------------------------------- benchmarks defined once


def test_dedup_decontaminates_against_exactly_evaluates_benchmarks(tmp_path):
    """The shipped forgetting benchmarks and the drift texts (params.yaml's evaluate section) are
    what dedup protects: a training row quoting an ARC-Easy item or a drift passage is dropped."""
    import gzip

    from tempering.benchmarks import decontamination_sets
    from tempering.config import load_params

    root = Path(__file__).resolve().parents[1]
    ev = load_params(root / "params.yaml").evaluate
    shipped = tuple(b.model_copy(update={"path": str(root / b.path), "labels": str(root / b.labels) if b.labels else None})
                    for b in ev.benchmarks if b.path.startswith("benchmarks/"))
    # The dev split's shipped drift texts too (its domain questions are make_data's, not shipped).
    dev = ev.dev.model_copy(update={"benchmarks": (),
                                    "drift": ev.dev.drift.model_copy(update={"path": str(root / ev.dev.drift.path)})})
    ev = ev.model_copy(update={"benchmarks": shipped, "dev": dev,
                               "drift": ev.drift.model_copy(update={"path": str(root / ev.drift.path)})})
    sets, notes = decontamination_sets(ev)
    assert set(sets) == {b.name for b in shipped} | {"drift", "dev_drift"} and not notes
    with gzip.open(root / "benchmarks/arc_easy_test.llmfoundry.jsonl.gz", "rt") as fh:
        arc = json.loads(fh.readline())
    drift = json.loads((root / ev.drift.path).read_text().splitlines()[0])
    dev_text = json.loads((root / ev.dev.drift.path).read_text().splitlines()[0])
    assert len(sets["arc_easy"]) == 2376  # every item, not only the ones a run scores
    data = tmp_path / "v"
    data.mkdir()
    text = [{"id": "leak-arc", "source": "t.jsonl:1", "text": f"Homework. {arc['query']} {arc['choices'][arc['gold']]}"},
            {"id": "leak-drift", "source": "t.jsonl:2", "text": drift["text"]},
            {"id": "leak-dev", "source": "t.jsonl:4", "text": dev_text["text"]},
            {"id": "fine", "source": "t.jsonl:3", "text": "a sentence about nothing in particular " * 3}]
    for kind in dedup.KINDS:
        (data / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (text if kind == "text" else [])))
    dedup.run(Params(evaluate=ev), data=str(data), out=str(tmp_path / "o"), quarantine=str(tmp_path / "q.jsonl"),
              metrics=str(tmp_path / "m.json"))
    removed = {q["original"]["id"]: q for q in read_jsonl(tmp_path / "q.jsonl")}
    assert set(removed) == {"leak-arc", "leak-drift", "leak-dev"}
    assert removed["leak-arc"]["benchmark"] == "arc_easy"
    # The drift passages come from HellaSwag's WikiHow/ActivityNet pool: the first hit may name
    # the hellaswag set. Against the drift texts alone, the same row is caught by them.
    assert removed["leak-drift"]["benchmark"] in {"drift", "hellaswag"}
    _, alone, _ = dedup_lib.dedup_rows({"text": [text[1]]}, DedupParams(), {"drift": sets["drift"]})
    assert [q["benchmark"] for q in alone] == ["drift"]
    assert [r["id"] for r in read_jsonl(tmp_path / "o" / "text.jsonl")] == ["fine"]


def test_hub_tasks_and_absent_optional_benchmarks_are_noted_not_silently_skipped(tmp_path):
    from tempering.benchmarks import decontamination_sets

    ev = EvaluateParams(benchmarks=(BenchmarkSpec(name="wg", task="winogrande", role="general", chat=False),
                                    BenchmarkSpec(name="opt", path=str(tmp_path / "no.jsonl"), role="general",
                                                  optional=True)), drift=DriftParams(path=None))
    sets, notes = decontamination_sets(ev)
    assert sets == {} and len(notes) == 2
    assert "winogrande" in notes[0] and "optional and absent" in notes[1]
