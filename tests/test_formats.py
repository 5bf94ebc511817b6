"""tempering.formats: every input format, field mapping, compressed/parquet files, and malformed input.

Malformed files must give a one-line TemperingError naming the file; malformed rows a Rejected with a
machine-readable reason and a message naming file:row and the field. Content checks (roles, empty
turns, ...) are validate's; they are tested end to end in test_validate.py.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tempering import TemperingError
from tempering.config import SourceSpec
from tempering.formats import (Accepted, Rejected, iter_source, normalize_record, parse_hh, split_text,
                               strip_gutenberg)
from tempering.io import content_id


def spec(path, kind="sft", fmt="alpaca", fields=None) -> SourceSpec:
    return SourceSpec(path=str(path), kind=kind, format=fmt, fields=fields or {})


def results(path, kind="sft", fmt="alpaca", fields=None, **kw) -> list:
    return list(iter_source(spec(path, kind, fmt, fields), **kw))


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ----------------------------------------------------------------------------- formats


def test_alpaca_with_input_system_and_history(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": " 5 \r\n"},
        {"instruction": "Hi", "input": "", "output": "Hello", "system": "Be nice.",
         "history": [["Earlier q", "Earlier a"]]},
        {"instruction": "No input field", "output": "ok"},
        {"instruction": "Null input", "input": None, "output": "ok"},
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    res = results(path)
    assert all(isinstance(r, Accepted) for r in res)
    m0 = res[0].row["messages"]
    assert m0 == [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert [m["role"] for m in res[1].row["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert res[1].row["messages"][1]["content"] == "Earlier q"
    assert res[2].row["messages"][0]["content"] == "No input field"
    assert res[3].row["messages"][0]["content"] == "Null input"
    # id = content hash of the normalized row; source = path:row (1-based)
    assert res[0].row["id"] == content_id({"messages": m0})
    assert res[1].row["source"] == f"{path}:2"


def test_sharegpt_roles_and_system(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S"},
            {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "q"},
                               {"from": "assistant", "value": "a"}]},
            {"conversations": [{"from": "bot", "value": "x"}]}]
    res = results(write_jsonl(tmp_path / "s.jsonl", rows), fmt="sharegpt")
    assert res[0].row["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}]
    assert [m["role"] for m in res[1].row["messages"]] == ["system", "user", "assistant"]
    # Unknown roles are kept as they are, so validation can report them.
    assert res[2].row["messages"][0]["role"] == "bot"


def test_messages_with_system_and_content_parts(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "User", "content": "q"},
                          {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}]}]
    res = results(write_jsonl(tmp_path / "m.jsonl", rows), fmt="messages")
    assert res[0].row["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "ab"}]


def test_pairs_prompt_string_messages_and_conversations(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
         "chosen": "good", "rejected": "bad"},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
    ]
    res = results(write_jsonl(tmp_path / "p.jsonl", rows), kind="preference", fmt="pairs")
    assert res[0].row["prompt"] == [{"role": "user", "content": "q"}]
    assert (res[0].row["chosen"], res[0].row["rejected"]) == ("good", "bad")
    assert [m["role"] for m in res[1].row["prompt"]] == ["system", "user"]
    assert res[2].row["prompt"] == [{"role": "user", "content": "q"}]
    assert res[2].row["chosen"] == "good" and res[2].row["rejected"] == "bad"


def test_hh_split_into_prompt_and_answers(tmp_path):
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away."
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: different\n\nAssistant: c"}
    res = results(write_jsonl(tmp_path / "hh.jsonl.gz", [{"chosen": chosen, "rejected": rejected}, bad], gz=True),
                  kind="preference", fmt="hh")
    row = res[0].row
    assert row["prompt"] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "How are you?"}]
    assert (row["chosen"], row["rejected"]) == ("Fine, thanks.", "Go away.")
    assert isinstance(res[1], Rejected) and res[1].reason == "bad_structure"
    assert parse_hh("\n\nHuman: x\n\nAssistant:") == [{"role": "user", "content": "x"},
                                                      {"role": "assistant", "content": ""}]


# ----------------------------------------------------------------------------- labelled preference formats


def _outcome(res) -> list:
    """Per row: (chosen, rejected) when accepted, the reason when rejected."""
    return [(r.row["chosen"], r.row["rejected"]) if isinstance(r, Accepted) else r.reason for r in res]


def _names_row_and_field(res, path, field: str) -> None:
    assert isinstance(res, Rejected), res
    assert res.message.startswith(f"{path}:{res.index}: ") and field in res.message and "\n" not in res.message


def test_alpaca_eval_labels_ties_and_unlabelled(tmp_path):
    """AlpacaEval annotations as alpaca_eval writes them (a JSON array, float preferences, extra keys)."""
    base = {"dataset": "helpful_base", "generator_1": "text_davinci_003", "generator_2": "gpt4",
            "annotator": "alpaca_eval_gpt4", "price_per_example": 0.0138, "time_per_example": 1.9}
    rows = [
        {**base, "instruction": "Name a primary colour.", "output_1": "Red.", "output_2": "Teal.", "preference": 1},
        {**base, "instruction": "What is 2+2?", "output_1": "5", "output_2": "4", "preference": 2.0},
        {**base, "instruction": "Say hi.", "output_1": "hi", "output_2": "Hello there!", "preference": 1.81},  # soft
        {**base, "instruction": "Say bye.", "output_1": "bye", "output_2": "Goodbye.", "preference": 0},
        {**base, "instruction": "Say yes.", "output_1": "yes", "output_2": "Yes.", "preference": 1.5},
        {**base, "instruction": "Say no.", "output_1": "no", "output_2": "No."},
        {**base, "instruction": "Say so.", "output_1": "so", "output_2": "So.", "preference": None},
        {**base, "instruction": "Say it.", "output_1": "it", "output_2": "It.", "preference": 3},
        {**base, "instruction": "Say what.", "output_1": "what", "output_2": "What?", "preference": "first"},
        {**base, "instruction": "Say who.", "output_1": "who", "preference": 1},
    ]
    path = tmp_path / "alpaca_eval_annotations.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    res = results(path, kind="preference", fmt="alpaca_eval")
    assert _outcome(res) == [("Red.", "Teal."), ("4", "5"), ("Hello there!", "hi"), "tie", "tie", "unlabelled",
                             "unlabelled", "bad_label", "wrong_type", "missing_field"]
    assert res[0].row["prompt"] == [{"role": "user", "content": "Name a primary colour."}]
    for i in range(3, 10):
        _names_row_and_field(res[i], path, "'output_2'" if i == 9 else "'preference'")
    assert "a tie" in res[3].message and "no label" in res[5].message and "got 3" in res[7].message
    # a file whose columns are named differently: fields maps our names to its own
    mapped = [{"prompt": "Name a colour.", "answer_a": "Blue.", "answer_b": "Table.", "label": 1}]
    res = results(write_jsonl(tmp_path / "mapped.jsonl", mapped), kind="preference", fmt="alpaca_eval",
                  fields={"instruction": "prompt", "output_1": "answer_a", "output_2": "answer_b",
                          "preference": "label"})
    assert _outcome(res) == [("Blue.", "Table.")]
    res = results(write_jsonl(tmp_path / "nolabel.jsonl", [{k: v for k, v in mapped[0].items() if k != "label"}]),
                  kind="preference", fmt="alpaca_eval", fields={"instruction": "prompt", "output_1": "answer_a",
                                                                "output_2": "answer_b", "preference": "label"})
    assert res[0].reason == "unlabelled" and "label (as preference)" in res[0].message


def _arena_row(winner, a, b, qid="q1", **extra):
    """A Chatbot Arena row in the lmsys/chatbot_arena_conversations layout."""
    return {"question_id": qid, "model_a": "vicuna-13b", "model_b": "koala-13b", "winner": winner,
            "judge": "arena_user_973", "conversation_a": a, "conversation_b": b, "turn": len(a) // 2,
            "anony": True, "language": "English", "tstamp": 1682351591.13,
            "openai_moderation": {"categories": {"harassment": False}, "flagged": False},
            "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.01}}, **extra}


def _turns(*pairs):
    return [{"content": text, "role": role} for role, text in pairs]


def test_arena_winner_ties_and_shared_prompt(tmp_path):
    import pandas as pd

    q = ("user", "What is the difference between OpenCL and CUDA?")
    rows = [
        _arena_row("model_a", _turns(q, ("assistant", "OpenCL is an open standard.")),
                   _turns(q, ("assistant", "They are the same."))),
        _arena_row("model_b", _turns(q, ("assistant", "No idea.")),
                   _turns(q, ("assistant", "CUDA is NVIDIA-only; OpenCL is portable."))),
        _arena_row("tie", _turns(q, ("assistant", "A.")), _turns(q, ("assistant", "B."))),
        _arena_row("tie (bothbad)", _turns(q, ("assistant", "A.")), _turns(q, ("assistant", "B."))),
        # two turns sharing the first answer: the prompt is everything before the final answers
        _arena_row("model_b", _turns(q, ("assistant", "Both are GPU APIs."), ("user", "Which is faster?")) +
                   _turns(("assistant", "OpenCL.")),
                   _turns(q, ("assistant", "Both are GPU APIs."), ("user", "Which is faster?"),
                          ("assistant", "It depends on the vendor."))),
        # the real multi-turn case: earlier answers differ, so the conversations share no prompt
        _arena_row("model_a", _turns(q, ("assistant", "X."), ("user", "More?"), ("assistant", "X2.")),
                   _turns(q, ("assistant", "Y."), ("user", "More?"), ("assistant", "Y2."))),
        _arena_row(None, _turns(q, ("assistant", "A.")), _turns(q, ("assistant", "B."))),
        _arena_row("model_c", _turns(q, ("assistant", "A.")), _turns(q, ("assistant", "B."))),
        _arena_row("model_a", _turns(q, ("assistant", "A.")), _turns(q)),
    ]
    path = tmp_path / "arena-train.parquet"  # the hub ships it as parquet
    pd.DataFrame(rows).to_parquet(path)
    res = results(path, kind="preference", fmt="arena")
    assert _outcome(res) == [("OpenCL is an open standard.", "They are the same."),
                             ("CUDA is NVIDIA-only; OpenCL is portable.", "No idea."), "tie", "tie",
                             ("It depends on the vendor.", "OpenCL."), "prompt_mismatch", "unlabelled", "bad_label",
                             "bad_structure"]
    assert res[0].row["prompt"] == [{"role": "user", "content": q[1]}]
    assert [m["role"] for m in res[4].row["prompt"]] == ["user", "assistant", "user"]
    for i, field in ((2, "'winner'"), (3, "'winner'"), (5, "conversation_a[1]"), (6, "'winner'"), (7, "'winner'"),
                     (8, "conversation_b[0]")):
        _names_row_and_field(res[i], path, field)
    assert "tie (bothbad)" in res[3].message and "do not share the prompt" in res[5].message


UF_ANNOTATIONS = {"helpfulness": {"Rating": "4", "Rationale": "clear", "Rationale For Rating": "ok", "Type": ["1"]},
                  "honesty": {"Rating": "5", "Rationale": "confident"},
                  "instruction_following": {"Rating": "3", "Rationale": "partly"},
                  "truthfulness": {"Rating": "N/A", "Rationale": "n/a", "Type": ["0"]}}


def _uf_completion(model, response, overall=None, fine=None, annotations=UF_ANNOTATIONS):
    """One completion in the openbmb/UltraFeedback layout (scores absent when None)."""
    comp = {"annotations": annotations, "critique": "Could be more concise.", "custom_system_prompt": "Be helpful.",
            "model": model, "principle": "helpfulness", "response": response}
    if overall is not None:
        comp["overall_score"] = overall
    if fine is not None:
        comp["fine-grained_score"] = fine
    return comp


def _uf_row(instruction, completions, source="evol_instruct"):
    return {"source": source, "instruction": instruction, "models": [c.get("model") for c in completions],
            "completions": completions, "correct_answers": ["None"], "incorrect_answers": ["None"]}


def test_ultrafeedback_rated_completions_become_pairs(tmp_path):
    four = [_uf_completion("alpaca-7b", "Paris is in France.", 6.0, 3.5),
            _uf_completion("gpt-4", "The capital of France is Paris.", 8.5, 4.75),
            _uf_completion("pythia-12b", "London.", 2.0, 1.25),
            _uf_completion("starchat", "It is Paris, I think.", 5.0, 3.0)]
    rows = [
        _uf_row("What is the capital of France?", four),
        # no overall_score: fine-grained_score decides
        _uf_row("Name a prime.", [_uf_completion("a", "4", fine=1.5), _uf_completion("b", "7", fine=4.5)]),
        # neither: the mean of the numeric annotation ratings ("N/A" skipped)
        _uf_row("Name a colour.", [_uf_completion("a", "Blue.", annotations=UF_ANNOTATIONS),
                                   _uf_completion("b", "Chair.", annotations={"helpfulness": {"Rating": "1"}})]),
        _uf_row("Only one answer?", [_uf_completion("a", "Yes.", 7.0)]),
        _uf_row("All equal?", [_uf_completion("a", "One.", 6.0), _uf_completion("b", "Two.", 6.0)]),
        _uf_row("Unscored?", [_uf_completion("a", "One.", 6.0), _uf_completion("b", "Two.", annotations={})]),
        _uf_row("Bad score?", [_uf_completion("a", "One.", 6.0), _uf_completion("b", "Two.", "high")]),
        _uf_row("Bad response?", [_uf_completion("a", "One.", 6.0), _uf_completion("b", 42, 3.0)]),
        {"source": "flan", "models": [], "completions": four},  # no prompt
    ]
    path = write_jsonl(tmp_path / "ultrafeedback.jsonl", rows)
    res = results(path, kind="preference", fmt="ultrafeedback")
    assert _outcome(res) == [("The capital of France is Paris.", "London."), ("7", "4"), ("Blue.", "Chair."),
                             "too_few_completions", "tie", "unlabelled", "wrong_type", "wrong_type", "missing_field"]
    assert res[0].row["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    for i, field in ((3, "'completions'"), (4, "'completions'"), (5, "completions[1]"),
                     (6, "completions[1].overall_score"), (7, "completions[1].response"),
                     (8, "'prompt or instruction'")):
        _names_row_and_field(res[i], path, field)
    assert "1 completion(s)" in res[3].message and "same score 6" in res[4].message
    # fields: {score: ...} names the score to use: by fine-grained_score the order of two changes
    swap = [_uf_row("q?", [_uf_completion("a", "A", 9.0, 1.0), _uf_completion("b", "B", 1.0, 5.0)])]
    res = results(write_jsonl(tmp_path / "swap.jsonl", swap), kind="preference", fmt="ultrafeedback")
    assert _outcome(res) == [("A", "B")]
    res = results(write_jsonl(tmp_path / "swap.jsonl", swap), kind="preference", fmt="ultrafeedback",
                  fields={"score": "fine-grained_score"})
    assert _outcome(res) == [("B", "A")]


def test_ultrafeedback_best_vs_random_is_seeded_and_order_free(tmp_path):
    comps = [_uf_completion(f"m{i}", f"answer {i}", float(i)) for i in range(6)]  # answer 5 is best
    rows = [_uf_row(f"question {k}?", comps) for k in range(30)]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)

    def rejected(seed, file=path):
        res = results(file, kind="preference", fmt="ultrafeedback", pairing="best_vs_random", pairing_seed=seed)
        assert all(r.row["chosen"] == "answer 5" for r in res)
        return [r.row["rejected"] for r in res]

    first = rejected(0)
    assert first == rejected(0)                            # seeded: the same pairs every run
    assert set(first) <= {f"answer {i}" for i in range(5)}  # never the best against itself
    assert len(set(first)) >= 3                             # a real draw, not always the worst
    assert first != rejected(1)
    # the draw follows the row's content, not its position: a reversed file gives the same pairs
    reversed_path = write_jsonl(tmp_path / "uf_reversed.jsonl", rows[::-1])
    assert rejected(0, reversed_path) == first[::-1]
    # best_vs_worst is always the lowest score
    res = results(path, kind="preference", fmt="ultrafeedback")
    assert {r.row["rejected"] for r in res} == {"answer 0"}


def test_ultrafeedback_binarized_layout(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: chosen/rejected conversations with their scores."""
    def row(prompt, good, bad, sc, sr, rejected_prompt=None):
        chosen = _turns(("user", prompt), ("assistant", good))
        rejected = _turns(("user", rejected_prompt or prompt), ("assistant", bad))
        return {"prompt": prompt, "prompt_id": content_id(prompt), "chosen": chosen, "rejected": rejected,
                "messages": chosen, "score_chosen": sc, "score_rejected": sr}

    rows = [row("Add 2 and 3.", "5", "6", 9.0, 4.0), row("Add 1 and 1.", "2", "two", 7.0, 7.0),
            row("Add 3 and 3.", "7", "6", 3.0, 8.0), row("Add 4 and 4.", "8", "9", 8.0, 2.0, "Add 5 and 5."),
            {k: v for k, v in row("Add 5 and 5.", "10", "11", 9.0, 1.0).items() if k != "score_rejected"}]
    path = write_jsonl(tmp_path / "train_prefs.jsonl", rows)
    res = results(path, kind="preference", fmt="ultrafeedback")
    assert _outcome(res) == [("5", "6"), "tie", "bad_label", "prompt_mismatch", "unlabelled"]
    assert res[0].row["prompt"] == [{"role": "user", "content": "Add 2 and 3."}]
    for i, field in ((1, "score_chosen"), (2, "score_chosen"), (3, "'chosen'"), (4, "score_rejected")):
        _names_row_and_field(res[i], path, field)


