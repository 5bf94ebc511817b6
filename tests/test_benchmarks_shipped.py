"""The real benchmarks shipped in ``benchmarks/``: hashes and counts against the manifest, the
default params reading only them, and prompt parity with lm-eval's own tasks.

Parity: for each shipped set, lm-eval's OWN task (``arc_easy``, ``arc_challenge``, ``hellaswag``,
``boolq``, ``piqa``, loaded by name from the installed lm-eval with its YAML and ``process_docs``)
is run on docs rebuilt in its upstream Hugging Face dataset's shape from our rows; its requests
(context, continuation) must equal, string for string, the requests lm-eval builds from the task
``tasks.evaluate`` writes for the same file. Only the dataset download is replaced (offline).

What cannot be identical, because the shipped files lack the information (benchmarks/README.md):
- HellaSwag: the dump joins ``ctx_a`` and ``ctx_b``; lm-eval capitalises ``ctx_b``. The doc is
  rebuilt with ``ctx_b = ""``, so everything else (label, ": ", preprocess, endings) is checked.
- BoolQ: SuperGLUE's passages start with "<Wikipedia title> -- "; the llm-foundry copy has no
  title. The doc is rebuilt with the passage as shipped.
- ARC: llm-foundry padded 3-choice items to 4 by repeating a choice; the doc is rebuilt with the
  distinct choices (the upstream item's three).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "benchmarks"
MANIFEST = json.loads((SHIPPED / "MANIFEST.json").read_text())["files"]


def _rows(path: Path) -> list:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------- the files


LM_EVAL_SETS = {"arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq"}


def test_manifest_lists_exactly_the_shipped_data_files():
    """Every data file in benchmarks/ has a manifest entry and every entry a file (scripts aside)."""
    on_disk = {p.name for p in SHIPPED.iterdir()
               if p.is_file() and p.name not in {"README.md", "MANIFEST.json"} and p.suffix != ".py"}
    assert on_disk == set(MANIFEST)
    assert {e.get("benchmark") for e in MANIFEST.values()} >= LM_EVAL_SETS


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_shipped_file_matches_its_manifest_entry(name):
    entry, raw = MANIFEST[name], (SHIPPED / name).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == entry["sha256"], f"{name}: sha256 of the file"
    content = gzip.decompress(raw) if name.endswith(".gz") else raw
    if name.endswith(".gz"):
        assert raw[4:8] == b"\0\0\0\0", f"{name}: gzip mtime is not 0 (not gzip -n)"
    if "content_sha256" in entry:
        assert hashlib.sha256(content).hexdigest() == entry["content_sha256"], f"{name}: sha256 of the content"
        assert len(content) == entry["content_bytes"], f"{name}: content size"
    if "items" in entry:
        lines = [ln for ln in content.decode("utf-8").splitlines() if ln.strip()]
        assert len(lines) == entry["items"], f"{name}: item count"
    if entry.get("upstream_blob"):  # byte for byte the upstream file: its git blob id
        blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        assert blob == entry["upstream_blob"], f"{name}: not the upstream blob"
    if entry.get("benchmark") in LM_EVAL_SETS:
        for key in ("lm_eval_task", "format", "layout", "licence", "source", "trimming", "content_sha256", "items"):
            assert entry.get(key), f"{name}: manifest field {key} is empty"


def test_shipped_layouts_and_counts():
    arc_e = _rows(SHIPPED / "arc_easy_test.llmfoundry.jsonl.gz")
    arc_c = _rows(SHIPPED / "arc_challenge_test.llmfoundry.jsonl.gz")
    boolq = _rows(SHIPPED / "boolq_val.llmfoundry.jsonl.gz")
    hella = _rows(SHIPPED / "hellaswag_val_sample3000.jsonl.gz")
    piqa = _rows(SHIPPED / "piqa_valid.jsonl.gz")
    with gzip.open(SHIPPED / "piqa_valid-labels.lst.gz", "rt") as fh:
        piqa_labels = fh.read().split()
    assert (len(arc_e), len(arc_c), len(boolq), len(hella), len(piqa)) == (2376, 1172, 3270, 3000, 1838)
    assert all(set(r) == {"query", "choices", "gold"} and r["query"].startswith("Question: ")
               for r in arc_e + arc_c)
    assert all(r["query"].startswith("Passage: ") and r["choices"] == ["no", "yes"] for r in boolq)
    assert sum(r["gold"] for r in boolq) == 2033  # the BoolQ dev split: 62.2% yes
    # a seeded random sample (both ActivityNet and WikiHow items), in sample order
    assert [r["ind"] for r in hella] == random.Random(0).sample(range(10042), 3000)
    assert len(piqa_labels) == len(piqa) and set(piqa_labels) == {"0", "1"}


def test_default_params_never_read_shared_data():
    from tempering.config import load_params

    text = (ROOT / "params.yaml").read_text()
    assert "../shared" not in text and "shared/data" not in text
    params = load_params(ROOT / "params.yaml")
    shipped = [b for b in params.evaluate.benchmarks if b.path and b.path.startswith("benchmarks/")]
    assert {b.name for b in shipped} == {"arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq"}
    for b in shipped:
        assert not b.optional, f"{b.name}: shipped benchmarks are not optional"
        for rel in filter(None, (b.path, b.labels)):
            path = (ROOT / rel).resolve()
            assert path.is_file() and path.parent == SHIPPED, f"{b.name}: {rel} is not a shipped file"
            assert path.name in MANIFEST and MANIFEST[path.name]["benchmark"] == b.name


# ----------------------------------------------------------------------------- lm-eval parity

# Upstream Hugging Face shape of one shipped row (doc index i): what lm-eval's task reads.


def _arc_doc(i: int, row: dict) -> dict:
    choices = list(dict.fromkeys(row["choices"]))  # llm-foundry's padding repeat removed
    labels = "ABCDE"[: len(choices)]
    return {"id": f"row-{i}", "question": row["query"][len("Question: "):],
            "choices": {"text": choices, "label": list(labels)},
            "answerKey": labels[choices.index(row["choices"][row["gold"]])]}


def _boolq_doc(i: int, row: dict) -> dict:
    passage, question = row["query"][len("Passage: "):].rsplit("\nQuestion: ", 1)
    assert question.endswith("?")
    return {"question": question[:-1], "passage": passage, "idx": i, "label": row["gold"]}


def _hellaswag_doc(i: int, row: dict) -> dict:
    label, ctx = row["query"].split(": ", 1)
    return {"ind": row["ind"], "activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
            "endings": row["endings"], "source_id": "", "split": "val", "split_type": "", "label": str(row["label"])}


def _piqa_doc(i: int, row: dict, label: str) -> dict:
    return {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)}


def _upstream_docs(spec) -> list[dict]:
    rows = _rows(ROOT / spec.path)
    if spec.name == "piqa":
        with gzip.open(ROOT / spec.labels, "rt") as fh:
            labels = fh.read().split()
        return [_piqa_doc(i, r, labels[i]) for i, r in enumerate(rows)]
    build = {"arc_easy": _arc_doc, "arc_challenge": _arc_doc, "boolq": _boolq_doc, "hellaswag": _hellaswag_doc}
    return [build[spec.name](i, r) for i, r in enumerate(rows)]


def _sample(spec) -> set[int]:
    """File rows compared: the first 100 (what the default run scores), every 5th, and the odd ones
    (ARC's padded items, the BoolQ passage that itself contains "\nQuestion: ")."""
    rows = _rows(ROOT / spec.path)
    odd = {i for i, r in enumerate(rows) if len(set(r.get("choices", ()))) < len(r.get("choices", ()))
           or r.get("query", "").count("\nQuestion: ") > 1}
    return set(range(100)) | set(range(0, len(rows), 5)) | odd


def _requests(task, row_of, keep: set[int]) -> dict[int, tuple[list[tuple[str, str]], int]]:
    """File row -> lm-eval's (context, continuation) pairs and gold index for that doc, built the way
    ``Task.build_all_requests`` builds them for simple_evaluate (zero-shot, no chat template)."""
    task.set_config("num_fewshot", 0)
    out = {}
    for pos, doc in enumerate(task.eval_docs):
        row = row_of(pos, doc)
        if row not in keep:
            continue
        ctx = task.fewshot_context(doc, num_fewshot=0, gen_prefix=task.doc_to_prefix(doc))
        insts = task.construct_requests(doc=doc, ctx=ctx, metadata=(task.config.task, pos, 1))
        out[row] = ([tuple(x.arguments) for x in sorted(insts, key=lambda x: x.idx)], task.doc_to_target(doc))
    return out


@pytest.fixture(scope="module")
def lm_eval_tasks():
    """lm-eval's own task objects for the shipped benchmarks, on rebuilt docs (no download)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    from tempering.config import load_params

    specs = {b.name: b for b in load_params(ROOT / "params.yaml").evaluate.benchmarks
             if b.path and b.path.startswith("benchmarks/")}
    docs = {name: _upstream_docs(spec) for name, spec in specs.items()}
    original = ConfigurableTask.download

    def download(self, dataset_kwargs=None, **kwargs):
        if self.config.task not in docs:
            return original(self, dataset_kwargs, **kwargs)
        import datasets

        split = datasets.Dataset.from_list(docs[self.config.task])
        names = {self.config.training_split, self.config.validation_split, self.config.test_split} - {None}
        self.dataset = datasets.DatasetDict({s: split for s in names})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConfigurableTask, "download", download)
        loaded = TaskManager().load(list(specs))["tasks"]
    yield specs, loaded


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq"])
def test_prompts_match_lm_eval_own_task(lm_eval_tasks, name, tmp_path):
    from lm_eval.tasks import TaskManager

    from tempering.scorecard import TASK_PREFIX, bundle, task_config
    from tempering.config import EvaluateParams

    specs, theirs_tasks = lm_eval_tasks
    spec = specs[name].model_copy(update={"limit": None, "path": str(ROOT / specs[name].path),
                                          "labels": str(ROOT / specs[name].labels) if specs[name].labels else None})
    info = bundle(EvaluateParams(benchmarks=(spec,), cache_dir=str(tmp_path / "cache")))
    (tmp_path / f"{name}.yaml").write_text(
        yaml.safe_dump(task_config(spec, info["benchmarks"][name]["data_file"])))
    ours_task = TaskManager(include_path=str(tmp_path), include_defaults=False).load([TASK_PREFIX + name])
    # Our rows carry their file row as id (HellaSwag: ind, its place in the official file, as
    # the shipped sample is in sample order); evaluate may leave some rows out (those the drift
    # texts come from), so rows are matched by id, not position.
    rows = _rows(ROOT / specs[name].path)
    ident = (lambda i: rows[i]["ind"]) if name == "hellaswag" else (lambda i: i)
    keep = {ident(i) for i in _sample(spec)}
    ours = _requests(ours_task["tasks"][TASK_PREFIX + name], lambda pos, doc: int(doc["id"]), keep)
    theirs = _requests(theirs_tasks[name], lambda pos, doc: ident(pos), keep)
    assert len(theirs) == len(keep) and len(ours) >= 0.9 * len(keep), (len(ours), len(keep))
    assert {ident(i) for i in range(100)} <= set(ours)  # the first items, which every run scores
    for row in sorted(ours):
        assert ours[row] == theirs[row], f"{name}: row {row}: ours {ours[row]!r} != lm-eval {theirs[row]!r}"
    # The comparison is not vacuous: lm-eval's own prompt shapes.
    ctx, cont = theirs[ident(0)][0][0]
    assert cont.startswith(" ") and (name == "hellaswag" or ctx.endswith("\nAnswer:"))


def test_hellaswag_preprocess_is_lm_evals():
    """Our copy of lm-eval's HellaSwag preprocess gives its output on WikiHow-style raw text."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    from tempering.benchmarks import hellaswag_preprocess

    samples = ["Home and Garden: [header] How to paint a fence [title] Sand it. [step] Use  a block.",
               " Sports: a man [substeps] runs [title] fast  [step] ", "plain text", "[a [b] c] d"]
    for text in samples:
        assert hellaswag_preprocess(text) == preprocess(text)


def test_boolq_prompt_differs_from_llm_foundry_query_only_by_the_passage_label(tmp_path):
    """The old prompt was the llm-foundry query + "\\nAnswer:"; lm-eval's has no "Passage: "."""
    from tempering.benchmarks import load_items
    from tempering.config import BenchmarkSpec

    items = load_items(BenchmarkSpec(name="boolq", path=str(SHIPPED / "boolq_val.llmfoundry.jsonl.gz"),
                                     format="llmfoundry", role="general", chat=False))
    rows = _rows(SHIPPED / "boolq_val.llmfoundry.jsonl.gz")
    assert all("Passage: " + it["prompt"] == row["query"] + "\nAnswer:" for it, row in zip(items, rows))
