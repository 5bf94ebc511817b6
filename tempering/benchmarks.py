"""The evaluation benchmarks, defined once.

- :func:`load_items` reads a benchmark file in any supported layout (``evaluate.benchmarks``:
  tempering, llm-foundry, HellaSwag, PIQA), with lm-eval's own prompt for each shipped set.
- :func:`drift_texts` reads the drift checks' fixed general text set (``evaluate.drift``).
- :func:`dev_view` is the dev split (``evaluate.dev``: dev domain benchmarks and dev drift texts)
  as an ``EvaluateParams`` the scorer reads like the gate's, and :func:`check_dev_disjoint`
  refuses a dev split that shares an item or a text with what the gate reads.
- :func:`decontamination_sets` returns what training data is decontaminated against: every item
  of every local benchmark in ``evaluate.benchmarks`` and ``evaluate.dev``, not only the items a
  run scores, plus the drift texts of both.

``tasks.evaluate`` scores these items; ``tasks.dedup`` decontaminates against the same ones. So
adding a benchmark to ``evaluate.benchmarks`` also protects it from training-data leakage.
"""

from __future__ import annotations

import json
from pathlib import Path

from tempering import TemperingError
from tempering.config import BenchmarkSpec, EvaluateParams


def _open_lines(path: Path) -> list[str]:
    import gzip

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read().splitlines()
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TemperingError(f"{path}: cannot read benchmark file ({type(exc).__name__}: {exc})") from None