def test_field_mapping(tmp_path):
    rows = [{"prompt_text": "q", "ctx": "", "response": "a"}]
    res = results(write_jsonl(tmp_path / "f.jsonl", rows),
                  fields={"instruction": "prompt_text", "input": "ctx", "output": "response"})
    assert res[0].row["messages"][1]["content"] == "a"
    # sharegpt inner keys are mappable too
    rows = [{"turns": [{"speaker": "human", "text": "q"}, {"speaker": "gpt", "text": "a"}]}]
    res = results(write_jsonl(tmp_path / "g.jsonl", rows), fmt="sharegpt",
                  fields={"conversations": "turns", "from": "speaker", "value": "text"})
    assert [m["role"] for m in res[0].row["messages"]] == ["user", "assistant"]
    # a missing mapped field names both names
    res = results(write_jsonl(tmp_path / "h.jsonl", [{"instruction": "q", "output": "a"}]),
                  fields={"output": "response"})
    assert res[0].reason == "missing_field" and "response (as output)" in res[0].message


def test_gzip_json_and_parquet(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    gz = tmp_path / "a.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(rows).encode()))
    assert [r.row["messages"][0]["content"] for r in results(gz)] == ["q0", "q1", "q2"]

    import pandas as pd

    pq = tmp_path / "c.parquet"
    conv = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] * 2
    pd.DataFrame(conv).to_parquet(pq)
    res = results(pq, fmt="sharegpt")
    assert len(res) == 2 and res[1].row["source"] == f"{pq}:2"
    assert res[0].row["messages"][1] == {"role": "assistant", "content": "a"}


