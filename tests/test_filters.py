"""tempering.filters (each row check once), tempering.datacheck (the streaming runner) and
tempering.expectations (great-expectations on the aggregates)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tempering import datacheck, filters
from tempering.config import SourceSpec, TokenCheckParams, ValidateParams
from tempering.expectations import dataset_suite
from tempering.filters import Reason, ValueCounts, content_filters

VP = ValidateParams()


def sft(*turns) -> dict:
    return {"id": "x", "source": "f:1", "messages": [{"role": r, "content": c} for r, c in turns]}


def pref(prompt, chosen, rejected) -> dict:
    return {"id": "x", "source": "f:1", "prompt": [{"role": r, "content": c} for r, c in prompt],
            "chosen": chosen, "rejected": rejected}


def by_code(kind: str, vp: ValidateParams = VP) -> dict:
    return {f.code: f for f in content_filters(kind, vp).filters}


GOOD = sft(("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"))


@pytest.mark.parametrize("kind,row", [("sft", GOOD), ("preference", pref([("user", "Q?")], "yes", "no")),
                                      ("text", {"id": "x", "source": "f:1", "text": "t" * 60})])
def test_every_filter_passes_a_clean_row(kind, row):
    group = content_filters(kind, VP)
    assert [f.code for f in group.filters] == [c for c in filters.CHECKS if c in by_code(kind)]
    assert all(f(row) is None for f in group.filters)
    assert group.reasons(row) == []


@pytest.mark.parametrize("row,code,message", [
    (sft(("user", "a"), ("bot", "b")), "unknown_role", "messages[1].role 'bot' is not one of system, user, assistant"),
    (sft(("assistant", "a"), ("user", "b")), "bad_role_order",
     "messages[0]: the conversation must start with a user turn (got assistant)"),
    (sft(("user", "a"), ("user", "b"), ("assistant", "c")), "bad_role_order", "messages[1]: two consecutive user turns"),
    (sft(("user", "a"), ("system", "b"), ("assistant", "c")), "bad_role_order",
     "messages[1]: a system turn after the first turn"),
    (sft(("system", "a")), "bad_role_order", "messages: no user turn"),
    (sft(("user", "a"), ("assistant", "b"), ("user", "c")), "bad_role_order",
     "messages[2]: must end with an assistant turn (got user)"),
    (sft(("user", " \n"), ("assistant", "b")), "empty_field", "field messages[0].content (user) is empty"),
    (sft(("user", "a\x01b"), ("assistant", "b")), "control_chars",
     "field messages[0].content (user) contains control character U+0001 at offset 1"),
    (sft(("user", "a"), ("assistant", "b" * 20_001)), "too_long",
     "field messages[1].content (assistant) is too long (20001 > 20000 characters)"),
])
def test_each_sft_filter_names_its_reason_and_field(row, code, message):
    assert by_code("sft")[code](row) == Reason(code, message)
    assert content_filters("sft", VP).reasons(row)[0].code == code


def test_preference_and_text_filters():
    p = by_code("preference")
    assert p["chosen_equals_rejected"](pref([("user", "Q")], "same ", " same")) == Reason(
        "chosen_equals_rejected", "fields chosen and rejected are identical")
    assert p["bad_role_order"](pref([("user", "Q"), ("assistant", "A")], "x", "y")) == Reason(
        "bad_role_order", "prompt[1]: must end with a user turn (got assistant)")
    short = {"id": "x", "source": "f:1", "text": "tiny"}
    assert by_code("text")["too_short"](short) == Reason("too_short", "field text is too short (4 < 50 characters)")


def test_a_row_failing_several_checks_gets_all_reasons_in_priority_order():
    row = sft(("user", ""), ("user", "a\x02"))
    assert [r.code for r in content_filters("sft", VP).reasons(row)] == ["bad_role_order", "empty_field",
                                                                          "control_chars", "too_short"]


def test_tool_turns_are_skipped_by_the_order_check():
    vp = ValidateParams(allowed_roles=("system", "user", "assistant", "tool"))
    row = sft(("user", "a"), ("tool", "t"), ("assistant", "b"))
    assert content_filters("sft", vp).reasons(row) == []


def test_value_counts_is_numpys_percentile():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 80)
        values = ([rng.randint(0, 40) for _ in range(n)] if trial % 2 else
                  [rng.randint(0, 9) / rng.randint(1, 50) for _ in range(n)])
        vc = ValueCounts()
        for v in values:
            vc.add(v)
        for q in (5, 50, 95, 100, 0):
            assert vc.percentile(q) == float(np.percentile(np.asarray(values), q))
        assert (vc.min(), vc.max(), vc.n) == (min(values), max(values), n)
        assert vc.count_over(20) == sum(1 for v in values if v > 20)
    with pytest.raises(ValueError):
        ValueCounts().percentile(50)


def test_sft_token_filter_with_a_tokenizer():
    from tempering.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    row = sft(("user", "What is the capital of France?"), ("assistant", "Paris."))
    f = filters.SFTTokenFilter(tok, max_length=64, chat_template=None, tp=TokenCheckParams())
    assert f(row) is None
    strict = filters.SFTTokenFilter(tok, max_length=64, chat_template=None,
                                    tp=TokenCheckParams(min_supervised_share=0.99))
    reason = strict(row)
    assert reason.code == "low_supervision" and "are supervised after truncation at 64 tokens" in reason.message
    assert (f.examples, f.ok, strict.examples) == (1, 1, 1)


# ----------------------------------------------------------------------------- the runner


def _alpaca(path: Path, n: int, bad_every: int = 10) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": f"Say {i}", "input": "",
                                 "output": "" if i % bad_every == bad_every - 1 else f"{i} it is."}) + "\n")
        fh.write("not json\n")
    return path


def _count_reads(monkeypatch) -> list:
    """The results the runner has read so far (it reads through ``datacheck.iter_source``)."""
    read = []
    real = datacheck.iter_source

    def counting(*args, **kw):
        for res in real(*args, **kw):
            read.append(res)
            yield res

    monkeypatch.setattr(datacheck, "iter_source", counting)
    return read


def test_runner_streams_rows_lazily(tmp_path, monkeypatch):
    """Each row reaches the sink before the next is read: nothing collects all rows first."""
    path = _alpaca(tmp_path / "a.jsonl", 500)
    read = _count_reads(monkeypatch)

    class Sink(datacheck.ListSink):
        def keep(self, kind, row):
            assert len(read) == row_number(row)  # this row is the last one read
            super().keep(kind, row)

        def quarantine(self, phase, q):
            assert len(read) == q["row"]
            super().quarantine(phase, q)

    def row_number(row):
        return int(row["source"].rpartition(":")[2])

    sink = Sink()
    vp = ValidateParams(sources=(SourceSpec(path=str(path), kind="sft", format="alpaca"),), max_reject_share=1.0)
    metrics, examples = datacheck.run_checks(vp, sink, tokens_skipped="off", preference_skipped="off")
    assert len(read) == 501 and metrics["read"] == 501
    assert metrics["kept"] == len(sink.kept["sft"]) == 450
    assert metrics["by_reason"] == {"empty_field": 50, "invalid_json": 1}
    q = sink.quarantined()
    assert [x["reason"] for x in q[:1]] == ["invalid_json"]  # ingest rejects first, as the stage always wrote
    assert len(examples["empty_field"]) == datacheck.EXAMPLES_PER_REASON
    assert examples["empty_field"][0] == q[1]["message"] == f"{path}:10: field messages[1].content (assistant) is empty"


def test_runner_memory_does_not_grow_with_rows(tmp_path):
    """Peak Python allocations for 20,000 rows stay close to those for 2,000 (file sinks)."""
    import tracemalloc

    def peak(n: int) -> int:
        path = _alpaca(tmp_path / f"a{n}.jsonl", n)
        vp = ValidateParams(sources=(SourceSpec(path=str(path), kind="sft", format="alpaca"),),
                            max_reject_share=1.0)
        datacheck.run_checks(vp, datacheck.ListSink(), tokens_skipped="off", preference_skipped="off")  # warm
        tracemalloc.start()
        with datacheck.FileSink(tmp_path / f"out{n}", tmp_path / f"spill{n}") as sink:
            metrics, _ = datacheck.run_checks(vp, sink, tokens_skipped="off", preference_skipped="off")
            with open(tmp_path / f"q{n}.jsonl", "wb") as fh:
                sink.write_quarantine(fh)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert metrics["read"] == n + 1
        return top

    small, large = peak(2_000), peak(20_000)
    assert large < small + 2_000_000, (small, large)  # 10x the rows; a held row costs ~1-2 KB


def test_token_filters_hold_at_most_one_small_batch(tmp_path, monkeypatch):
    """With the token filters on, a row waits for at most TOKEN_BATCH later rows to be read."""
    from tempering.testing import make_tiny_tokenizer

    path = _alpaca(tmp_path / "a.jsonl", 300)
    read = _count_reads(monkeypatch)

    lags = []

    class Sink(datacheck.ListSink):
        def keep(self, kind, row):
            lags.append(len(read) - int(row["source"].rpartition(":")[2]))
            super().keep(kind, row)

    monkeypatch.setattr(datacheck, "TOKEN_BATCH", 16)
    vp = ValidateParams(sources=(SourceSpec(path=str(path), kind="sft", format="alpaca"),), max_reject_share=1.0)
    tok = filters.SFTTokenFilter(make_tiny_tokenizer(), max_length=64, chat_template=None, tp=vp.tokens)
    sink = Sink()
    metrics, _ = datacheck.run_checks(vp, sink, sft_tokens=tok, preference_skipped="off")
    assert metrics["tokens"]["checked"] and metrics["tokens"]["examples"] == 270 == metrics["kept"]
    assert [int(r["source"].rpartition(":")[2]) for r in sink.kept["sft"]] == [i for i in range(1, 301) if i % 10]
    # 16 waiting rows, plus the quarantined rows (every 10th) read between them: at most 2 of them
    assert 16 <= max(lags) <= 18 and min(lags) >= 0


def test_file_sink_writes_kept_rows_and_quarantine_in_phase_order(tmp_path):
    with datacheck.FileSink(tmp_path / "out", tmp_path / "spill") as sink:
        sink.quarantine("tokens:sft", {"reason": "low_supervision", "row": 3})
        sink.quarantine("ingest", {"reason": "invalid_json", "row": 9})
        sink.quarantine("content:sft", {"reason": "empty_field", "row": 1})
        sink.keep("sft", {"id": "a"})
        with open(tmp_path / "q.jsonl", "wb") as fh:
            sink.write_quarantine(fh)
    rows = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rows] == ["invalid_json", "empty_field", "low_supervision"]
    assert (tmp_path / "out" / "sft.jsonl").read_text() == '{"id": "a"}\n'
    assert (tmp_path / "out" / "text.jsonl").read_text() == ""
    assert not (tmp_path / "spill").exists()


# ----------------------------------------------------------------------------- the dataset suite (GX)


def test_dataset_suite_judges_aggregates_against_their_limits():
    failed, broken = dataset_suite({"a": 0.1, "b": 0.3, "c": 0.25, "d": 0.26}, 0.25,
                                   {"truncation_rate": (0.2, 0.2), "eot_missing_rate": (0.01, 0.0),
                                    "prompt_truncation_rate": (None, 0.2)})
    assert failed == ["b", "d"]  # the limit itself passes; order as given
    assert broken == ["eot_missing_rate"]  # unmeasured rates are not judged
    assert dataset_suite({"a": 0.0}, 0.0, {}) == ([], [])


# ----------------------------------------------------------------------------- streaming ingest of a JSON array


def test_json_array_files_are_read_element_by_element(tmp_path, monkeypatch):
    import gzip

    from tempering import TemperingError, formats

    monkeypatch.setattr(formats, "_JSON_CHUNK", 5)  # every element cut at some buffer boundary
    rows = [{"instruction": f"q{i}", "output": "a" * (i % 13), "n": i * 1.5e3, "ok": i % 2 == 0} for i in range(50)]
    for text in (json.dumps(rows), json.dumps(rows, indent=1), "\ufeff" + json.dumps(rows)):
        path = tmp_path / "a.json"
        path.write_text(text, encoding="utf-8")
        assert list(formats.iter_records(path)) == list(enumerate(rows, 1))
        gz = tmp_path / "a.json.gz"
        gz.write_bytes(gzip.compress(text.encode("utf-8")))
        assert list(formats.iter_records(gz)) == list(enumerate(rows, 1))
    # rows come before the end of the file is read (the whole-file reader would fail first)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(rows * 20)[:-1] + ", {", encoding="utf-8")
    it = formats.iter_records(broken)
    assert next(it) == (1, rows[0])
    with pytest.raises(TemperingError, match="invalid JSON"):
        list(it)
    # anything else gets the whole-file reader's exact error
    for bad, message in [('[{"a": 1}, {"a": 2', "line 1 column 19: invalid JSON"),
                         ("[1, 2,]", "invalid JSON"), ("[]", "file is empty (an empty JSON array)"),
                         ('{"rows": [1]}', "expected a JSON array of rows (it is an object; the rows may be under 'rows')")]:
        path = tmp_path / "b.json"
        path.write_text(bad, encoding="utf-8")
        with pytest.raises(TemperingError, match=message.replace("(", r"\(").replace(")", r"\)")):
            list(formats.iter_records(path))
    path.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")  # JSON Lines named .json
    assert list(formats.iter_records(path)) == [(1, {"a": 1}), (2, {"a": 2})]