def _json_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(_open_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TemperingError(f"{path}: row {n}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise TemperingError(f"{path}: row {n}: expected a JSON object")
        rows.append(row)
    return rows


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess`` (lm_eval/tasks/hellaswag/utils.py); a test compares the two."""
    import re

    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _llmfoundry_prompt(query: str) -> tuple[str, str]:
    """(chat question, lm-eval prompt) of an llm-foundry ``query``.

    ``Question: <stem>`` (ARC ...) -> lm-eval's ``Question: <stem>\nAnswer:``, question = the stem.
    ``Passage: <p>\nQuestion: <q>?`` (BoolQ) -> lm-eval's boolq ``<p>\nQuestion: <q>?\nAnswer:``
    (lm-eval writes no "Passage: "), question = the query as it is.
    """
    if query.startswith("Passage: ") and "\nQuestion: " in query:
        return query, f"{query[len('Passage: '):]}\nAnswer:"
    question = query[len("Question: "):] if query.startswith("Question: ") else query
    return question, f"{query}\nAnswer:"


def _drop_repeats(choices: list, answer):
    """Choices without exact repeats (first kept), and the answer's index among them.

    llm-foundry padded ARC's 3-choice items to 4 by repeating one choice; lm-eval scores the
    original 3. A repeat changes nothing but ties, yet a gold on the second copy could never win.
    """
    if not isinstance(choices, list) or not isinstance(answer, int) or isinstance(answer, bool) \
            or not 0 <= answer < len(choices) or not all(isinstance(c, str) for c in choices):
        return choices, answer  # the checks below name the problem
    unique = list(dict.fromkeys(choices))
    return unique, unique.index(choices[answer])


# Each layout's own name for question, choices and answer (for error messages).
_FIELDS = {"llmfoundry": {"question": "query", "answer": "gold"},
           "hellaswag": {"question": "query", "choices": "endings", "answer": "label"},
           "piqa": {"question": "goal", "choices": "sol1/sol2", "answer": "label"}}


def load_items(spec: BenchmarkSpec) -> list[dict]:
    """A benchmark file in any supported layout -> ``{id, question, prompt, choices, answer}`` rows.

    ``question`` is the chat form (a user turn); ``prompt`` the plain-completion form, exactly the
    context lm-eval's own task of that benchmark builds (``arc_easy``/``arc_challenge``,
    ``boolq``, ``hellaswag`` with its preprocess, ``piqa``; each choice follows after a space).
    ``tests/test_benchmarks_shipped.py`` checks this against lm-eval's task configs.
    """
    path = Path(spec.path)
    if not path.is_file():
        raise TemperingError(f"{path}: benchmark file not found (evaluate.benchmarks: {spec.name})")
    raw = _json_rows(path)
    if spec.format == "piqa":
        labels = [ln.strip() for ln in _open_lines(Path(spec.labels)) if ln.strip()]
        if len(labels) != len(raw):
            raise TemperingError(f"{spec.labels}: {len(labels)} labels for {len(raw)} rows of {path}")
    items = []
    for n, row in enumerate(raw, 1):
        try:
            if spec.format == "tempering":
                question, choices, answer = row["question"], row["choices"], row["answer"]
                prompt = f"Question: {question}\nAnswer:"
            elif spec.format == "llmfoundry":
                query, choices, answer = row["query"], row["choices"], row["gold"]
                if not isinstance(query, str) or not query.strip():
                    raise TemperingError(f"{path}: row {n}: query: expected a non-empty string")
                question, prompt = _llmfoundry_prompt(query)
                choices, answer = _drop_repeats(choices, answer)
            elif spec.format == "hellaswag":
                # lm-eval: preprocess(activity_label + ": " + ctx) and preprocess(ending); the dump's
                # query is already activity_label + ": " + ctx (ctx_b not capitalised, see docs).
                query, choices, answer = row["query"], row["endings"], row["label"]
                if not isinstance(query, str) or not query.strip():
                    raise TemperingError(f"{path}: row {n}: query: expected a non-empty string")
                question = prompt = hellaswag_preprocess(query)
                if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
                    choices = [hellaswag_preprocess(c) for c in choices]
            else:  # piqa
                question, choices = row["goal"], [row["sol1"], row["sol2"]]
                answer = int(labels[n - 1])
                prompt = f"Question: {question}\nAnswer:"
        except KeyError as exc:
            raise TemperingError(f"{path}: row {n}: {exc.args[0]}: missing field (format {spec.format})") from None
        except ValueError:
            raise TemperingError(f"{spec.labels}: row {n}: label: expected 0 or 1") from None
        field = _FIELDS.get(spec.format, {})
        if not isinstance(question, str) or not question.strip():
            raise TemperingError(f"{path}: row {n}: {field.get('question', 'question')}: expected a non-empty string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TemperingError(f"{path}: row {n}: {field.get('choices', 'choices')}: "
                                 "expected a list of at least 2 non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            where = spec.labels if spec.format == "piqa" else path
            raise TemperingError(f"{where}: row {n}: {field.get('answer', 'answer')}: "
                                 f"expected an index into choices (0-{len(choices) - 1})")
        items.append({"id": str(row.get("id", row.get("ind", n - 1))), "question": question, "prompt": prompt,
                      "choices": choices, "answer": answer})
    if not items:
        raise TemperingError(f"{path}: benchmark {spec.name} is empty")
    return items


def drift_texts(cfg: EvaluateParams) -> list[dict]:
    """The fixed general text set of the drift checks (``evaluate.drift.path``), validated."""
    dcfg = cfg.drift
    if not dcfg.path:
        return []
    path = Path(dcfg.path)
    if not path.is_file():
        raise TemperingError(f"{path}: drift text set not found (evaluate.drift.path)")
    rows = _json_rows(path)
    for n, row in enumerate(rows, 1):
        kind = row.get("kind")
        if kind == "text" and isinstance(row.get("text"), str) and row["text"].strip():
            continue
        if kind == "chat" and isinstance(row.get("messages"), list) and row["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in row["messages"]):
            continue
        raise TemperingError(f"{path}: row {n}: kind: expected 'text' with a non-empty text, or 'chat' with messages")
    return rows[: dcfg.n_texts] if dcfg.n_texts else rows


def dev_view(cfg: EvaluateParams) -> EvaluateParams:
    """The dev split as the scorer reads it: ``evaluate`` with the dev benchmarks and dev drift
    texts in place of the gate's (every other knob, backend and precision included, the same)."""
    return cfg.model_copy(update={"benchmarks": cfg.dev.benchmarks, "drift": cfg.dev.drift, "limit": None})


def _item_key(item: dict) -> str:
    return " ".join(str(item["question"]).lower().split()) + "\x1f" + "\x1f".join(
        " ".join(str(c).lower().split()) for c in item["choices"])


def check_dev_disjoint(cfg: EvaluateParams) -> None:
    """Raise when the dev split shares a file, an item (question and choices) or a drift text
    (its text, or the benchmark item it came from) with the benchmarks and drift texts the gate
    reads: a scale chosen on the gate's own items would be certified by the items that chose it."""
    gate_paths = {Path(s.path).resolve() for s in cfg.benchmarks if s.path}
    gate_keys: dict[str, str] = {}
    for spec in cfg.benchmarks:
        if spec.task is None and Path(spec.path).is_file():
            for it in load_items(spec):
                gate_keys.setdefault(_item_key(it), f"{spec.name}:{it['id']}")
    for spec in cfg.dev.benchmarks:
        if Path(spec.path).resolve() in gate_paths:
            raise TemperingError(f"{spec.path}: evaluate.dev.benchmarks: {spec.name} is also a gate benchmark "
                                 "(the dev split must be disjoint from the items the gate scores)")
        for it in load_items(spec):
            hit = gate_keys.get(_item_key(it))
            if hit:
                raise TemperingError(f"{spec.path}: evaluate.dev.benchmarks: {spec.name}: item {it['id']} is "
                                     f"gate item {hit} (the dev split must be disjoint from the gate's items)")
    if not cfg.dev.drift.path:
        return
    if cfg.drift.path and Path(cfg.dev.drift.path).resolve() == Path(cfg.drift.path).resolve():
        raise TemperingError(f"{cfg.dev.drift.path}: evaluate.dev.drift.path is the gate's drift set "
                             "(evaluate.drift.path); the dev texts must be other texts")
    full = {"n_texts": None}
    gate = drift_texts(cfg.model_copy(update={"drift": cfg.drift.model_copy(update=full)})) if cfg.drift.path else []
    texts = {_drift_text(r) for r in gate}
    sources = {str(r["source"]) for r in gate if r.get("source")}
    for row in drift_texts(cfg.model_copy(update={"drift": cfg.dev.drift.model_copy(update=full)})):
        if _drift_text(row) in texts or (row.get("source") and str(row["source"]) in sources):
            raise TemperingError(f"{cfg.dev.drift.path}: evaluate.dev.drift: text {row.get('id')} is also a gate "
                                 "drift text (or comes from the same item)")


def drift_sources(cfg: EvaluateParams) -> set[str]:
    """``<benchmark>:<item id>`` of every item a drift text was made from (gate and dev sets, all
    texts): evaluate never scores those items."""
    out: set[str] = set()
    for dcfg in (cfg.drift, cfg.dev.drift):
        if dcfg.path and Path(dcfg.path).is_file():
            out |= {str(r.get("source")) for r in drift_texts(cfg.model_copy(
                update={"drift": dcfg.model_copy(update={"n_texts": None})}))}
    return out


def _drift_text(row: dict) -> str:
    if row.get("kind") == "chat":
        return "\n".join(m["content"] for m in row["messages"])
    return row["text"]


def decontamination_sets(cfg: EvaluateParams) -> tuple[dict[str, list[dict]], list[str]]:
    """``({name: [{id, question, choices, answer}]}, notes)``: what training rows must not overlap.

    Every item of each local benchmark file (a power-sized or capped run scores only the first N,
    but a later run may score more). The drift texts are ``drift`` (their text as the question, no
    choices). ``optional`` benchmarks absent on this machine and lm-eval hub tasks (``task:``,
    not readable offline) cannot be decontaminated against: each gets a note instead.
    """
    sets: dict[str, list[dict]] = {}
    notes: list[str] = []
    for spec in cfg.benchmarks:
        if spec.task is not None:
            notes.append(f"{spec.name}: lm-eval task {spec.task!r} is not a local file; not decontaminated against")
            continue
        if spec.optional and not Path(spec.path).is_file():
            notes.append(f"{spec.name}: optional and absent ({spec.path}); not decontaminated against")
            continue
        sets[spec.name] = [{"id": it["id"], "question": it["question"], "choices": it["choices"],
                            "answer": it["answer"]} for it in load_items(spec)]
    for spec in cfg.dev.benchmarks:
        if not Path(spec.path).is_file():
            notes.append(f"dev {spec.name}: absent ({spec.path}); not decontaminated against")
            continue
        sets[f"dev_{spec.name}"] = [{"id": it["id"], "question": it["question"], "choices": it["choices"],
                                     "answer": it["answer"]} for it in load_items(spec)]
    for name, dcfg in (("drift", cfg.drift), ("dev_drift", cfg.dev.drift)):
        if not dcfg.path:
            continue
        drift = drift_texts(cfg.model_copy(update={"drift": dcfg.model_copy(update={"n_texts": None})}))
        if drift:
            sets[name] = [{"id": str(r.get("id", n)), "question": _drift_text(r), "choices": []}
                          for n, r in enumerate(drift)]
    return sets, notes
