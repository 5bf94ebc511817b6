"""One self-contained HTML report per run, rendered from the files the stages wrote.

    python -m tempering.html_report --root . --out reports/report.html

Sections: the gate verdict (at the top), data counts by reason (``metrics/validate.json``,
``metrics/dedup.json``), training loss curves (``models/<stage>/meta.json`` ``loss_curve``, or the
dvclive TSVs under ``dvclive/<stage>/plots/metrics`` when a meta file has none), benchmark bars
base vs candidate vs production with 95% intervals (``metrics/evaluate.json``), every gate check
with its paired delta interval and reason (``metrics/gate.json``), the promotion
(``metrics/promote.json``) and example generations (``models/export/meta.json`` ``samples``, plus
``metrics/evaluate.json`` ``generations`` when the evaluate stage recorded some). The interpolation
section also plots the project's replay share x alpha sweep (``bench/results-frontier.json``,
written by ``bench/bench_frontier.py``) when that file is there.

This module owns reading those inputs (each through its typed record, :mod:`tempering.records`)
and deciding each section's status; the page itself is jinja2 templates with autoescape
(``tempering/templates/report.html.j2`` and ``report/*.html.j2``, CSS in ``report.css``, through
:mod:`tempering.templating`) and the charts are :mod:`tempering.charts`. The page is plain HTML
with inline CSS and inline SVG charts: no JavaScript, no fonts, images or styles from the network;
it opens from disk. A missing, unreadable or malformed input never fails the report: its section
says "not run" and names the file it looked for (and, when malformed, the field). Everything here
is a pure function of the files under ``root`` (plus the time printed in the header).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from markupsafe import Markup

from tempering import records, templating
from tempering.charts import MODELS, fmt, is_num
from tempering.io import write_text

DEFAULT_OUT = "reports/report.html"
TRAIN_STAGES = ("cpt", "sft", "dpo")


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class FrontierRun(records.Record):
    """One replay share of the sweep: the export stage's interpolation record for it. (The sweep's
    records live here, not in :mod:`tempering.records`, because only the report reads them: every
    stage depends on that module, and a change there would re-run the whole DAG.)"""

    share: float = 0.0
    interpolation: records.Interpolation | None = None
    source: str = "experiment"   # "experiment" (dvc exp run) or "workspace" (the run already there)
    seconds: float | None = None

    @classmethod
    def _read(cls, r: records._Reader) -> FrontierRun:
        interp = r.get("interpolation", "dict", required=True)
        return cls(r.data, share=r.get("share", "num", required=True),
                   interpolation=records.Interpolation._read(r.child("interpolation", interp)),
                   source=r.get("source", "str", default="experiment"), seconds=r.get("seconds", "num"))


@dataclass(frozen=True)
class FrontierSweep(records.Record):
    """``bench/results-frontier.json`` (bench/bench_frontier.py): replay share x alpha, as DVC
    experiments; where and when it was measured."""

    FILE: ClassVar[str] = "bench/results-frontier.json"
    runs: tuple[FrontierRun, ...] = ()
    git_sha: str | None = None
    date: str | None = None
    params: dict = field(default_factory=dict)

    @classmethod
    def _read(cls, r: records._Reader) -> FrontierSweep:
        runs = r.get("records", "list", required=True)
        return cls(r.data, runs=tuple(FrontierRun._read(r.at("records", i, x)) for i, x in enumerate(runs)),
                   git_sha=r.get("git_sha", "str"), date=r.get("date", "str"),
                   params=r.get("params", "dict", default={}))



@dataclass(frozen=True)
class Loaded:
    """One input file: its record, or why there is none (``missing`` / ``unreadable: ...`` /
    ``malformed: <file>: <field>: ...``)."""

    path: str
    data: Any = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.data is not None


def load(root: Path, rel: str, record: type[records.Record] | None = None) -> Loaded:
    """Read ``root/rel`` as JSON, through ``record`` when given (its shape checked)."""
    path = root / rel
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Loaded(rel, problem="missing")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Loaded(rel, problem=f"unreadable ({exc.__class__.__name__}: {exc})")
    if record is None:
        return Loaded(rel, data)
    try:
        return Loaded(rel, record.from_dict(data, rel))
    except records.RecordError as exc:
        return Loaded(rel, problem=f"malformed ({exc})")


def read_tsv_curve(folder: Path) -> list[dict]:
    """The loss column of a dvclive TSV (``step``, ``loss``) under ``folder``, as [{step, loss}]."""
    candidates = sorted(folder.rglob("loss.tsv")) if folder.is_dir() else []
    for tsv in candidates:
        try:
            with open(tsv, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
        except OSError:
            continue
        col = next((c for c in (rows[0] if rows else {}) if c and c.endswith("loss")), None)
        if not col:
            continue
        curve = []
        for row in rows:
            try:
                curve.append({"step": int(float(row["step"])), "loss": float(row[col])})
            except (KeyError, TypeError, ValueError):
                continue
        if curve:
            return curve
    return []


def loss_curve(root: Path, stage: str) -> tuple[list[dict], str | None]:
    """A stage's per-step training loss and where it came from (meta.json first, then dvclive)."""
    meta = load(root, f"models/{stage}/meta.json")
    if meta.ok and isinstance(meta.data, dict):
        curve = [p for p in meta.data.get("loss_curve") or []
                 if isinstance(p, dict) and is_num(p.get("step")) and is_num(p.get("loss"))]
        if curve:
            return curve, meta.path
    live = f"dvclive/{stage}/plots/metrics"
    curve = read_tsv_curve(root / live)
    return (curve, live) if curve else ([], None)