def test_json_file_that_is_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "x.json", [{"instruction": "q", "output": "a"}] * 2)
    assert len(results(path)) == 2


def test_text_chunks_and_gutenberg(tmp_path):
    book = ["The Project Gutenberg EBook of Test", "License stuff", "",
            "*** START OF THIS PROJECT GUTENBERG EBOOK TEST ***", "", "Chapter 1", "",
            "Para one line one.", "Para one line two.", "", "Para two.", "",
            "End of Project Gutenberg's Test", "", "*** END OF THIS PROJECT GUTENBERG EBOOK TEST ***",
            "More license"]
    path = tmp_path / "pg1.txt.gz"
    path.write_bytes(gzip.compress("\r\n".join(book).encode()))
    res = results(path, kind="text", fmt="text")
    assert len(res) == 1
    text = res[0].row["text"]
    assert text == "Chapter 1\n\nPara one line one.\nPara one line two.\n\nPara two."
    assert "Gutenberg" not in text and "\r" not in text
    assert res[0].row["source"] == f"{path}:6"  # the line where the chunk starts
    lines = [line for line in "\r\n".join(book).split("\r\n")]
    assert strip_gutenberg(lines) == (4, 12)

    # merging up to the chunk size; a long paragraph is its own row(s), split at line breaks
    paras = ["a" * 50, "b" * 50, "c" * 50, "\n".join(["d" * 60] * 4)]
    chunks = split_text("\n\n".join(paras), chunk_chars=120)
    assert [c for _, c in chunks] == ["a" * 50 + "\n\n" + "b" * 50, "c" * 50,
                                      "d" * 60, "d" * 60, "d" * 60, "d" * 60]
    assert [line for line, _ in chunks] == [1, 5, 7, 8, 9, 10]


