"""evaluate scores the exported candidate on the dpo stage's held-out preference pairs (tiny models,
real sft/dpo stages): the same tokenization, truncation and precision as the SFT margins, per-pair
rows paired by pair id in eval/samples/alignment.jsonl, a summary in the metrics, and the gate's
alignment check on top. A candidate DPO never trained is not applicable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.evaluate import (ALIGNMENT_FILE, alignment_records, alignment_source, alignment_summary, cached_alignment,
                            run)
from tasks.gate import decide, load_samples
from tempering import TemperingError, preference
from tempering.config import from_dict
from tempering.io import hash_path
from tempering.train.data import CACHE_ENV, load_tokenizer
from tempering.train.models import load_merged

from test_evaluate import DOMAIN, GENERAL, write_bench
from test_training import make_params, run_sft, write_rows


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models on one thread (see conftest.one_thread)."""


def _save(model, tok_dir: Path, out: Path) -> Path:
    model.save_pretrained(out)
    load_tokenizer(tok_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """base -> sft -> dpo (3 of 12 pairs held out, fp32), and two candidates merged the way export
    merges: the DPO policy (base + SFT + DPO) and the SFT model alone."""
    from tasks.dpo import run as run_dpo
    from tempering.testing import make_tiny_model

    root = tmp_path_factory.mktemp("align")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "cache"))
        mp.setenv("WANDB_MODE", "disabled")
        tiny = make_tiny_model(root / "tiny")
        data = write_rows(root / "clean")
        run_sft(make_params(), tiny, data, root)
        run_dpo(make_params(dpo={"heldout_share": 0.25, "precision": "fp32"}), base=str(tiny), sft=str(root / "sft"),
                data=str(data), out=str(root / "dpo"), checkpoints=str(root / "ck_dpo"),
                metrics=str(root / "dpo.json"))
    dpo_candidate = _save(load_merged(tiny, [root / "sft", root / "dpo"]), root / "dpo", root / "cand_dpo")
    sft_candidate = _save(load_merged(tiny, [root / "sft"]), root / "dpo", root / "cand_sft")
    return {"root": root, "tiny": tiny, "data": data, "dpo": root / "dpo", "cand_dpo": dpo_candidate,
            "cand_sft": sft_candidate}


def eval_params(root: Path, **gate):
    return from_dict({
        "evaluate": {"benchmarks": [
            {"name": "domain", "path": str(write_bench(root / "domain.jsonl", DOMAIN[:6])), "role": "domain"},
            {"name": "general", "path": str(write_bench(root / "general.jsonl", GENERAL[:6])), "role": "general"}],
            "batch_size": 32, "cache_dir": str(root / "eval_cache"), "generation": {"n": 0}, "drift": {"path": None}},
        "gate": {"max_kl": None, "max_perplexity_ratio": None, **gate}})


def _score(trained, candidate: Path, cfg) -> tuple[dict, list[dict], str]:
    source = alignment_source(str(trained["dpo"]))
    scores, hit = cached_alignment(candidate, hash_path(candidate), source, cfg)
    return source, alignment_records(preference.read_heldout(source["path"]), scores), hit


