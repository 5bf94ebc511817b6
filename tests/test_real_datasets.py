"""Ingest the real public datasets in shared/data (never copied into the repo) and check their counts.

The folder is ``<repo>/../shared/data`` or ``$TEMPERING_SHARED_DATA``; every test skips when it is
absent, and fails instead where ``.ci/run`` requires it (``tests/shared_data.py``). Counts are the ones in that folder's README.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tempering.config import SourceSpec, ValidateParams
from tempering.formats import Accepted, iter_source

from shared_data import SHARED, need


def ingest(rel: str, kind: str, fmt: str) -> tuple[list[dict], Counter]:
    path = SHARED / rel
    need(path)
    rows, rejected = [], Counter()
    for res in iter_source(SourceSpec(path=str(path), kind=kind, format=fmt)):
        if isinstance(res, Accepted):
            rows.append(res.row)
        else:
            rejected[res.reason] += 1
    return rows, rejected


@pytest.mark.parametrize("rel,count", [
    ("sft/lima_1029.json.gz", 1029),
    ("sft/code_alpaca_2k.json.gz", 2017),
    ("sft/alpaca_first100.json.gz", 100),
])
def test_alpaca_style_sets(rel, count):
    rows, rejected = ingest(rel, "sft", "alpaca")
    assert len(rows) == count and not rejected
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    if "lima" in rel:  # 29 multi-turn dialogues carried in `history`
        assert sum(1 for r in rows if len(r["messages"]) > 2) == 29
    if "alpaca_first100" in rel:
        assert rows[0]["messages"][0]["content"] == "Give three tips for staying healthy."


def test_hh_rlhf_pairs():
    rows, rejected = ingest("preference/hh-rlhf_harmless-base_test.jsonl.gz", "preference", "hh")
    assert len(rows) + sum(rejected.values()) == 2312
    # A handful of upstream pairs have chosen/rejected dialogues that diverge before the last turn.
    assert set(rejected) <= {"bad_structure"} and sum(rejected.values()) <= 10
    assert all(r["prompt"][-1]["role"] == "user" and r["prompt"][0]["role"] == "user" for r in rows)
    # the turn markers were consumed by the split
    assert not any("\n\nHuman:" in m["content"] or "\n\nAssistant:" in m["content"]
                   for r in rows for m in r["prompt"] + [{"content": r["chosen"]}, {"content": r["rejected"]}])


def test_gutenberg_folder_header_stripped():
    rows, rejected = ingest("pretrain/gutenberg_music", "text", "text")
    assert rows and not rejected
    files = {r["source"].rsplit(":", 1)[0].rsplit("/", 1)[-1] for r in rows}
    assert len(files) == 6
    assert not any("*** START OF" in r["text"] or "*** END OF" in r["text"] for r in rows)
    assert not any("Project Gutenberg License" in r["text"] for r in rows)
    assert max(len(r["text"]) for r in rows) <= ValidateParams().text_chunk_chars * 2
    assert sum(len(r["text"]) for r in rows) > 2_000_000


def test_tinyshakespeare():
    rows, rejected = ingest("pretrain/tinyshakespeare.txt.gz", "text", "text")
    assert rows and not rejected
    assert rows[0]["text"].startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    # everything but the blank lines between paragraphs is kept
    assert 1_080_000 < sum(len(r["text"]) for r in rows) <= 1_115_394


# ----------------------------------------------------------------------------- the validate stage on them


@pytest.mark.parametrize("rel,kind,fmt,read,reasons", [
    ("sft/lima_1029.json.gz", "sft", "alpaca", 1029, {}),
    ("sft/code_alpaca_2k.json.gz", "sft", "alpaca", 2017, {"empty_field": 2}),  # two rows with an empty output
    ("preference/hh-rlhf_harmless-base_test.jsonl.gz", "preference", "hh", 2312,
     {"bad_role_order": 4, "bad_structure": 5, "empty_field": 4}),
    ("pretrain/tinyshakespeare.txt.gz", "text", "text", 620, {}),
])
def test_validate_stage_on_real_data(rel, kind, fmt, read, reasons):
    """Every row is accounted for (kept + quarantined = read) with the reasons these files really have."""
    from tasks import validate

    path = SHARED / rel
    need(path)
    vp = ValidateParams(sources=(SourceSpec(path=str(path), kind=kind, format=fmt),), max_reject_share=0.05)
    kept, quarantine, metrics, _ = validate.validate_sources(vp)
    s = metrics["sources"][str(path)]
    assert s["read"] == read and s["kept"] + s["quarantined"] == read == len(kept[kind]) + len(quarantine)
    assert s["by_reason"] == reasons
    assert all(q["message"].startswith(f"{path}:{q['row']}: ") for q in quarantine)
    if "lima" in rel:  # real phone numbers and addresses in the answers are redacted and counted
        assert metrics["pii"]["total"]["phone"] >= 10 and metrics["pii"]["total"]["email"] >= 3
        assert not any("(999) 444-1212" in m["content"] for r in kept["sft"] for m in r["messages"])