def test_text_folder(tmp_path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha paragraph\n\nsecond", encoding="utf-8")
    (folder / "sub" / "b.txt.gz").write_bytes(gzip.compress(b"beta"))
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    res = results(folder, kind="text", fmt="text")
    assert [r.row["source"] for r in res] == [f"{folder}/a.txt:1", f"{folder}/sub/b.txt.gz:1"]
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TemperingError) as exc:
        results(tmp_path / "empty_dir", kind="text", fmt="text")
    assert "no .txt" in one_line(exc)


def test_text_format_reads_jsonl_text_field(tmp_path):
    res = results(write_jsonl(tmp_path / "t.jsonl", [{"body": "some text"}]), kind="text", fmt="text",
                  fields={"text": "body"})
    assert res[0].row["text"] == "some text"


# ----------------------------------------------------------------------------- malformed rows


@pytest.mark.parametrize("row,reason,needle", [
    ({"instruction": "q"}, "missing_field", "'output' is missing"),
    ({"instruction": "q", "output": 42}, "wrong_type", "'output' must be a string, got number (42)"),
    ({"instruction": ["What", "is"], "output": "a"}, "wrong_type", "'instruction' must be a string, got list"),
    ({"instruction": None, "output": "a"}, "null_field", "'instruction' is null"),
    ({"instruction": "q", "output": "a", "history": "nope"}, "wrong_type", "'history' must be a list"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "bad_structure", "history[0]"),
    ({"instruction": "q", "output": True}, "wrong_type", "got boolean"),
])
def test_alpaca_row_rejections(row, reason, needle):
    res = normalize_record("alpaca", row, file="f.json", index=7)
    assert isinstance(res, Rejected)
    assert res.reason == reason and needle in res.message and res.message.startswith("f.json:7: ")
    assert res.original == row
    q = res.quarantine("validate")
    assert q["source"] == "f.json" and q["row"] == 7 and q["stage"] == "validate" and q["reason"] == reason