def test_evaluate_scores_the_exported_candidate_on_the_heldout_pairs(trained, tmp_path):
    p = eval_params(tmp_path, alignment_margin=0.05)
    out = tmp_path / "out"
    run(p, model=str(trained["cand_dpo"]), base=str(trained["tiny"]), samples=str(out / "samples"),
        metrics=str(out / "evaluate.json"), dpo=str(trained["dpo"]))
    record = json.loads((out / "evaluate.json").read_text())
    a = record["alignment"]
    held = preference.read_heldout(trained["dpo"] / "heldout.jsonl")
    assert a["applicable"] is True and a["pairs"] == len(held) == 3 and a["problem"] is None
    assert a["file"] == ALIGNMENT_FILE and a["cache"] == "miss" and a["scoring"]["precision"] == "fp32"
    assert set(a["accuracy"]) == {"candidate", "sft", "dpo", "base"}
    rows = [json.loads(x) for x in (out / "samples" / ALIGNMENT_FILE).read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in held]
    for r, h in zip(rows, held):  # paired by pair id with the dpo stage's SFT margin
        assert r["sft_margin"] == pytest.approx(preference.margin(h["logp"]["sft"]))
        assert r["tokens_match"] is True
        # The candidate is the DPO policy merged: it scores what the DPO policy scored.
        assert r["candidate_margin"] == pytest.approx(r["dpo_margin"], abs=1e-3)
    assert a["max_abs_margin_vs_dpo"] < 1e-3
    assert any(abs(r["candidate_margin"] - r["sft_margin"]) > 1e-4 for r in rows)  # and not the SFT model's
    # The gate judges it: 3 pairs cannot certify a 0.05 margin, so refused as underpowered.
    v = decide(record, load_samples(out / "samples"), p.gate)
    c = next(c for c in v.checks if c.kind == "alignment")
    assert c.n == 3 and c.powered is False and not c.passed
    assert c.reason.startswith("heldout_pairs: 3 held-out pairs can certify drops of")
    # Re-running evaluate scores nothing again.
    run(p, model=str(trained["cand_dpo"]), base=str(trained["tiny"]), samples=str(out / "samples"),
        metrics=str(out / "evaluate.json"), dpo=str(trained["dpo"]))
    assert json.loads((out / "evaluate.json").read_text())["alignment"]["cache"] == "hit"


def test_the_sft_model_as_candidate_reproduces_the_sft_margins(trained, tmp_path):
    """A/A: scored through evaluate's path, the SFT model gives the SFT margins the dpo stage
    recorded, so the paired difference is the candidate's own."""
    cfg = eval_params(tmp_path).evaluate
    _, rows, hit = _score(trained, trained["cand_sft"], cfg)
    assert hit == "miss"
    assert max(abs(r["candidate_margin"] - r["sft_margin"]) for r in rows) < 1e-3
    assert all(r["tokens_match"] for r in rows)


def test_a_candidate_tokenized_differently_is_refused(trained, tmp_path):
    """Another chat template scores other tokens: the margins do not pair, and the gate refuses."""
    cand = Path(shutil.copytree(trained["cand_sft"], tmp_path / "cand"))
    tok = load_tokenizer(cand)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    tok.save_pretrained(cand)
    p = eval_params(tmp_path, alignment_margin=0.9)
    source, rows, _ = _score(trained, cand, p.evaluate)
    assert not any(r["tokens_match"] for r in rows)
    summary = alignment_summary(source, rows, "miss")
    assert "tokenize differently" in summary["problem"]
    v = decide({"alignment": summary}, {"alignment": rows}, p.gate)
    c = next(c for c in v.checks if c.kind == "alignment")
    assert not c.passed and "tokenize differently" in c.reason


def test_no_dpo_training_is_not_applicable(trained, tmp_path):
    from tasks.dpo import run as run_dpo

    out = tmp_path / "dpo"
    run_dpo(make_params(dpo={"enabled": False}), base=str(trained["tiny"]), sft=str(trained["root"] / "sft"),
            data=str(trained["data"]), out=str(out), checkpoints=str(tmp_path / "ck"),
            metrics=str(tmp_path / "dpo.json"))
    source = alignment_source(str(out))
    assert source == {"applicable": False, "reason": "dpo.enabled is false: the SFT model passed through untrained"}
    summary = alignment_summary(source, None)
    assert summary == {"applicable": False, "reason": source["reason"]}
    v = decide({"alignment": summary}, {}, eval_params(tmp_path, alignment_margin=0.05).gate)
    assert not [c for c in v.checks if c.kind == "alignment"]
    assert any("not applicable: dpo.enabled is false" in n for n in v.not_checked)


