"""Plain-text replay for CPT: the replay stage's text samples (generated, cached, skipped when CPT
will not read them), the one mixing function shared with SFT, cpt.replay's config checks, and a
tiny CPT run that trains on the mix and records it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tasks import replay
from tempering import TemperingError
from tempering.config import CptReplay, DedupParams, ParamsError, from_dict, load_params
from tempering.mixing import mix_replay
from tempering.train.data import CACHE_ENV, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tempering.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _params(out: Path, *, cpt: dict | None = None, text: dict | None = None, **replay_cfg):
    """Replay on the tiny model with CPT reading this stage's text.jsonl at a 0.25 share."""
    cpt_cfg = {"enabled": True, "replay": {"share": 0.25, "source": str(out / "text.jsonl")}}
    cpt_cfg.update(cpt or {})
    return from_dict({"replay": {"prompts": str(ROOT / "tempering/replay_prompts.jsonl"), "n": 2,
                                 "max_new_tokens": 2, "batch_size": 4,
                                 "text": {"n": 6, "max_new_tokens": 12, "min_new_tokens": 4, "starts": ["The", "In"],
                                          **(text or {})}, **replay_cfg},
                      "cpt": cpt_cfg})


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- generation


def test_text_replay_is_generated_when_cpt_reads_it_then_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "r1"
    first = replay.run(_params(out), base=str(tiny), out=str(out), metrics=str(tmp_path / "m1.json"))
    text = first["text"]
    assert text["generated"] is True and text["rows"] == 6 and text["cache"] == "miss", text
    assert text["reason"] == f"cpt.enabled with cpt.replay.share 0.25 from {out / 'text.jsonl'}"
    rows = _lines(out / "text.jsonl")
    # The raw-text layout validate's text format reads: a `text` field per line, openings cycled.
    assert [r["opening"] for r in rows] == ["The", "In"] * 3
    assert all(r["text"].startswith(r["opening"]) and len(r["text"]) > len(r["opening"]) for r in rows), rows
    assert len({r["text"] for r in rows}) == 6  # sampled with temperature: six different texts
    metrics = json.loads((tmp_path / "m1.json").read_text())
    assert metrics["text"] == text and metrics["rows"] == 2
    assert json.loads((out / "meta.json").read_text())["params"]["cpt.replay"]["share"] == 0.25

    # Same base and knobs: nothing generated, the same bytes.
    second = replay.run(_params(tmp_path / "r2"), base=str(tiny), out=str(tmp_path / "r2"))
    assert second["text"]["cache"] == "hit" and second["cache"] == "hit"
    assert (tmp_path / "r2/text.jsonl").read_text() == (out / "text.jsonl").read_text()
    # Another sampling seed is another cache entry and other text; the SFT answers stay cached.
    third = replay.run(_params(tmp_path / "r3", text={"seed": 1}), base=str(tiny), out=str(tmp_path / "r3"))
    assert third["text"]["cache"] == "miss" and third["cache"] == "hit"
    assert (tmp_path / "r3/text.jsonl").read_text() != (out / "text.jsonl").read_text()


