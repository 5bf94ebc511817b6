"""Run summary: where the promoted model, the metrics and the reports are, and what they say.

    python -m tempering.report            # prints the summary, writes reports/summary.md

The full picture (loss curves, benchmark bars with intervals, every gate reason, example
generations) is the HTML report ``reports/report.html``, written by the ``report`` stage
(``python -m tempering.html_report``); this summary points to it.

Reads only the files stages wrote (``metrics/*.json``, the registry's aliases); used by
``make run`` at the end and by the Prefect flow as a markdown artifact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tempering.io import read_json_or_none, write_text

HTML_REPORT = "reports/report.html"


def summarize(root: str | Path = ".") -> dict:
    root = Path(root)
    metrics = {p.stem: read_json_or_none(p) for p in sorted((root / "metrics").glob("*.json"))}
    promote = metrics.get("promote") or {}
    reports = sorted(str(p.relative_to(root)) for p in (root / "reports").glob("*") if p.is_file()) \
        if (root / "reports").exists() else []
    return {
        "root": str(root.resolve()),
        "metrics": metrics,
        "promoted": bool(promote.get("promoted")),
        "promoted_model": promote.get("model_path"),
        "registry": promote.get("registry"),
        "version": promote.get("version"),
        "reports": reports,
        "html_report": HTML_REPORT if (root / HTML_REPORT).is_file() else None,
    }


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else ("-" if x is None else str(x))


def to_markdown(summary: dict) -> str:
    m = summary["metrics"]
    lines = ["# tempering run summary", ""]
    ev = (m.get("evaluate") or {}).get("benchmarks", {})
    if ev:
        lines += ["| benchmark | role | n | base acc | candidate acc | delta |",
                  "|---|---|---|---|---|---|"]
        for name, b in ev.items():
            lines.append(
                f"| {name} | {b.get('role')} | {b.get('n')} | {_fmt((b.get('base') or {}).get('acc'))} "
                f"| {_fmt((b.get('candidate') or {}).get('acc'))} | {_fmt((b.get('delta') or {}).get('acc'))} |"
            )
        lines.append("")
    gate = m.get("gate")
    if gate:
        lines.append(f"**Gate: {'PASSED' if gate.get('passed') else 'FAILED'}**")
        lines += [f"- {r}" for r in gate.get("reasons", [])]
        lines.append("")
    promote = m.get("promote")
    if promote:
        if promote.get("promoted"):
            lines.append(f"**Promoted** as {promote.get('version')} "
                         f"(alias `{promote.get('alias')}`) in `{promote.get('registry')}`")
        else:
            lines.append("**Not promoted**: " + "; ".join(promote.get("reasons") or []))
        lines.append("")
    for stage in ("validate", "dedup"):
        d = m.get(stage)
        if d and "totals" in d:
            lines.append(f"- {stage}: {json.dumps(d['totals'])}")
    for stage in ("cpt", "sft", "dpo"):
        d = m.get(stage)
        if d and d.get("note"):
            lines.append(f"- {stage}: {d['note']}")
        elif d and d.get("enabled", True) and "steps" in d:
            lines.append(f"- {stage}: {d.get('steps')} steps, last loss {_fmt(d.get('train_loss_last'))}, "
                         f"{_fmt(d.get('tokens_per_s'))} tok/s")
    if summary["reports"]:
        lines += ["", "Reports: " + ", ".join(f"`{r}`" for r in summary["reports"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tempering.report")
    parser.add_argument("--root", default=".")
    parser.add_argument("--out", default="reports/summary.md")
    args = parser.parse_args(argv)
    summary = summarize(args.root)
    md = to_markdown(summary)
    write_text(Path(args.root) / args.out, md)
    print(md)
    root = Path(summary["root"])
    if summary["promoted"]:
        print(f"Promoted model:  {summary['promoted_model'] or summary['registry']}")
    else:
        print("Promoted model:  none this run (see the gate reasons above)")
    print(f"Metrics:         {root / 'metrics'}  (dvc metrics show)")
    print(f"Report:          {root / args.out}")
    html = root / HTML_REPORT
    print(f"HTML report:     {html}" + ("  (open it in a browser)" if html.is_file()
                                        else "  (not written yet: python -m tempering.html_report)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
