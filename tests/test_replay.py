"""tasks.replay (the base model's answers to the general prompt bank) and SFT's replay mix.

The text replay for CPT and CPT's mix: tests/test_replay_text.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import replay
from tempering import TemperingError, dedup
from tempering.config import DedupParams, SftReplay, from_dict, load_params
from tempering.mixing import mix_replay
from tempering.train.data import CACHE_ENV, load_tokenizer
from tempering.train.precision import choose_precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tempering.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _params(tmp_path: Path, **replay_cfg):
    return from_dict({"replay": {"prompts": str(ROOT / "tempering/replay_prompts.jsonl"), "n": 5,
                                 "max_new_tokens": 4, "batch_size": 2, **replay_cfg}})


def test_shipped_prompt_bank_is_clean_and_disjoint_from_every_benchmark():
    from tempering.benchmarks import decontamination_sets

    params = load_params(ROOT / "params.yaml")
    bank = replay.load_prompts(params.replay.model_copy(update={"prompts": str(ROOT / params.replay.prompts)}))
    assert len(bank) == 155 and len({r["prompt"] for r in bank}) == 155
    ev = params.evaluate
    shipped = tuple(b.model_copy(update={"path": str(ROOT / b.path), "labels": str(ROOT / b.labels) if b.labels else None})
                    for b in ev.benchmarks if b.path.startswith("benchmarks/"))
    ev = ev.model_copy(update={"benchmarks": shipped, "drift": ev.drift.model_copy(update={"path": str(ROOT / ev.drift.path)})})
    sets, _ = decontamination_sets(ev)
    rows = [{"id": r["id"], "source": f"bank:{i + 1}", "text": r["prompt"]} for i, r in enumerate(bank)]
    kept, removed, metrics = dedup.dedup_rows({"text": rows}, DedupParams(), sets)
    assert removed == [], removed[:3]  # no benchmark overlap, no duplicates within the bank
    assert metrics["contaminated"] == 0 and len(kept["text"]) == 155


def test_replay_generates_the_bases_answers_once_then_hits_its_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    params = _params(tmp_path)
    first = replay.run(params, base=str(tiny), out=str(tmp_path / "r1"))
    assert first["enabled"] and first["rows"] == 5 and first["cache"] == "miss"
    rows = [json.loads(x) for x in (tmp_path / "r1/sft.jsonl").read_text().splitlines()]
    bank = [json.loads(x) for x in (ROOT / "tempering/replay_prompts.jsonl").read_text().splitlines()][:5]
    assert [r["messages"][0]["content"] for r in rows] == [b["prompt"] for b in bank]
    assert all(r["messages"][1]["role"] == "assistant" for r in rows)
    # The answers are the model's own greedy continuation (one prompt alone, no batching).
    answers = replay.generate(*_load(tiny), [bank[0]["prompt"]], max_new_tokens=4, batch_size=1,
                              amp_dtype=choose_precision("auto").autocast_dtype)
    assert rows[0]["messages"][1]["content"] == answers[0]
    second = replay.run(params, base=str(tiny), out=str(tmp_path / "r2"), metrics=str(tmp_path / "m2.json"))
    assert second["cache"] == "hit"
    # A hit writes the same folder, byte for byte, meta.json included (DVC sees an unchanged output,
    # so training does not re-run); the run's own facts (the hit, git SHA, times) are in --metrics.
    for name in ("sft.jsonl", "meta.json"):
        assert (tmp_path / "r2" / name).read_bytes() == (tmp_path / "r1" / name).read_bytes(), name
    m2 = json.loads((tmp_path / "m2.json").read_text())
    assert m2["cache"] == "hit" and set(m2["provenance"]) == {"git_sha", "argv", "wall_time_s", "finished_at"}
    assert "cache" not in json.loads((tmp_path / "r2/meta.json").read_text())
    # Other generation knobs are another cache entry.
    assert replay.run(_params(tmp_path, max_new_tokens=3), base=str(tiny), out=str(tmp_path / "r3"))["cache"] == "miss"


def test_sampled_answers_are_seeded_and_cached_by_their_knobs(tiny, tmp_path, monkeypatch):
    """temperature > 0 samples from the base (top_k off): the same seed gives the same answers,
    another seed other answers, and temperature / top_p / seed are part of the cache key."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model, tok = _load(tiny)
    prompts = [r["prompt"] for r in replay.load_prompts(_params(tmp_path).replay)]

    def draw(seed, **kw):
        return replay.generate(model, tok, prompts, max_new_tokens=8, batch_size=2, temperature=1.0,
                               seed=seed, **kw)

    greedy = replay.generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert draw(0) != greedy  # a random tiny model's samples are not its argmax
    cfg = {"temperature": 1.0, "max_new_tokens": 8}
    assert replay.run(_params(tmp_path, **cfg), base=str(tiny), out=str(tmp_path / "s1"))["cache"] == "miss"
    assert replay.run(_params(tmp_path, **cfg), base=str(tiny), out=str(tmp_path / "s2"))["cache"] == "hit"
    for change in ({"seed": 1}, {"top_p": 0.9}, {"temperature": 0.7}):
        assert replay.run(_params(tmp_path, **{**cfg, **change}), base=str(tiny),
                          out=str(tmp_path / "s3"))["cache"] == "miss", change
    with pytest.raises(Exception, match=r"replay\.top_p"):
        _params(tmp_path, top_p=0.0)


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), load_tokenizer(folder))


