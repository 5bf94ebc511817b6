"""tasks.validate: great-expectations checks, quarantine bookkeeping, report, reject-share failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import make_data, validate
from tempering import TemperingError
from tempering.config import Params, SourceSpec, ValidateParams

GENERATED_SOURCES = [
    ("sft_alpaca.json", "sft", "alpaca"),
    ("sft_messages.jsonl", "sft", "messages"),
    ("preference.jsonl", "preference", "pairs"),
    ("corpus.txt", "text", "text"),
]


def params_for(sources, **kw) -> Params:
    specs = tuple(SourceSpec(path=str(p), kind=k, format=f) for p, k, f in sources)
    return Params(validate_=ValidateParams(sources=specs, **kw))


def run_stage(tmp: Path, params: Params) -> dict:
    return validate.run(params, out=str(tmp / "validated"), quarantine=str(tmp / "q.jsonl"),
                        report=str(tmp / "report.md"), metrics=str(tmp / "metrics.json"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v") / "generated"
    make_data.run(Params(), out=str(out))
    return out


@pytest.fixture(scope="module")
def validated(generated, tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("vout")
    summary = run_stage(tmp, params_for([(generated / f, k, fmt) for f, k, fmt in GENERATED_SOURCES]))
    return tmp, summary


def test_generated_data_invariants_and_planted_defects(generated, validated):
    tmp, summary = validated
    manifest = json.loads((generated / "manifest.json").read_text())
    metrics = json.loads((tmp / "metrics.json").read_text())
    quarantine = read_jsonl(tmp / "q.jsonl")
    kept = {k: read_jsonl(tmp / "validated" / f"{k}.jsonl") for k in validate.KINDS}

    # kept + quarantined = read, per source and in total
    for path, s in metrics["sources"].items():
        assert s["kept"] + s["quarantined"] == s["read"] > 0
        assert s["quarantined"] == sum(1 for q in quarantine if q["source"] == path)
        assert s["kept"] == sum(1 for rows in kept.values() for r in rows if r["source"].rsplit(":", 1)[0] == path)
    assert metrics["kept"] + metrics["quarantined"] == metrics["read"] == summary["read"]

    # exactly the planted validate-level defects are quarantined, with the planted reason
    planted = {(str(generated / d["file"]), d["row"]): d["defect"] for d in manifest["dirty"]
               if d["caught_by"] == "validate"}
    got = {(q["source"], q["row"]): q["reason"] for q in quarantine}
    assert got == planted
    for q in quarantine:
        assert q["stage"] == "validate" and q["message"].startswith(f"{q['source']}:{q['row']}: ")
        assert q["reasons"][0] == q["reason"] and "original" in q
    # output folder: exactly the three kinds + meta.json
    assert sorted(p.name for p in (tmp / "validated").iterdir()) == ["meta.json", "preference.jsonl", "sft.jsonl",
                                                                    "text.jsonl"]
    assert all(kept.values())
    report = (tmp / "report.md").read_text()
    assert "| `" + str(generated / "sft_alpaca.json") + "` | sft | alpaca |" in report
    assert "wrong_type" in report and "FAILED" not in report


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


SFT_CASES = [
    (msgs(("user", "q"), ("assistant", "a")), None),
    (msgs(("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")), None),
    (msgs(("user", "q"), ("bot", "a")), "unknown_role"),
    (msgs(("user", "q"), ("user", "q again"), ("assistant", "a")), "bad_role_order"),
    (msgs(("user", "q"), ("assistant", "a"), ("system", "s")), "bad_role_order"),
    (msgs(("assistant", "a"), ("user", "q")), "bad_role_order"),
    (msgs(("user", "q")), "bad_role_order"),
    (msgs(("user", "q"), ("assistant", "   ")), "empty_field"),
    (msgs(("user", "bell\x07"), ("assistant", "a")), "control_chars"),
    (msgs(("user", "q"), ("assistant", "bad \ufffd decode")), "control_chars"),
    (msgs(("user", "tab\tand\nnewline ok"), ("assistant", "a")), None),
    (msgs(("user", "q"), ("assistant", "x" * 101)), "too_long"),
]


def test_sft_checks(tmp_path):
    path = write(tmp_path / "sft.jsonl", [row for row, _ in SFT_CASES])
    kept, quarantine, metrics, _ = validate.validate_sources(
        params_for([(path, "sft", "messages")], max_chars=100).validate_)
    got = {q["row"]: q for q in quarantine}
    for i, (_, reason) in enumerate(SFT_CASES, 1):
        assert got.get(i, {}).get("reason") == reason, (i, got.get(i))
    assert len(kept["sft"]) == sum(1 for _, r in SFT_CASES if r is None)
    assert "two consecutive user turns" in got[4]["message"]
    assert "system turn after the first" in got[5]["message"]
    assert "messages[1].role 'bot'" in got[3]["message"]
    assert "messages[1].content (assistant) is empty" in got[8]["message"]
    assert "U+0007" in got[9]["message"]
    assert metrics["sources"][str(path)]["by_reason"]["bad_role_order"] == 4


def test_row_failing_several_checks_gets_all_reasons(tmp_path):
    path = write(tmp_path / "sft.jsonl", [msgs(("user", "q\x01"), ("user", ""))])
    _, quarantine, _, _ = validate.validate_sources(params_for([(path, "sft", "messages")]).validate_)
    assert quarantine[0]["reason"] == "bad_role_order"
    assert quarantine[0]["reasons"] == ["bad_role_order", "empty_field", "control_chars", "too_short"]


def test_preference_and_text_checks(tmp_path):
    prefs = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "same", "rejected": " same "},
        {"prompt": "q", "chosen": "", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "chosen": "good", "rejected": "bad"},
    ]
    ppath = write(tmp_path / "p.jsonl", prefs)
    tpath = tmp_path / "t.txt"
    tpath.write_text("short\n\n" + "x" * 30 + "\n\n\n" + "long enough paragraph " * 5, encoding="utf-8")
    kept, quarantine, _, _ = validate.validate_sources(
        params_for([(ppath, "preference", "pairs"), (tpath, "text", "text")], min_text_chars=50,
                   text_chunk_chars=100).validate_)
    reasons = {(Path(q["source"]).name, q["row"]): q["reason"] for q in quarantine}
    assert reasons == {("p.jsonl", 2): "chosen_equals_rejected", ("p.jsonl", 3): "empty_field",
                       ("p.jsonl", 4): "bad_role_order", ("t.txt", 1): "too_short"}
    assert len(kept["preference"]) == 1 and len(kept["text"]) == 1


def test_allowed_roles_param(tmp_path):
    path = write(tmp_path / "sft.jsonl", [msgs(("user", "q"), ("assistant", "a"), ("tool", "t"))])
    _, q, _, _ = validate.validate_sources(params_for([(path, "sft", "messages")]).validate_)
    assert q[0]["reason"] == "unknown_role"
    kept, q, _, _ = validate.validate_sources(
        params_for([(path, "sft", "messages")], allowed_roles=("system", "user", "assistant", "tool")).validate_)
    assert not q and len(kept["sft"]) == 1


def test_reject_share_failure_keeps_the_evidence(tmp_path):
    rows = [{"instruction": "q", "output": "a"}] * 3 + [{"instruction": "q", "output": 1}] * 2
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(TemperingError) as exc:
        run_stage(tmp_path, params_for([(path, "sft", "alpaca")], max_reject_share=0.25))
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "2 of 5 rows rejected" in msg and "wrong_type" in msg
    assert len(read_jsonl(tmp_path / "q.jsonl")) == 2
    assert "FAILED" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["failed_sources"] == [str(path)]
    assert not (tmp_path / "validated").exists()  # nothing for later stages to train on
    # the same data passes with a looser limit
    summary = run_stage(tmp_path, params_for([(path, "sft", "alpaca")], max_reject_share=0.5))
    assert summary["kept"] == 3 and (tmp_path / "validated" / "sft.jsonl").exists()


def test_file_errors_and_config_errors(tmp_path):
    with pytest.raises(TemperingError, match="nope.json: file not found"):
        validate.validate_sources(params_for([(tmp_path / "nope.json", "sft", "alpaca")]).validate_)
    with pytest.raises(TemperingError, match="validate.sources is empty"):
        validate.validate_sources(ValidateParams())


def test_cli_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "t.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    params = tmp_path / "params.yaml"
    params.write_text(f"validate:\n  sources:\n    - {{path: {bad}, kind: sft, format: alpaca}}\n", encoding="utf-8")
    rc = validate.main(["--params", str(params), "--out", "v", "--quarantine", "q.jsonl", "--report", "r.md",
                        "--metrics", "m.json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "t.jsonl.gz" in err and "gzip" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- token checks


@pytest.fixture(scope="module")
def tok():
    from tempering.testing import make_tiny_tokenizer

    return make_tiny_tokenizer()


def _sft_file(tmp: Path, rows) -> Path:
    return write(tmp / "sft.jsonl", [msgs(*r) for r in rows])


def test_token_checks_quarantine_unsupervised_rows(tmp_path, tok):
    from tempering.train.data import tokenize_conversation

    long_prompt = "the question " * 200  # fills max_length: no reply token survives truncation
    rows = [(("user", "What is the capital city?"), ("assistant", "It is Paris.")),
            (("user", long_prompt), ("assistant", "Yes.")),
            (("user", "Say a long thing."), ("assistant", "word " * 200))]  # truncated, still supervised
    path = _sft_file(tmp_path, rows)
    kept, quarantine, metrics, _ = validate.validate_sources(
        params_for([(path, "sft", "messages")], max_reject_share=1.0).validate_, tokenizer=tok, max_length=64)
    assert [(q["row"], q["reason"]) for q in quarantine] == [(2, "low_supervision")]
    assert f"{path}:2: messages: only 0 of 64 tokens (0.0%) are supervised" in quarantine[0]["message"]
    t = metrics["tokens"]
    assert t["checked"] and t["examples"] == 3 and t["truncated"] == 2 and t["eot_missing"] == 0
    assert t["truncation_rate"] == round(2 / 3, 4) and t["end_of_turn"] == "<|im_end|>" and t["end_of_turn_is_eos"]
    assert t["eot_cut_by_truncation"] == 2  # both truncated rows lose their end-of-turn token
    # the first row's share is exactly the supervised tokens of SFT's own tokenization
    enc = tokenize_conversation(tok, kept["sft"][0]["messages"])
    share = sum(1 for x in enc["labels"] if x != -100) / len(enc["input_ids"])
    assert t["supervised_share_min"] <= share and 0 < share < 1
    assert t["failed"] == ["truncation_rate"]  # 67% > the default 20%
    # a stricter per-row minimum quarantines the short-answer row too
    _, quarantine, _, _ = validate.validate_sources(
        params_for([(path, "sft", "messages")], max_reject_share=1.0,
                   tokens={"min_supervised_share": share + 0.01}).validate_, tokenizer=tok, max_length=64)
    assert {q["row"] for q in quarantine} == {1, 2}


def test_truncation_rate_fails_the_stage_with_a_clear_message(tmp_path, tok, monkeypatch):
    rows = [(("user", f"question {i}"), ("assistant", "answer " * (10 if i % 2 else 100))) for i in range(10)]
    path = _sft_file(tmp_path, rows)
    params = params_for([(path, "sft", "messages")])
    params = params.model_copy(update={"sft": params.sft.model_copy(update={"max_length": 64})})
    monkeypatch.setattr("tempering.train.data.load_tokenizer", lambda folder, template=None: tok)
    with pytest.raises(TemperingError) as exc:
        validate.run(params, out=str(tmp_path / "v"), quarantine=str(tmp_path / "q.jsonl"),
                     report=str(tmp_path / "r.md"), metrics=str(tmp_path / "m.json"), tokenizer="tiny")
    msg = str(exc.value)
    assert "\n" not in msg and "5 of 10 SFT examples (50.0%) are longer than sft.max_length=64" in msg
    assert "validate.tokens.max_truncation_rate 20.0%" in msg and "r.md" in msg
    assert not (tmp_path / "v").exists()
    assert "truncation_rate" in json.loads((tmp_path / "m.json").read_text())["tokens"]["failed"]
    assert "**(over limit)**" in (tmp_path / "r.md").read_text()
    # a longer max_length passes
    params = params.model_copy(update={"sft": params.sft.model_copy(update={"max_length": 512})})
    summary = validate.run(params, out=str(tmp_path / "v"), quarantine=str(tmp_path / "q.jsonl"),
                           report=str(tmp_path / "r.md"), metrics=str(tmp_path / "m.json"), tokenizer="tiny")
    assert summary["token_checks"] and summary["kept"] == 10


def test_template_without_end_of_turn_fails(tmp_path, tok):
    """A template that ends replies with nothing trainable: the model would never learn to stop."""
    path = _sft_file(tmp_path, [(("user", "q"), ("assistant", "a"))] * 3)
    no_eot = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    _, _, metrics, _ = validate.validate_sources(params_for([(path, "sft", "messages")]).validate_, tokenizer=tok,
                                                 max_length=64, chat_template=no_eot)
    t = metrics["tokens"]
    assert t["eot_missing"] == 3 and t["failed"] == ["eot_missing_rate"] and t["end_of_turn"] == ""
    msg = validate._token_failure(t, "r.md")
    assert "end-of-turn token (none: the template adds no marker) is outside the loss mask in 3 of 3" in msg
    # the ChatML template of the same tokenizer passes
    _, _, metrics, _ = validate.validate_sources(params_for([(path, "sft", "messages")]).validate_, tokenizer=tok,
                                                 max_length=64)
    assert metrics["tokens"]["failed"] == [] and metrics["tokens"]["eot_missing"] == 0


def test_generated_data_passes_token_checks_at_default_params(generated, tok):
    """What `dvc repro` runs: the generated data, the default thresholds, sft.max_length."""
    vp = params_for([(generated / f, k, fmt) for f, k, fmt in GENERATED_SOURCES]).validate_
    _, _, metrics, _ = validate.validate_sources(vp, tokenizer=tok, max_length=Params().sft.max_length,
                                                 dpo_max_length=Params().dpo.max_length,
                                                 dpo_max_prompt_length=Params().dpo.max_prompt_length)
    t = metrics["tokens"]
    assert t["checked"] and t["failed"] == [] and t["examples"] == metrics["kinds"]["sft"]["rows"]
    assert "low_supervision" not in metrics["by_reason"]
    p = metrics["preference_tokens"]
    assert p["checked"] and p["failed"] == [] and p["examples"] == metrics["kinds"]["preference"]["rows"]
    assert p["same_after_truncation"] == 0 and "same_after_truncation" not in metrics["by_reason"]


def test_cli_with_tokenizer_folder(tmp_path, tok, capsys, monkeypatch):
    folder = tmp_path / "tokenizer"
    tok.save_pretrained(folder)
    path = _sft_file(tmp_path, [(("user", "q"), ("assistant", "a"))])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"validate:\n  sources:\n    - {{path: {path}, kind: sft, format: messages}}\n",
                                          encoding="utf-8")
    rc = validate.main(["--out", "v", "--quarantine", "q.jsonl", "--report", "r.md", "--html", "r.html",
                        "--metrics", "m.json", "--tokenizer", str(folder)])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["tokens"]["checked"] and metrics["tokens"]["examples"] == 1
    html = (tmp_path / "r.html").read_text()
    assert html.startswith("<!doctype html>") and f"<code>{path}</code>" in html and "<table>" in html
    assert html.count("<table>") == html.count("</table>") >= 3 and "Token checks" in html


def test_html_report_is_the_template_with_every_figure_and_data_as_text(tmp_path):
    """The HTML report renders the same metrics and examples as the markdown one, from the
    data_validate.html.j2 template (autoescaped: a row's text is never markup)."""
    import re

    from tempering import templating

    assert not hasattr(validate, "markdown_to_html")
    path = _sft_file(tmp_path, [(("user", "<script>alert(1)</script> **q**"), ("assistant", "a")),
                                (("user", "q2"), ("assistant", ""))])
    vp = ValidateParams(sources=[SourceSpec(path=str(path), kind="sft", format="messages")], max_reject_share=1.0)
    _, _, metrics, examples = validate.validate_sources(vp)
    assert examples and metrics["by_reason"]
    examples = {r: [f"<b>{m}</b> `x`" for m in msgs] for r, msgs in examples.items()}
    page = templating.render("data_validate.html.j2", metrics=metrics, examples=examples, title="t <&>")
    assert page.startswith("<!doctype html>") and "<title>t &lt;&amp;&gt;</title>" in page
    assert "<b>" not in page and "&lt;b&gt;" in page and "<code>x</code>" not in page
    assert page.count("<table>") == page.count("</table>") >= 3 and f"<code>{path}</code>" in page
    markdown = validate.render_report(metrics, examples)
    text = re.sub(r"<[^>]+>", " ", page)
    for number in re.findall(r"\b\d+(?:\.\d+)?%?", markdown):   # every figure of the markdown report
        assert number in text, number
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        assert f">{heading}</h" in page, heading


# ----------------------------------------------------------------------------- labelled preference data


def _spec(path: Path, fmt: str, **kw) -> SourceSpec:
    return SourceSpec(path=str(path), kind="preference", format=fmt, **kw)


def _labelled_files(tmp: Path) -> dict[str, Path]:
    """One small file per labelled format, in the layout the public data sets use."""
    alpaca_eval = [{"instruction": f"Name fruit number {i}.", "output_1": f"Fruit {i} is an apple.",
                    "output_2": "I like trains.", "generator_1": "gpt4", "generator_2": "davinci",
                    "annotator": "alpaca_eval_gpt4", "preference": 1.0} for i in range(5)]
    alpaca_eval += [{"instruction": "Tie?", "output_1": "yes", "output_2": "no", "preference": 0},
                    {"instruction": "Unlabelled?", "output_1": "yes", "output_2": "no", "preference": None},
                    {"instruction": "Empty answer?", "output_1": "", "output_2": "no", "preference": 1}]
    ae = tmp / "alpaca_eval.json"
    ae.write_text(json.dumps(alpaca_eval), encoding="utf-8")

    def conv(q, a):
        return [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}]

    arena = [{"question_id": f"q{i}", "model_a": "vicuna-13b", "model_b": "koala-13b",
              "winner": "model_b" if i % 2 else "model_a", "conversation_a": conv(f"Question {i}?", f"Answer A{i}."),
              "conversation_b": conv(f"Question {i}?", f"Answer B{i}."), "turn": 1, "language": "English"}
             for i in range(4)]
    arena += [{**arena[0], "question_id": f"t{i}", "winner": w,
               "conversation_a": conv(f"Tied question {i}?", "A."), "conversation_b": conv(f"Tied question {i}?", "B.")}
              for i, w in enumerate(["tie", "tie (bothbad)", "tie"])]
    arena.append({**arena[0], "question_id": "m", "conversation_a": conv("One?", "A."),
                  "conversation_b": conv("Another?", "B.")})
    ar = tmp / "arena.jsonl"
    ar.write_text("".join(json.dumps(r) + "\n" for r in arena), encoding="utf-8")

    def comp(model, response, score):
        return {"model": model, "response": response, "overall_score": score, "fine-grained_score": score / 2,
                "annotations": {"helpfulness": {"Rating": str(int(score // 2)), "Rationale": "."}}}

    uf = [{"source": "evol_instruct", "instruction": f"Describe colour {i}.",
           "completions": [comp("a", f"Colour {i} is warm.", 6.0), comp("b", f"Colour {i} is bright red.", 8.0),
                           comp("c", "Dogs bark.", 2.0), comp("d", f"Colour {i}.", 4.0)]} for i in range(4)]
    uf.append({"source": "flan", "instruction": "Equal?", "completions": [comp("a", "x1", 5.0), comp("b", "x2", 5.0)]})
    ufp = tmp / "ultrafeedback.jsonl"
    ufp.write_text("".join(json.dumps(r) + "\n" for r in uf), encoding="utf-8")
    return {"alpaca_eval": ae, "arena": ar, "ultrafeedback": ufp}


def test_labelled_preference_formats_through_the_validate_stage(tmp_path):
    files = _labelled_files(tmp_path)
    specs = tuple(_spec(path, fmt) for fmt, path in files.items())
    summary = run_stage(tmp_path, Params(validate_=ValidateParams(sources=specs)))
    quarantine = read_jsonl(tmp_path / "q.jsonl")
    got = {(Path(q["source"]).name, q["row"]): q["reason"] for q in quarantine}
    assert got == {("alpaca_eval.json", 6): "tie", ("alpaca_eval.json", 7): "unlabelled",
                   ("alpaca_eval.json", 8): "empty_field",
                   ("arena.jsonl", 5): "tie", ("arena.jsonl", 6): "tie", ("arena.jsonl", 7): "tie",
                   ("arena.jsonl", 8): "prompt_mismatch", ("ultrafeedback.jsonl", 5): "tie"}
    fields = {"alpaca_eval.json": {6: "'preference'", 7: "'preference'", 8: "chosen"},
              "arena.jsonl": {5: "'winner'", 6: "'winner'", 7: "'winner'", 8: "conversation_a[0]"},
              "ultrafeedback.jsonl": {5: "'completions'"}}
    for q in quarantine:
        assert q["message"].startswith(f"{q['source']}:{q['row']}: ") and "\n" not in q["message"]
        assert fields[Path(q["source"]).name][q["row"]] in q["message"], q["message"]
        assert q["stage"] == "validate" and q["original"]
    kept = read_jsonl(tmp_path / "validated" / "preference.jsonl")
    assert len(kept) == summary["kept"] == 5 + 4 + 4
    by_source = {Path(r["source"].rsplit(":", 1)[0]).name: [] for r in kept}
    for r in kept:
        by_source[Path(r["source"].rsplit(":", 1)[0]).name].append(r)
    assert by_source["alpaca_eval.json"][0]["chosen"] == "Fruit 0 is an apple."
    assert [r["chosen"] for r in by_source["arena.jsonl"]] == ["Answer A0.", "Answer B1.", "Answer A2.", "Answer B3."]
    assert [(r["chosen"], r["rejected"]) for r in by_source["ultrafeedback.jsonl"]][0] == \
        ("Colour 0 is bright red.", "Dogs bark.")  # best vs worst
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for path, s in metrics["sources"].items():
        assert s["kept"] + s["quarantined"] == s["read"]
    arena = metrics["sources"][str(files["arena"])]
    # Ties are quarantined and reported but not counted against max_reject_share.
    assert arena["reject_share"] == 0.5 and arena["counted_reject_share"] == 0.125
    assert arena["by_reason"] == {"prompt_mismatch": 1, "tie": 3}
    assert "50.0% (12.5% counted)" in (tmp_path / "report.md").read_text()

    # Counting ties too, the Arena file's 4 of 8 fail the default 25% limit: one line, file named.
    strict = Params(validate_=ValidateParams(sources=specs, reject_share_ignores=()))
    with pytest.raises(TemperingError) as exc:
        run_stage(tmp_path / "strict", strict)
    msg = str(exc.value)
    assert "\n" not in msg and f"{files['arena']}: 4 of 8 rows rejected (50.0% > validate.max_reject_share" in msg

    # validate.rated_pairs: best_vs_random draws the rejected completion among the lower-rated ones.
    rnd = Params(validate_=ValidateParams(sources=(specs[2],), rated_pairs={"pairing": "best_vs_random", "seed": 7}))
    run_stage(tmp_path / "rnd", rnd)
    pairs = [(r["chosen"], r["rejected"]) for r in read_jsonl(tmp_path / "rnd" / "validated" / "preference.jsonl")]
    assert all(c.endswith("bright red.") for c, _ in pairs)
    assert any(r != "Dogs bark." for _, r in pairs) and all("bright red" not in r for _, r in pairs)


def _pref_file(tmp: Path, rows: list[tuple[str, str, str]]) -> Path:
    return write(tmp / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])


PREF_ROWS = [
    ("What colour is the sky?", "It is blue.", "It is green."),                 # fits
    ("the question " * 40 + "ok?", "Yes.", "No."),                                # prompt too long
    ("Tell me a long thing.", "word " * 60 + "yes", "word " * 3 + "no"),          # chosen cut at max_length
    ("Say it twice.", "same " * 60 + "good", "same " * 60 + "bad"),               # identical once cut
]


def test_preference_token_checks_count_or_quarantine(tmp_path, tok):
    from tempering.train.data import dpo_truncate, tokenize_preference

    path = _pref_file(tmp_path, PREF_ROWS)
    vp = ValidateParams(sources=(_spec(path, "pairs"),), max_reject_share=1.0)
    kept, quarantine, metrics, _ = validate.validate_sources(vp, tokenizer=tok, max_length=256, dpo_max_length=64,
                                                             dpo_max_prompt_length=32)
    # count (default): truncated pairs are kept and counted; a pair with no difference left is dropped
    assert [(q["row"], q["reason"]) for q in quarantine] == [(4, "same_after_truncation")]
    assert quarantine[0]["message"].startswith(f"{path}:4: chosen and rejected: identical in the ")
    t = metrics["preference_tokens"]
    assert t["checked"] and t["examples"] == 4 and t["max_length"] == 64 and t["max_prompt_length"] == 32
    assert t["prompt_truncated"] == 1 and t["answer_truncated"] == 2 and t["same_after_truncation"] == 1
    assert t["prompt_truncation_rate"] == 0.25 and t["answer_truncation_rate"] == 0.5
    assert t["failed"] == ["prompt_truncation_rate", "answer_truncation_rate"]  # both over the default 20%
    assert len(kept["preference"]) == 3
    # the counts are DPO's own tokenization of the rows
    enc = tokenize_preference(tok, [{"role": "user", "content": PREF_ROWS[1][0]}], "Yes.", "No.")
    assert len(enc["prompt_ids"]) > 32 == len(dpo_truncate(enc, 64, 32)["prompt_ids"])
    assert t["prompt_tokens_max"] == len(enc["prompt_ids"])
    msg = validate._preference_token_failure(t, "r.md")
    assert "1 of 4 preference pairs (25.0%) have prompts longer than dpo.max_prompt_length=32" in msg
    assert "2 of 4 preference pairs (50.0%) have an answer cut at dpo.max_length=64" in msg

    # quarantine: each truncated pair goes, with the field and the token counts in its message
    vp = vp.model_copy(update={"preference_tokens": vp.preference_tokens.model_copy(
        update={"truncation": "quarantine"})})
    kept, quarantine, metrics, _ = validate.validate_sources(vp, tokenizer=tok, max_length=256, dpo_max_length=64,
                                                             dpo_max_prompt_length=32)
    got = {q["row"]: q for q in quarantine}
    assert {r: q["reason"] for r, q in got.items()} == {2: "prompt_truncated", 3: "answer_truncated",
                                                        4: "answer_truncated"}
    assert got[4]["reasons"] == ["answer_truncated", "same_after_truncation"]
    assert f"{path}:2: prompt: {len(enc['prompt_ids'])} tokens after the chat template, over " \
           "dpo.max_prompt_length=32" in got[2]["message"]
    assert got[3]["message"].startswith(f"{path}:3: chosen: ") and "over dpo.max_length=64" in got[3]["message"]
    assert metrics["preference_tokens"]["failed"] == [] and [r["chosen"] for r in kept["preference"]] == ["It is blue."]
    # longer limits: nothing truncated, nothing dropped
    kept, quarantine, metrics, _ = validate.validate_sources(vp, tokenizer=tok, max_length=256, dpo_max_length=512,
                                                             dpo_max_prompt_length=256)
    assert not quarantine and metrics["preference_tokens"]["prompt_truncated"] == 0


def test_preference_truncation_rate_fails_the_stage(tmp_path, tok, monkeypatch):
    path = _pref_file(tmp_path, PREF_ROWS[:3])
    params = Params(validate_=ValidateParams(sources=(_spec(path, "pairs"),)),
                    dpo={"max_length": 64, "max_prompt_length": 32})
    monkeypatch.setattr("tempering.train.data.load_tokenizer", lambda folder, template=None: tok)
    with pytest.raises(TemperingError) as exc:
        validate.run(params, out=str(tmp_path / "v"), quarantine=str(tmp_path / "q.jsonl"),
                     report=str(tmp_path / "r.md"), metrics=str(tmp_path / "m.json"), tokenizer="tiny")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("preference token checks: 1 of 3 preference pairs (33.3%)")
    assert "validate.preference_tokens.max_answer_truncation_rate 20.0%" in msg and "r.md" in msg
    assert not (tmp_path / "v").exists()
    report = (tmp_path / "r.md").read_text()
    assert "Token checks (preference pairs" in report and "**(over limit)**" in report
    # the DPO lengths the pipeline trains with pass
    params = Params(validate_=ValidateParams(sources=(_spec(path, "pairs"),)))
    summary = validate.run(params, out=str(tmp_path / "v"), quarantine=str(tmp_path / "q.jsonl"),
                           report=str(tmp_path / "r.md"), metrics=str(tmp_path / "m.json"), tokenizer="tiny")
    assert summary["preference_token_checks"] and summary["kept"] == 3
    meta = json.loads((tmp_path / "v" / "meta.json").read_text())
    assert meta["preference_tokens"]["max_length"] == Params().dpo.max_length


# ----------------------------------------------------------------------------- PII


def test_pii_redaction_counts_and_ids(tmp_path):
    from tempering.io import content_id

    rows = [msgs(("user", "Mail jane.doe@corp.io or call (202) 555-0143."), ("assistant", "Done.")),
            msgs(("user", 'Use api_key = "A1b2C3d4E5f6G7h8" and AKIAIOSFODNN7EXAMPLE'), ("assistant", "ok")),
            msgs(("user", "Write to info@example.com, in 2023-03-22, for 1,234,567 people"), ("assistant", "ok"))]
    path = write(tmp_path / "p.jsonl", rows)
    kept, _, metrics, _ = validate.validate_sources(params_for([(path, "sft", "messages")]).validate_)
    texts = [r["messages"][0]["content"] for r in kept["sft"]]
    assert texts[0] == "Mail [REDACTED_EMAIL] or call [REDACTED_PHONE]."
    assert texts[1] == 'Use api_key = "[REDACTED_SECRET]" and [REDACTED_SECRET]'
    assert texts[2] == rows[2]["messages"][0]["content"]  # allow-listed domain, a date and a number stay
    assert metrics["pii"]["total"] == {"email": 1, "phone": 1, "secret": 2} and metrics["pii"]["rows_redacted"] == 2
    assert metrics["sources"][str(path)]["redacted"] == {"email": 1, "phone": 1, "secret": 2}
    row = kept["sft"][0]
    assert row["id"] == content_id({"messages": row["messages"]})  # the id names the redacted content
    # disabled: nothing changes
    kept, _, metrics, _ = validate.validate_sources(params_for([(path, "sft", "messages")],
                                                               pii={"enabled": False}).validate_)
    assert kept["sft"][0]["messages"][0]["content"] == rows[0]["messages"][0]["content"]
    assert not metrics["pii"]["rows_redacted"]


@pytest.mark.parametrize("text,kind", [
    ("reach me at first.last+tag@mail.example-corp.co.uk today", "email"),
    ("phone +44 20 7946 0958", "phone"),
    ("toll free 1-800-555-0199", "phone"),
    ("token ghp_" + "a1B2" * 9, "secret"),
    ("OPENAI_API_KEY=sk-proj-" + "x" * 30, "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", "secret"),
    ("bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "secret"),
])
def test_pii_patterns(text, kind):
    from tempering.config import PiiParams
    from tempering.pii import redact_text

    out, counts = redact_text(text, PiiParams())
    assert counts == {kind: 1} and f"[REDACTED_{kind.upper()}]" in out


@pytest.mark.parametrize("text", ["x = ab@cd", "@app.route('/')", "2023-03-22", "version 10.0.0.1",
                                  "ISBN 978-3-16-148410-0", "password = getpass()", "call 555-1234",
                                  "pi is 3.14159265358979"])
def test_pii_leaves_lookalikes(text):
    from tempering.config import PiiParams
    from tempering.pii import redact_text

    assert redact_text(text, PiiParams()) == (text, {})
