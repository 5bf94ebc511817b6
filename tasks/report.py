"""Stage ``report``: one self-contained HTML report of the run, after ``promote``.

    python -m tasks.report --root . --out reports/report.html

Reads only what the earlier stages wrote (``metrics/*.json``, ``models/<stage>/meta.json``, the
dvclive TSVs) and renders :mod:`tempering.html_report`: the gate verdict with every reason, data
counts by reason, training loss curves, benchmark bars (base vs candidate vs production with
intervals) and example generations. Inline CSS and SVG only: it opens from disk with no network.
A missing input is a section that says "not run", never a failed stage. Written atomically.
"""

from __future__ import annotations

import argparse

from tempering import html_report
from tempering.cli import stage_main
from tempering.config import Params

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ()


def run(params: Params, root: str = ".", out: str = html_report.DEFAULT_OUT) -> dict:
    parts = html_report.sections(root)
    path = html_report.write(root, out)
    return {"out": str(path), "sections": {s.id: s.status for s in parts}}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=".", help="project root holding metrics/, models/, dvclive/")
    parser.add_argument("--out", default=html_report.DEFAULT_OUT, help="HTML file (relative to --root)")


def main(argv=None) -> int:
    return stage_main("report", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