def test_trained_without_heldout_pairs_or_without_dpo_is_a_problem(trained, tmp_path):
    dpo = Path(shutil.copytree(trained["dpo"], tmp_path / "dpo"))
    meta = json.loads((dpo / "meta.json").read_text())
    meta["heldout"] = {"file": None, "pairs": 0, "reason": "dpo.heldout_share is 0.0: no preference pairs were held out"}
    (dpo / "meta.json").write_text(json.dumps(meta))
    source = alignment_source(str(dpo))
    assert source == {"applicable": True, "problem": "dpo.heldout_share is 0.0: no preference pairs were held out"}
    assert alignment_summary(source, None)["problem"] == source["problem"]
    assert "without --dpo" in alignment_source(None)["problem"]


def test_a_broken_heldout_file_names_file_line_and_field(trained, tmp_path):
    dpo = Path(shutil.copytree(trained["dpo"], tmp_path / "dpo"))
    lines = (dpo / "heldout.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["logp"]["sft"]["rejected"] = float("nan")
    lines[1] = json.dumps(row)
    (dpo / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TemperingError, match=r"heldout.jsonl: line 2: field logp.sft.rejected: not a finite"):
        preference.read_heldout(dpo / "heldout.jsonl")
    (dpo / "heldout.jsonl").unlink()
    with pytest.raises(TemperingError, match=r"heldout.jsonl: held-out pairs named by .*meta.json not found"):
        alignment_source(str(dpo))


def test_batched_pair_scores_equal_one_sequence_at_a_time(trained):
    """completion_logps batches right-padded sequences and runs the log-softmax at answer positions
    only; in fp32 every pair's two sums equal a plain one-sequence forward over the whole row."""
    import torch

    from tempering.train.precision import choose_precision

    rows = preference.read_heldout(trained["dpo"] / preference.HELDOUT_FILE)
    rows += [{"prompt": [{"role": "user", "content": "Who is here?"}], "chosen": "Nobody at all, I think.",
              "rejected": "Me."}]
    tok = load_tokenizer(trained["cand_dpo"])
    model = load_merged(trained["tiny"], [trained["root"] / "sft", trained["dpo"]])
    fp32 = choose_precision("fp32")
    batched = preference.completion_logps(model, tok, rows, max_length=64, max_prompt_length=48,
                                          precision=fp32, batch_size=3)
    expected = []
    for row in rows:
        enc = preference.encode_pair(tok, row, 64, 48)
        pair = []
        for side in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([enc["prompt_ids"] + enc[side]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            pair.append(float(logp.gather(-1, ids[0, 1:, None])[len(enc["prompt_ids"]) - 1:].sum()))
        expected.append(tuple(pair))
    assert len(batched) == len(rows)
    for got, want in zip(batched, expected):
        assert got == pytest.approx(want, abs=1e-3)
    # The two sides of a pair differ, and the short pair was batched beside longer ones.
    assert any(abs(c - r) > 1e-3 for c, r in batched)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """An untrained tiny model (float32) and its tokenizer: enough to check how pairs are scored."""
    import torch
    from transformers import AutoModelForCausalLM

    from tempering.testing import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("pairs") / "tiny")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), load_tokenizer(folder)


PAIRS = [  # one prompt twice, answers with a common prefix, a one-token-apart pair, distinct answers
    {"prompt": [{"role": "user", "content": "Is the sky blue?"}], "chosen": "The answer is yes, most days.",
     "rejected": "The answer is no."},
    {"prompt": [{"role": "user", "content": "Is the sky blue?"}], "chosen": "Yes.", "rejected": "Green, always."},
    {"prompt": [{"role": "user", "content": "Name a fox."}], "chosen": "A red fox", "rejected": "A red dog"},
    {"prompt": [{"role": "user", "content": "Count to three."}], "chosen": "one two three",
     "rejected": "I would rather not count anything today."},
]


def _logps(model, tok, rows, precision="fp32", **kw):
    from tempering.scoring import Stats
    from tempering.train.precision import Precision

    stats = Stats()
    got = preference.completion_logps(model, tok, rows, max_length=kw.pop("max_length", 64), max_prompt_length=48,
                                      precision=Precision(precision, "cpu", "test"), stats=stats, **kw)
    return got, stats


def test_pairs_share_the_prompt_and_score_as_the_plain_path(tiny_lm, monkeypatch):
    """Each pair is one packed row (the prompt once, the LM head at answer positions only), and
    its scores equal the plain path's (two full sequences per pair), which models without the
    decoder + head layout still take."""
    from tempering.train import models

    model, tok = tiny_lm
    shared, stats = _logps(model, tok, PAIRS, batch_size=2)
    encs = [preference.encode_pair(tok, row, 64, 48) for row in PAIRS]
    unshared = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in encs)
    answers = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in encs)
    assert stats.forwards >= 1 and stats.requests == 0  # the packed path ran (requests: lm-eval's count only)
    assert stats.tokens <= unshared - sum(len(e["prompt_ids"]) for e in encs)  # every prompt ran once at most
    assert stats.head_positions < answers  # the head only where an answer token is predicted, shared ones once
    monkeypatch.setattr(models, "causal_lm_parts", lambda model: None)
    plain, plain_stats = _logps(model, tok, PAIRS, batch_size=2)
    assert plain_stats.forwards == 0  # the fallback: nothing through the packed path
    for got, want in zip(shared, plain):
        assert got == pytest.approx(want, abs=1e-4)
    assert len({round(c - r, 3) for c, r in shared}) == len(PAIRS)  # four different margins, not one