@pytest.mark.parametrize("fmt,row,reason,needle", [
    ("messages", {"messages": [{"role": "user"}]}, "missing_field", "messages[0].content"),
    ("messages", {"messages": [{"role": "user", "content": None}]}, "null_field", "messages[0].content"),
    ("messages", {"messages": [{"role": 3, "content": "x"}]}, "wrong_type", "messages[0].role"),
    ("messages", {"messages": "hello"}, "wrong_type", "list of messages"),
    ("messages", {"messages": []}, "bad_structure", "empty list"),
    ("messages", {"messages": ["hi"]}, "wrong_type", "messages[0]"),
    ("sharegpt", {"conversations": [{"from": "human", "value": 5}]}, "wrong_type", "conversations[0].value"),
    ("pairs", {"prompt": "q", "chosen": "a"}, "missing_field", "'rejected'"),
    ("pairs", {"chosen": "a", "rejected": "b"}, "missing_field", "'prompt'"),
    ("pairs", {"prompt": "q", "chosen": 1, "rejected": "b"}, "wrong_type", "'chosen'"),
    ("hh", {"chosen": "no markers", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "bad_structure", "before the first"),
    ("hh", {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}, "bad_structure", "does not end"),
])
def test_other_row_rejections(fmt, row, reason, needle):
    res = normalize_record(fmt, row, file="f.jsonl", index=3)
    assert isinstance(res, Rejected), res
    assert res.reason == reason and needle in res.message


def test_non_object_rows(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "q", "output": "a"}, ["x"], 5, None]), encoding="utf-8")
    res = results(path)
    assert [getattr(r, "reason", "ok") for r in res] == ["ok", "not_an_object", "not_an_object", "not_an_object"]
    assert "row is a list" in res[1].message