def test_replay_disabled_writes_an_empty_source(tmp_path):
    out = replay.run(_params(tmp_path, enabled=False), base=str(tmp_path / "no-model"), out=str(tmp_path / "r"),
                     metrics=str(tmp_path / "replay.json"))
    assert out == {"out": str(tmp_path / "r"), "enabled": False, "rows": 0,
                   "text": {"generated": False, "reason": "replay.enabled is false", "rows": 0}}
    assert (tmp_path / "r/sft.jsonl").read_text() == "" and (tmp_path / "r/text.jsonl").read_text() == ""
    assert json.loads((tmp_path / "replay.json").read_text())["text"]["reason"] == "replay.enabled is false"


def test_bad_prompt_bank_names_file_row_and_field(tiny, tmp_path):
    bank = tmp_path / "bank.jsonl"
    bank.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n" + json.dumps({"id": "b", "prompt": ""}) + "\n")
    with pytest.raises(TemperingError, match=r"bank\.jsonl: row 2: prompt: expected a non-empty string"):
        replay.run(_params(tmp_path, prompts=str(bank)), base=str(tiny), out=str(tmp_path / "r"))
    bank.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n" + json.dumps({"id": "a", "prompt": "yo"}) + "\n")
    with pytest.raises(TemperingError, match=r"row 2: id: expected a unique"):
        replay.run(_params(tmp_path, prompts=str(bank)), base=str(tiny), out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def _rows(n_domain: int, n_replay: int) -> list[dict]:
    return ([{"id": f"d{i}", "source": f"data/generated/sft.jsonl:{i + 1}"} for i in range(n_domain)]
            + [{"id": f"r{i}", "source": f"data/replay/sft.jsonl:{i + 1}"} for i in range(n_replay)])


def test_mix_replay_takes_the_share_of_the_result():
    cfg = SftReplay(share=0.35, source="data/replay/sft.jsonl")
    mixed, stats = mix_replay(_rows(130, 155), cfg)
    assert stats["wanted"] == 70 and stats["replay_rows"] == 70 and len(mixed) == 200
    assert stats["share"] == pytest.approx(0.35) and [r["id"] for r in mixed[:130]] == [f"d{i}" for i in range(130)]
    assert mix_replay(_rows(130, 155), cfg)[0] == mixed  # seeded: the same rows every run
    other = mix_replay(_rows(130, 155), cfg.model_copy(update={"seed": 1}))[0]
    assert {r["id"] for r in other} != {r["id"] for r in mixed}
    # Fewer replay rows than the share needs: all of them, and a note saying so.
    mixed, stats = mix_replay(_rows(400, 155), cfg)
    assert stats["replay_rows"] == 155 and "all used" in stats["note"] and stats["share"] < 0.35
    # share 0: the replay rows are left out entirely.
    mixed, stats = mix_replay(_rows(10, 5), SftReplay(share=0.0, source="data/replay/sft.jsonl"))
    assert [r["id"] for r in mixed] == [f"d{i}" for i in range(10)] and stats["replay_rows"] == 0
    # No source: every row as it is.
    assert mix_replay(_rows(3, 2), SftReplay())[0] == _rows(3, 2)
    with pytest.raises(ValueError, match="needs replay.source"):
        SftReplay(share=0.2)


def test_an_empty_replay_source_is_allowed_only_where_declared(tmp_path):
    from tempering.config import SourceSpec
    from tempering.formats import iter_source

    empty = tmp_path / "sft.jsonl"
    empty.write_text("")
    assert list(iter_source(SourceSpec(path=str(empty), kind="sft", format="messages", allow_empty=True))) == []
    with pytest.raises(TemperingError, match="file is empty"):
        list(iter_source(SourceSpec(path=str(empty), kind="sft", format="messages")))
    shipped = [s for s in load_params(ROOT / "params.yaml").validate_.sources if s.path == "data/replay/sft.jsonl"]
    assert len(shipped) == 1 and shipped[0].allow_empty  # replay.enabled: false must not break validate


def test_sft_trains_on_the_replay_mix_and_records_it(tiny, tmp_path, monkeypatch):
    from tasks.sft import run

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "clean"
    data.mkdir()
    rows = [{"id": f"d{i}", "source": f"data/generated/sft.jsonl:{i + 1}", "messages": [
        {"role": "user", "content": f"what is the colour of {i}?"}, {"role": "assistant", "content": "red"}]}
        for i in range(6)]
    rows += [{"id": f"r{i}", "source": f"data/replay/sft.jsonl:{i + 1}", "messages": [
        {"role": "user", "content": f"say something {i}"}, {"role": "assistant", "content": "hello there"}]}
        for i in range(10)]
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summaries = {}
    for share in (0.25, 0.0):
        params = from_dict({"sft": {"max_steps": 2, "batch_size": 4, "save_steps": 10, "max_length": 64,
                                    "replay": {"share": share, "source": "data/replay/sft.jsonl"}},
                            "tracking": {"wandb": "disabled", "dvclive": False}})
        root = tmp_path / f"s{share}"
        run(params, base=str(tiny), data=str(data), out=str(root / "sft"), checkpoints=str(root / "ck"),
            metrics=str(root / "sft.json"))
        summaries[share] = json.loads((root / "sft.json").read_text())
    mixed = summaries[0.25]["data"]
    assert mixed["replay"]["replay_rows"] == 2 and mixed["examples"] == 8, mixed  # 6 domain + 2 replay
    none = summaries[0.0]["data"]
    assert none["replay"]["replay_rows"] == 0 and none["examples"] == 6, none
    # A different mix is different data: tokenized afresh, not served from the cache.
    assert none["cache"] == "miss" and mixed["cache"] == "miss"
    assert summaries[0.25]["weights_changed"] is True