def test_answers_with_a_common_prefix_share_their_tokens(tiny_lm):
    """Chosen and rejected that begin alike are one branch of the row's prefix tree until they
    differ; each still scores as a plain forward over prompt + answer alone."""
    import torch

    model, tok = tiny_lm
    row = PAIRS[2]
    enc = preference.encode_pair(tok, row, 64, 48)
    chosen, rejected = enc["chosen_ids"], enc["rejected_ids"]
    common = next(k for k, (a, b) in enumerate(zip(chosen + [-1], rejected + [-2])) if a != b)
    assert common >= 2 and chosen != rejected
    (got,), stats = _logps(model, tok, [row])
    # the row: the prompt, then the tree of both answers' inputs (each answer but its last token)
    assert stats.tokens == len(enc["prompt_ids"]) + len(chosen) - 1 + len(rejected) - 1 - min(
        common, len(chosen) - 1, len(rejected) - 1)
    want = []
    for answer in (chosen, rejected):
        ids = torch.tensor([enc["prompt_ids"] + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want.append(float(logp.gather(-1, ids[0, 1:, None])[len(enc["prompt_ids"]) - 1:].sum()))
    assert got == pytest.approx(tuple(want), abs=1e-4)


def test_bf16_and_fully_truncated_answers(tiny_lm, monkeypatch):
    """Under bf16 autocast the packed path runs in bf16 (not float32) and stays near float32, as
    close as the plain path's bf16; a pair whose answers are cut away scores 0.0 on both paths."""
    from tempering.train import models

    model, tok = tiny_lm
    exact, _ = _logps(model, tok, PAIRS)
    bf16, stats = _logps(model, tok, PAIRS, precision="bf16")
    assert stats.forwards >= 1
    err = max(abs(g - w) for pair, ref in zip(bf16, exact) for g, w in zip(pair, ref))
    assert 0 < err < 0.1
    cut, cut_stats = _logps(model, tok, PAIRS[:1], max_length=8)  # the prompt alone passes 8 tokens
    assert cut == [(0.0, 0.0)] and cut_stats.forwards == 0
    monkeypatch.setattr(models, "causal_lm_parts", lambda model: None)
    plain_bf16, _ = _logps(model, tok, PAIRS, precision="bf16")
    plain_err = max(abs(g - w) for pair, ref in zip(plain_bf16, exact) for g, w in zip(pair, ref))
    assert 0 < plain_err < 0.1
    assert _logps(model, tok, PAIRS[:1], max_length=8)[0] == [(0.0, 0.0)]