def test_invalid_json_line_is_quarantined(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"})
    path.write_text(f"{good}\n{{broken\n\n{good}\n", encoding="utf-8")
    res = results(path)
    assert [type(r).__name__ for r in res] == ["Accepted", "Rejected", "Accepted"]
    assert res[1].reason == "invalid_json" and res[1].index == 2 and res[1].original == "{broken"
    assert f"{path}:2: invalid JSON" in res[1].message
    assert res[2].row["source"] == f"{path}:4"  # line numbers, blank lines counted


def test_bad_utf8_line_and_bom(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good[:-2] + b"\xff\xfe\"}\n")
    res = results(path)
    assert isinstance(res[0], Accepted)  # BOM skipped
    assert res[1].reason == "invalid_encoding" and "not valid UTF-8" in res[1].message
    # BOM in a JSON array and in text
    arr = tmp_path / "a.json"
    arr.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "q", "output": "a"}]).encode())
    assert isinstance(results(arr)[0], Accepted)
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"\xef\xbb\xbfHello")
    assert results(txt, kind="text", fmt="text")[0].row["text"] == "Hello"


# ----------------------------------------------------------------------------- malformed files


def test_file_level_errors(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nope.json", "file not found")
    (tmp_path / "dir.json").mkdir()
    cases["dir"] = (tmp_path / "dir.json", "is a directory")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    cases["empty"] = (empty, "file is empty")
    empty_json = tmp_path / "empty.json"
    empty_json.write_text("", encoding="utf-8")
    cases["empty_json"] = (empty_json, "file is empty")
    trunc = tmp_path / "t.jsonl.gz"
    trunc.write_bytes(gzip.compress(b'{"instruction": "q", "output": "a"}\n' * 200)[:-30])
    cases["truncated"] = (trunc, "truncated gzip")
    trunc_json = tmp_path / "t.json.gz"
    trunc_json.write_bytes(gzip.compress(json.dumps([{"a": 1}] * 100).encode())[:-20])
    cases["truncated_json"] = (trunc_json, "truncated gzip")
    notgz = tmp_path / "n.jsonl.gz"
    notgz.write_bytes(b"plain text, not gzip")
    cases["not_gzip"] = (notgz, "corrupt gzip")
    latin = tmp_path / "l.json"
    latin.write_bytes(b'[{"instruction": "caf\xe9", "output": "a"}]')
    cases["latin1"] = (latin, "line 1: not valid UTF-8")
    utf16 = tmp_path / "u.json"
    utf16.write_bytes(json.dumps([{"instruction": "q", "output": "a"}]).encode("utf-16"))
    cases["utf16"] = (utf16, "UTF-16")
    badjson = tmp_path / "b.json"
    badjson.write_text('[{"instruction": "q",\n "output": }]', encoding="utf-8")
    cases["bad_json_array"] = (badjson, "line 2 column 12: invalid JSON")
    obj = tmp_path / "o.json"
    obj.write_text('{"data": [1]}', encoding="utf-8")
    cases["object"] = (obj, "expected a JSON array of rows (it is an object; the rows may be under 'data')")
    ext = tmp_path / "x.csv"
    ext.write_text("a,b", encoding="utf-8")
    cases["unknown_ext"] = (ext, "unknown file type")
    badpq = tmp_path / "x.parquet"
    badpq.write_bytes(b"not parquet")
    cases["bad_parquet"] = (badpq, "not a readable parquet file")
    for name, (path, needle) in cases.items():
        with pytest.raises(TemperingError) as exc:
            results(path)
        msg = one_line(exc)
        assert str(path) in msg and needle in msg, (name, msg)

    latin_txt = tmp_path / "l.txt"
    latin_txt.write_bytes(b"ok\nline two caf\xe9\n")
    with pytest.raises(TemperingError, match=r"l\.txt: line 2: not valid UTF-8"):
        results(latin_txt, kind="text", fmt="text")


def test_format_must_fit_kind(tmp_path):
    from tempering.formats import check_spec

    with pytest.raises(TemperingError, match="cannot produce 'sft'"):
        check_spec("sft", "hh")
    with pytest.raises(Exception, match="cannot produce"):
        SourceSpec(path="x", kind="text", format="alpaca")