def test_samples_do_not_depend_on_what_ran_before(tiny):
    """Each batch draws from its own seed: the same knobs give the same text in any process state."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    tok = load_tokenizer(tiny)
    kw = dict(start_id=replay.start_token_id(tok, "<|endoftext|>"), starts=("The",), max_new_tokens=8,
              min_new_tokens=8, temperature=1.0, top_p=1.0, seed=3, batch_size=2)
    a = replay.sample_text(model, tok, 4, **kw)
    torch.manual_seed(12345)
    torch.rand(7)
    assert replay.sample_text(model, tok, 4, **kw) == a
    assert replay.sample_text(model, tok, 4, **{**kw, "seed": 4}) != a
    # min_new_tokens: every sample has that many new tokens (the end-of-text token suppressed).
    assert all(len(tok(r["text"][len("The"):], add_special_tokens=False)["input_ids"]) >= 4 for r in a)
    with pytest.raises(TemperingError, match=r"replay\.text\.start: '<\|nope\|>' is not a token"):
        replay.start_token_id(tok, "<|nope|>")


@pytest.mark.parametrize("case, reason", [
    ({"cpt": {"enabled": False}}, "cpt.enabled is false: no CPT to mix text replay into"),
    ({"cpt": {"replay": {"share": 0.0, "source": None}}}, "cpt.replay.share is 0"),
    ({"cpt": {"replay": {"share": 0.25, "source": "data/mine/general.txt"}}},
     "cpt.replay.source is data/mine/general.txt, not this stage's"),
])
def test_text_replay_is_skipped_when_cpt_will_not_read_it(tiny, tmp_path, monkeypatch, case, reason):
    """The default run (CPT off) must not pay for text generation: with the SFT answers cached,
    the model is not even loaded, text.jsonl is an empty (allow_empty) source, and the metrics say why."""
    import transformers

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    replay.run(_params(tmp_path / "warm", cpt={"enabled": False}), base=str(tiny), out=str(tmp_path / "warm"))

    def no_model(*a, **k):
        raise AssertionError("the replay stage loaded the model with nothing to generate")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    out = tmp_path / "r"
    summary = replay.run(_params(out, **case), base=str(tiny), out=str(out), metrics=str(tmp_path / "m.json"))
    assert summary["text"]["generated"] is False and summary["text"]["rows"] == 0
    assert summary["text"]["reason"].startswith(reason), summary["text"]
    assert json.loads((tmp_path / "m.json").read_text())["text"]["reason"] == summary["text"]["reason"]
    assert (out / "text.jsonl").stat().st_size == 0 and summary["rows"] == 2
    assert not list((tmp_path / "cache" / "replay").glob("text-*.json"))


def test_text_replay_rows_go_through_validate_and_decontamination(tmp_path):
    """text.jsonl is read by validate's text format (allow_empty when empty), and dedup drops a
    sample that repeats a benchmark item, like any other text row."""
    from tempering import dedup
    from tempering.config import SourceSpec
    from tempering.formats import Accepted, iter_source

    shipped = [s for s in load_params(ROOT / "params.yaml").validate_.sources if s.path == "data/replay/text.jsonl"]
    assert len(shipped) == 1 and shipped[0].kind == "text" and shipped[0].allow_empty
    path = tmp_path / "text.jsonl"
    path.write_text("")
    spec = SourceSpec(path=str(path), kind="text", format="text", allow_empty=True)
    assert list(iter_source(spec)) == []

    item = "Which of these is the best way to keep a rabbit warm during a very cold winter night outside"
    texts = ["The river bends twice before it reaches the old mill, and the water there is slow and brown.",
             f"In the quiz the question was: {item}? Nobody knew.",
             "A small garden needs water every morning in summer, and a little shade in the afternoon."]
    path.write_text("".join(json.dumps({"id": f"text-{i}", "opening": "x", "text": t}) + "\n"
                            for i, t in enumerate(texts)))
    results = list(iter_source(spec))
    assert all(isinstance(r, Accepted) for r in results)
    rows = [r.row for r in results]
    assert [r["source"] for r in rows] == [f"{path}:{i}" for i in (1, 2, 3)] and rows[0]["text"] == texts[0]
    bench = {"arc_easy": [{"id": "q1", "question": item, "choices": ["a blanket", "ice"], "answer": 0}]}
    kept, removed, metrics = dedup.dedup_rows({"text": rows}, DedupParams(), bench)
    assert [r["text"] for r in kept["text"]] == [texts[0], texts[2]]
    assert metrics["contaminated"] == 1 and (removed[0]["source"], removed[0]["row"]) == (str(path), 2)
    assert removed[0]["reason"] == "contaminated" and removed[0]["benchmark"] == "arc_easy"


# ----------------------------------------------------------------------------- the mix


def _text_rows(n_domain: int, n_replay: int) -> list[dict]:
    return ([{"id": f"d{i}", "source": f"data/generated/corpus.txt:{i + 1}", "text": "d" * 300}
             for i in range(n_domain)]
            + [{"id": f"r{i}", "source": f"data/replay/text.jsonl:{i + 1}", "text": "r" * 100}
               for i in range(n_replay)])


def test_cpt_mix_takes_the_share_of_the_text_rows():
    cfg = CptReplay(share=0.25, source="data/replay/text.jsonl")
    mixed, stats = mix_replay(_text_rows(12, 64), cfg)
    assert stats["wanted"] == 4 and stats["replay_rows"] == 4 and len(mixed) == 16
    assert stats["share"] == 0.25 and stats["available"] == 64
    assert stats["chars_share"] == pytest.approx(400 / (3600 + 400), abs=1e-4)  # shorter rows: fewer chars
    assert [r["id"] for r in mixed[:12]] == [f"d{i}" for i in range(12)]
    assert mix_replay(_text_rows(12, 64), cfg)[0] == mixed  # seeded
    assert {r["id"] for r in mix_replay(_text_rows(12, 64), cfg.model_copy(update={"seed": 1}))[0]} != \
        {r["id"] for r in mixed}
    # Fewer samples than the share needs: all of them, and a note.
    mixed, stats = mix_replay(_text_rows(300, 64), cfg)
    assert stats["replay_rows"] == 64 and stats["wanted"] == 100 and "all used" in stats["note"]
    # share 0: replay rows left out.
    mixed, stats = mix_replay(_text_rows(5, 3), CptReplay(share=0.0, source="data/replay/text.jsonl"))
    assert [r["id"] for r in mixed] == [f"d{i}" for i in range(5)] and stats["replay_rows"] == 0


def test_sft_and_cpt_share_one_mixing_function():
    import tasks.cpt
    import tasks.sft
    from tempering import mixing

    assert tasks.cpt.mix_replay is mixing.mix_replay and tasks.sft.mix_replay is mixing.mix_replay
    for stage in ("cpt", "sft"):
        assert "def mix_replay" not in (ROOT / "tasks" / f"{stage}.py").read_text()


@pytest.mark.parametrize("raw, message", [
    ({"cpt": {"replay": {"share": 1.0, "source": "x"}}}, r"^params: cpt\.replay\.share: Input should be less than 1"),
    ({"cpt": {"replay": {"share": -0.1, "source": "x"}}}, r"^params: cpt\.replay\.share: "),
    ({"cpt": {"replay": {"share": 0.2}}}, r"^params: cpt\.replay: Value error, replay\.share > 0 needs replay\.source"),
    ({"cpt": {"replay": {"shares": 0.2}}}, r"^params: cpt\.replay\.shares: unknown key"),
    ({"replay": {"text": {"starts": ["Once upon a time"]}}}, r"^params: replay\.text\.starts: .*at most 3 words"),
    ({"replay": {"text": {"starts": []}}}, r"^params: replay\.text\.starts: .*at least one opening"),
    ({"replay": {"text": {"temperature": 0}}}, r"^params: replay\.text\.temperature: Input should be greater than 0"),
    ({"replay": {"text": {"min_new_tokens": 64, "max_new_tokens": 32}}},
     r"^params: replay\.text: .*min_new_tokens \(64\) must not exceed max_new_tokens \(32\)"),
    ({"cpt": {"enabled": True, "replay": {"share": 0.2, "source": "data/replay/sft.jsonl"}},
      "validate": {"sources": [{"path": "data/replay/sft.jsonl", "kind": "sft", "format": "messages"}]}},
     r"cpt\.replay\.source: 'data/replay/sft\.jsonl' must be a text source listed in validate\.sources \(a sft source\)"),
    ({"cpt": {"enabled": True, "replay": {"share": 0.2, "source": "data/typo.jsonl"}},
      "validate": {"sources": [{"path": "data/replay/text.jsonl", "kind": "text", "format": "text"}]}},
     r"cpt\.replay\.source: 'data/typo\.jsonl' must be a text source .*\(not in validate\.sources\)"),
])
def test_bad_cpt_replay_config_is_rejected_naming_the_key(raw, message):
    with pytest.raises(ParamsError, match=message):
        from_dict(raw)


def test_shipped_cpt_replay_defaults_keep_the_default_run_unchanged():
    p = load_params(ROOT / "params.yaml")
    assert p.cpt.enabled is False  # CPT off: no text replay generated (test above), no CPT trained
    assert p.cpt.replay.source == "data/replay/text.jsonl" and p.cpt.replay.share > 0
    assert replay.text_needed(p, "data/replay") == (False, "cpt.enabled is false: no CPT to mix text replay into")
    on = load_params(ROOT / "params.yaml", ["cpt.enabled=true"])
    assert replay.text_needed(on, "data/replay")[0] is True
    # Disabled CPT never requires its replay source to exist (users replacing validate.sources).
    from_dict({"cpt": {"replay": {"share": 0.5, "source": "gone.jsonl"}},
               "validate": {"sources": [{"path": "a.txt", "kind": "text", "format": "text"}]}})


# ----------------------------------------------------------------------------- cpt trains on the mix


def test_cpt_trains_on_the_text_replay_mix_and_records_it(tiny, tmp_path, monkeypatch):
    from tasks.cpt import run

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "clean"
    data.mkdir()
    domain = [{"id": f"d{i}", "source": f"data/generated/corpus.txt:{i + 1}",
               "text": f"the town of {i} lives by the river and the colour of its music is red. " * 3}
              for i in range(6)]
    general = [{"id": f"r{i}", "source": f"data/replay/text.jsonl:{i + 1}",
                "text": f"hello world, a quick brown fox jumps over the lazy dog {i} times."} for i in range(10)]
    (data / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in domain + general))
    summaries, metas = {}, {}
    for share in (0.25, 0.0):
        params = from_dict({"cpt": {"enabled": True, "max_steps": 2, "batch_size": 2, "block_size": 32,
                                    "save_steps": 10, "replay": {"share": share, "source": "data/replay/text.jsonl"}},
                            "tracking": {"wandb": "disabled", "dvclive": False}})
        root = tmp_path / f"c{share}"
        run(params, base=str(tiny), data=str(data), out=str(root / "cpt"), checkpoints=str(root / "ck"),
            metrics=str(root / "cpt.json"))
        summaries[share] = json.loads((root / "cpt.json").read_text())
        metas[share] = json.loads((root / "cpt" / "meta.json").read_text())
    mixed = summaries[0.25]
    assert mixed["data"]["replay"]["replay_rows"] == 2 and mixed["data"]["rows"] == 8, mixed["data"]  # 6 + 2
    assert mixed["data"]["replay"]["share"] == 0.25 and mixed["data"]["replay"]["available"] == 10
    assert 0 < mixed["data"]["replay"]["chars_share"] < 0.25  # replay rows are the shorter ones
    assert metas[0.25]["train"]["data"]["replay"] == mixed["data"]["replay"]
    assert mixed["weights_changed"] is True and mixed["steps"] == 2 and math.isfinite(mixed["train_loss_last"])
    none = summaries[0.0]["data"]
    assert none["replay"]["replay_rows"] == 0 and none["rows"] == 6, none
    # The mix is part of what was trained on: another share is other data (no resume across it).
    assert metas[0.25]["inputs"]["data"] != metas[0.0]["inputs"]["data"]


def test_cpt_with_only_replay_rows_stops_with_one_line(tiny, tmp_path):
    from tasks.cpt import run

    data = tmp_path / "clean"
    data.mkdir()
    (data / "text.jsonl").write_text(json.dumps({"id": "r", "source": "data/replay/text.jsonl:1",
                                                 "text": "hello world " * 10}) + "\n")
    params = from_dict({"cpt": {"enabled": True, "replay": {"share": 0.25, "source": "data/replay/text.jsonl"}},
                        "tracking": {"wandb": "disabled", "dvclive": False}})
    with pytest.raises(TemperingError, match=r"text\.jsonl: cpt\.enabled is true but there are no text rows to "
                                             r"train on \(only replay rows of data/replay/text\.jsonl"):
        run(params, base=str(tiny), data=str(data), out=str(tmp_path / "cpt"), checkpoints=str(tmp_path / "ck"),
            metrics=str(tmp_path / "cpt.json"))
    assert not (tmp_path / "cpt").exists()