# ----------------------------------------------------------------------------- view helpers

# Field order for an example: the prompt, the reference, then outputs (text), then scores, ids last.
_PROMPT_KEYS = ("prompt", "question", "input", "instruction")
_REF_KEYS = ("reference", "target", "expected", "gold")


def example_rows(ex: dict) -> list[tuple[str, Any]]:
    """An example's fields in reading order (a chat transcript as one ``role: content`` text)."""
    flat: list[tuple[str, Any]] = []
    for k, v in ex.items():
        if isinstance(v, dict):
            flat += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
        elif isinstance(v, list) and all(isinstance(m, dict) and "content" in m for m in v):
            flat.append((k, "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in v)))
        else:
            flat.append((k, v))

    def rank(item: tuple[str, Any]) -> int:
        k = item[0].split(".")[0].lower()
        if k in _PROMPT_KEYS:
            return 0
        if k in _REF_KEYS:
            return 1
        if k in ("id", "doc_id"):
            return 4
        return 2 if isinstance(item[1], str) else 3
    return sorted(flat, key=rank)


def ci_text(ci: tuple[float, float] | None) -> str:
    return f"[{fmt(ci[0], signed=True)}, {fmt(ci[1], signed=True)}]" if ci else "–"


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    status: str   # ok | partial | not run
    body: str


def _status(have: int, of: int) -> str:
    return "ok" if have == of else ("partial" if have else "not run")


def _overview(ins: dict[str, Loaded]) -> str:
    return "ok" if ins["gate"].ok else "not run"


def _data(ins: dict[str, Loaded]) -> str:
    return _status(ins["validate"].ok + ins["dedup"].ok, 2)


def _training(ins: dict[str, Loaded]) -> str:
    return _status(sum(ins[s].ok for s in TRAIN_STAGES), len(TRAIN_STAGES))


def _interpolation(ins: dict[str, Loaded]) -> str:
    return "ok" if ins["export"].ok else "not run"


def _benchmarks(ins: dict[str, Loaded]) -> str:
    return "ok" if ins["evaluate"].ok and ins["evaluate"].data.benchmarks else "not run"


def _gate(ins: dict[str, Loaded]) -> str:
    return "ok" if ins["gate"].ok else "not run"


def _promotion(ins: dict[str, Loaded]) -> str:
    return "ok" if ins["promote"].ok else "not run"


def _generations(ins: dict[str, Loaded]) -> str:
    ev, meta = ins["evaluate"], ins["export_meta"]
    have = ev.ok and (ev.data.generations or (ev.data.sft_heldout and ev.data.sft_heldout.rows))
    return "ok" if have or (meta.ok and meta.data.samples) else "not run"


SECTIONS = (("verdict", "Verdict", _overview), ("data", "Data", _data), ("training", "Training", _training),
            ("interpolation", "Interpolation (learn / forget)", _interpolation),
            ("benchmarks", "Benchmarks", _benchmarks), ("gate", "Gate", _gate),
            ("promotion", "Promotion", _promotion), ("generations", "Example generations", _generations))

INPUTS = {"validate": ("metrics/validate.json", records.ValidateRecord),
          "dedup": ("metrics/dedup.json", records.DedupRecord),
          **{s: (f"metrics/{s}.json", records.TrainRecord) for s in TRAIN_STAGES},
          "export": ("metrics/export.json", records.ExportRecord),
          "evaluate": ("metrics/evaluate.json", records.EvaluateRecord),
          "gate": ("metrics/gate.json", records.GateRecord),
          "promote": ("metrics/promote.json", records.PromoteRecord),
          "export_meta": ("models/export/meta.json", records.ExportMeta),
          # the project's last replay share x alpha sweep (bench/bench_frontier.py): committed, so
          # a clone's report shows the trade-off as measured on the default data
          "frontier": (FrontierSweep.FILE, FrontierSweep)}


def inputs(root: str | Path) -> dict[str, Loaded]:
    """Every file the report reads, each through its record."""
    return {key: load(Path(root), rel, rec) for key, (rel, rec) in INPUTS.items()}


def sections(root: str | Path = ".", *, max_examples: int = 8) -> list[Section]:
    """Every section of the report, each from the files its stages wrote (missing ones: not run)."""
    root = Path(root)
    ins = inputs(root)
    curves = {s: loss_curve(root, s) for s in TRAIN_STAGES}
    out = []
    for sid, title, status in SECTIONS:
        try:
            body = templating.render(f"report/{sid}.html.j2", ins=ins, curves=curves, max_examples=max_examples,
                                     MODELS=MODELS, TRAIN_STAGES=TRAIN_STAGES, example_rows=example_rows,
                                     ci_text=ci_text)
            out.append(Section(sid, title, status(ins), body.strip()))
        except Exception as exc:  # a section that fails to render costs that section, never the report
            out.append(Section(sid, title, "not run", str(Markup('<p class="not-run"><strong>not rendered</strong>: '
                                                                  '{}: {}</p>').format(exc.__class__.__name__, exc))))
    return out


def render(root: str | Path = ".", *, max_examples: int = 8, generated_at: str | None = None) -> str:
    """The whole report as one self-contained HTML string."""
    root = Path(root)
    parts = sections(root, max_examples=max_examples)
    meta = load(root, *INPUTS["export_meta"])
    return templating.render(
        "report.html.j2", css=Markup(templating.read_static("report.css")), root=str(root.resolve()),
        when=generated_at or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        git_sha=meta.data.git_sha if meta.ok else None,
        sections=[dict(id=s.id, title=s.title, status=s.status, body=Markup(s.body)) for s in parts])


def write(root: str | Path = ".", out: str | Path = DEFAULT_OUT, *, max_examples: int = 8) -> Path:
    """Render and write atomically; ``out`` is relative to ``root`` unless absolute."""
    target = Path(root) / out
    return write_text(target, render(root, max_examples=max_examples))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tempering.html_report", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project root holding metrics/, models/, dvclive/")
    parser.add_argument("--out", default=DEFAULT_OUT, help="HTML file to write (relative to --root)")
    parser.add_argument("--max-examples", type=int, default=8, help="generation examples shown per group")
    args = parser.parse_args(argv)
    path = write(args.root, args.out, max_examples=args.max_examples)
    print(f"HTML report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
