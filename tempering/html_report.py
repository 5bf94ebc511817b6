"""One self-contained HTML report per run, rendered from the files the stages wrote.

    python -m tempering.html_report --root . --out reports/report.html

Sections: the gate verdict (at the top), data counts by reason (``metrics/validate.json``,
``metrics/dedup.json``), training loss curves (``models/<stage>/meta.json`` ``loss_curve``, or the
dvclive TSVs under ``dvclive/<stage>/plots/metrics`` when a meta file has none), benchmark bars
base vs candidate vs production with 95% intervals (``metrics/evaluate.json``), every gate check
with its paired delta interval and reason (``metrics/gate.json``), the promotion
(``metrics/promote.json``) and example generations (``models/export/meta.json`` ``samples``, plus
``metrics/evaluate.json`` ``generations`` when the evaluate stage recorded some).

The page is plain HTML with inline CSS and inline SVG charts: no JavaScript, no fonts, images or
styles from the network; it opens from disk. A missing input never fails the report: its section
says "not run" and names the file it looked for. Everything here is a pure function of the files
under ``root`` (plus the time printed in the header).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tempering.io import write_text

DEFAULT_OUT = "reports/report.html"
TRAIN_STAGES = ("cpt", "sft", "dpo")
MODELS = ("base", "candidate", "production")
COLORS = {"base": "#8a94a6", "candidate": "#2563eb", "production": "#d97706"}
PASS, FAIL, NONE = "#15803d", "#b91c1c", "#6b7280"
Z95 = 1.959963984540054


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Loaded:
    """One input file: its data, or why there is none (``missing`` / ``unreadable: ...``)."""

    path: str
    data: Any = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.data is not None


def load(root: Path, rel: str) -> Loaded:
    path = root / rel
    try:
        return Loaded(rel, json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return Loaded(rel, problem="missing")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Loaded(rel, problem=f"unreadable ({exc.__class__.__name__}: {exc})")


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
                 if isinstance(p, dict) and _num(p.get("step")) and _num(p.get("loss"))]
        if curve:
            return curve, meta.path
    live = f"dvclive/{stage}/plots/metrics"
    curve = read_tsv_curve(root / live)
    return (curve, live) if curve else ([], None)


# ----------------------------------------------------------------------------- formatting


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def fmt(x: Any, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:+d}" if signed else f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 1000:
            return f"{x:+,.1f}" if signed else f"{x:,.1f}"
        return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return str(x)


def pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if _num(x) else "–"


def not_run(what: str, loaded: Loaded | None = None, hint: str = "") -> str:
    why = ""
    if loaded is not None:
        why = f" (<code>{esc(loaded.path)}</code> {esc(loaded.problem or 'is empty')})"
    return f'<p class="not-run"><strong>not run</strong>: {esc(what)}{why}{esc(hint)}</p>'


def table(headers: list[str], rows: list[list[str]], cls: str = "", row_cls: list[str] | None = None) -> str:
    """A table of already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        rc = f' class="{row_cls[i]}"' if row_cls and row_cls[i] else ""
        body.append(f"<tr{rc}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` measured on ``n`` items."""
    if n <= 0:
        return (p, p)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, t = [], first
    while t <= hi + 1e-9:
        out.append(round(t, 10))
        t += step
    return out


# ----------------------------------------------------------------------------- charts (inline SVG)


def _svg_open(cls: str, title: str, width: int, height: int) -> list[str]:
    """The opening of an inline chart: the svg element (accessible name, size) and its title."""
    return [f'<svg class="chart {cls}" role="img" aria-label="{esc(title)}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
            f"<title>{esc(title)}</title>"]


def _y_grid(y0: float, y1: float, sy, ml: float, w: float) -> list[str]:
    """Horizontal grid lines with their tick labels on the left."""
    return [f'<line class="grid" x1="{ml}" x2="{ml + w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
            f'<text class="tick" x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
            for t in _ticks(y0, y1)]


def _axes(ml: float, mt: float, w: float, h: float, height: int, x_label: str, y_label: str) -> list[str]:
    """The x and y axis lines and their labels (the y label rotated)."""
    return [f'<line class="axis" x1="{ml}" x2="{ml + w}" y1="{mt + h}" y2="{mt + h}"/>'
            f'<line class="axis" x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + h}"/>',
            f'<text class="axis-label" x="{ml + w / 2:.0f}" y="{height - 4}" text-anchor="middle">{x_label}</text>'
            f'<text class="axis-label" x="12" y="{mt + h / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 12 {mt + h / 2:.0f})">{y_label}</text>']


def svg_line_chart(points: list[dict], *, title: str, width: int = 560, height: int = 220,
                   color: str = "#2563eb") -> str:
    """A loss curve: steps on x, loss on y, one native tooltip per point."""
    pts = sorted((float(p["step"]), float(p["loss"])) for p in points)
    ml, mr, mt, mb = 56, 16, 14, 36
    w, h = width - ml - mr, height - mt - mb
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.05, 0.05)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return mt + (1 - (y - y0) / (y1 - y0)) * h

    parts = _svg_open("loss-chart", title, width, height) + _y_grid(y0, y1, sy, ml, w)
    for t in _ticks(x0, x1, 6):
        if float(t).is_integer():
            parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{mt + h + 16}" text-anchor="middle">{int(t)}</text>')
    parts += _axes(ml, mt, w, h, height, "step", "loss")
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    parts.append(f'<polyline class="curve" fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
    if len(pts) <= 200:
        for x, y in pts:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                         f"<title>step {x:g}: loss {y:.4f}</title></circle>")
    parts.append("</svg>")
    return "".join(parts)


# Advance width per character of the chart's label fonts (11 px labels, 10 px sublabels), taken
# from DejaVu Sans, the widest of the stack's fallbacks, so an estimate that fits, fits.
LABEL_CHAR_PX, SUBLABEL_CHAR_PX = 6.9, 6.3
LABEL_ANGLE = 40  # degrees: labels that do not fit side by side are drawn rotated by this much


def svg_frontier(points: list[dict], chosen: float | None, *, kl_limit: float | None = None,
                 gate_point: tuple[float, float] | None = None, width: int = 560, height: int = 260) -> str:
    """The learn / forget curve of the interpolation sweep: dev KL from the base (x) against dev
    domain gain (y), one point per alpha joined in alpha order, the kept one ringed, the gate's KL
    limit dashed, and (when evaluated) the kept model's gate-set numbers as a square."""
    pts = [(float(p["kl"]), float(p["gain"]), float(p["alpha"])) for p in points]
    ml, mr, mt, mb = 56, 16, 14, 40
    w, h = width - ml - mr, height - mt - mb
    xs = [x for x, _, _ in pts] + ([kl_limit] if kl_limit is not None else []) + \
        ([gate_point[0]] if gate_point else []) + [0.0]
    ys = [y for _, y, _ in pts] + ([gate_point[1]] if gate_point else []) + [0.0]
    x0, x1 = 0.0, max(xs) * 1.1 or 1.0
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return mt + (1 - (y - y0) / (y1 - y0)) * h

    title = "Interpolation sweep: dev domain gain against dev KL from the base, one point per alpha"
    parts = _svg_open("frontier-chart", title, width, height) + _y_grid(y0, y1, sy, ml, w)
    for t in _ticks(x0, x1, 6):
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{mt + h + 16}" text-anchor="middle">{t:g}</text>')
    parts += _axes(ml, mt, w, h, height, "dev KL(candidate ‖ base), nats/token", "dev domain gain")
    if kl_limit is not None:
        parts.append(f'<line class="threshold" x1="{sx(kl_limit):.1f}" x2="{sx(kl_limit):.1f}" y1="{mt}" '
                     f'y2="{mt + h}" stroke="#b91c1c" stroke-dasharray="4 3"><title>gate.max_kl {kl_limit:g}</title></line>')
    ordered = sorted(pts, key=lambda p: p[2])
    parts.append('<polyline class="curve" fill="none" stroke="#2563eb" stroke-width="2" points="'
                 + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in ordered) + '"/>')
    for x, y, a in ordered:
        kept = chosen is not None and abs(a - chosen) < 1e-12
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{6 if kept else 3.5}" '
                     f'fill="{"#ffffff" if kept else "#2563eb"}" stroke="#2563eb" stroke-width="2">'
                     f"<title>alpha {a:g}: gain {y:+.3f}, KL {x:.3f}{' (kept)' if kept else ''}</title></circle>"
                     f'<text class="tick" x="{sx(x) + 7:.1f}" y="{sy(y) - 7:.1f}">α {a:g}</text>')
    if gate_point:
        gx, gy = gate_point
        parts.append(f'<rect x="{sx(gx) - 4:.1f}" y="{sy(gy) - 4:.1f}" width="8" height="8" fill="#059669">'
                     f"<title>the kept model on the gate's own items and texts: gain {gy:+.3f}, KL {gx:.3f}</title></rect>")
    parts.append("</svg>")
    return "".join(parts)


def _axis_labels(rows: list[dict]) -> tuple[list[str], list[str]]:
    return ([str(r["name"]) for r in rows], [f"{r.get('role') or ''} · n={r.get('n')}" for r in rows])


def svg_benchmark_bars(rows: list[dict], metric: str, *, width: int = 720, height: int = 280) -> str:
    """Grouped bars per benchmark (base, candidate, production) with 95% Wilson whiskers.

    Axis labels sit side by side when each fits its group's width; otherwise every label (name,
    role and n in one line) is rotated by ``LABEL_ANGLE`` and the chart grows downwards to hold
    it, so long names (``general_knowledge`` beside ``general_arithmetic``) never overlap."""
    present = [m for m in MODELS if any(_num(r.get(m)) for r in rows)]
    ml, mr, mt, mb = 48, 16, 30, 44
    w, h = width - ml - mr, height - mt - mb
    group = w / max(1, len(rows))
    names, subs = _axis_labels(rows)
    widest = max([len(n) * LABEL_CHAR_PX for n in names] + [len(t) * SUBLABEL_CHAR_PX for t in subs] + [0])
    rotate = widest > group - 8
    if rotate:
        lengths = [len(f"{n} · {t}") * LABEL_CHAR_PX for n, t in zip(names, subs)]
        cos, sin = math.cos(math.radians(LABEL_ANGLE)), math.sin(math.radians(LABEL_ANGLE))
        mb = 24 + int(max(lengths) * sin) + 8
        height = mt + h + mb
        for _ in range(4):  # widen the left margin until the first labels' tails fit (group shrinks)
            group = (width - ml - mr) / max(1, len(rows))
            need = max(L * cos - (i + 0.5) * group for i, L in enumerate(lengths)) + 6
            if need <= ml:
                break
            ml = int(math.ceil(need))
        w = width - ml - mr
        group = w / max(1, len(rows))
    bar = min(48.0, group * 0.8 / max(1, len(present)))

    def sy(v: float) -> float:
        return mt + (1 - v) * h

    parts = [f'<svg class="chart bench-chart" role="img" aria-label="benchmark {esc(metric)}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{esc(metric)} per benchmark: base vs candidate vs production (95% Wilson intervals)</title>"]
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line class="grid" x1="{ml}" x2="{ml + w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
                     f'<text class="tick" x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    lx = ml
    for m in present:
        parts.append(f'<rect x="{lx}" y="8" width="12" height="12" fill="{COLORS[m]}"/>'
                     f'<text class="legend" x="{lx + 16}" y="18">{m}</text>')
        lx += 110
    for gi, r in enumerate(rows):
        gx = ml + gi * group + (group - bar * len(present)) / 2
        for bi, m in enumerate(present):
            v = r.get(m)
            x = gx + bi * bar
            if not _num(v):
                continue
            v = max(0.0, min(1.0, float(v)))
            lo, hi = wilson(v, int(r.get("n") or 0))
            cx = x + bar / 2
            parts.append(
                f'<rect class="bar bar-{m}" x="{x + 2:.1f}" y="{sy(v):.1f}" width="{bar - 4:.1f}" '
                f'height="{max(0.5, v * h):.1f}" fill="{COLORS[m]}">'
                f"<title>{esc(r['name'])} {m}: {metric} {v:.3f} (95% interval {lo:.3f} to {hi:.3f}, "
                f"n={int(r.get('n') or 0)})</title></rect>"
                f'<line class="whisker" x1="{cx:.1f}" x2="{cx:.1f}" y1="{sy(hi):.1f}" y2="{sy(lo):.1f}"/>'
                f'<line class="whisker" x1="{cx - 5:.1f}" x2="{cx + 5:.1f}" y1="{sy(hi):.1f}" y2="{sy(hi):.1f}"/>'
                f'<line class="whisker" x1="{cx - 5:.1f}" x2="{cx + 5:.1f}" y1="{sy(lo):.1f}" y2="{sy(lo):.1f}"/>'
                f'<text class="value" x="{cx:.1f}" y="{sy(hi) - 4:.1f}" text-anchor="middle">{v:.2f}</text>')
        cx = ml + gi * group + group / 2
        if rotate:
            parts.append(f'<text class="label" x="{cx:.1f}" y="{mt + h + 14}" text-anchor="end" '
                         f'transform="rotate(-{LABEL_ANGLE} {cx:.1f} {mt + h + 14})">{esc(names[gi])}'
                         f'<tspan class="sublabel"> · {esc(subs[gi])}</tspan></text>')
        else:
            parts.append(f'<text class="label" x="{cx:.1f}" y="{mt + h + 18}" '
                         f'text-anchor="middle">{esc(names[gi])}</text>'
                         f'<text class="sublabel" x="{cx:.1f}" y="{mt + h + 32}" '
                         f'text-anchor="middle">{esc(subs[gi])}</text>')
    parts.append(f'<line class="axis" x1="{ml}" x2="{ml + w}" y1="{mt + h}" y2="{mt + h}"/></svg>')
    return "".join(parts)


def _threshold_line(kind: str, threshold: float) -> float:
    """Where a check's threshold sits on the delta axis (forgetting budgets are drops)."""
    return -threshold if kind in ("forgetting", "champion", "alignment") else threshold


def svg_delta_plot(checks: list[dict], *, width: int = 720) -> str:
    """One row per gate check: the delta (point) with its interval, the threshold (dashed), 0."""
    row_h, ml, mr, mt, mb = 30, 230, 24, 10, 30
    height = mt + mb + row_h * len(checks)
    w = width - ml - mr
    vals = [0.0]
    for c in checks:
        for v in [c.get("delta"), *(c.get("ci") or [])]:
            if _num(v):
                vals.append(float(v))
        if _num(c.get("threshold")):
            vals.append(_threshold_line(str(c.get("kind")), float(c["threshold"])))
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, 0.1)
    lo, hi = lo - span * 0.1, hi + span * 0.1

    def sx(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * w

    parts = [f'<svg class="chart delta-chart" role="img" aria-label="gate deltas" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             "<title>Gate checks: delta vs reference with its interval; dashed = threshold</title>"]
    for t in _ticks(lo, hi, 6):
        parts.append(f'<line class="grid" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{mt}" y2="{height - mb}"/>'
                     f'<text class="tick" x="{sx(t):.1f}" y="{height - mb + 16}" text-anchor="middle">{t:+g}</text>')
    parts.append(f'<line class="zero" x1="{sx(0):.1f}" x2="{sx(0):.1f}" y1="{mt}" y2="{height - mb}"/>')
    for i, c in enumerate(checks):
        y = mt + row_h * i + row_h / 2
        color = PASS if c.get("passed") else FAIL
        parts.append(f'<text class="label" x="{ml - 8}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{esc(c.get("benchmark"))} · {esc(c.get("kind"))}</text>')
        if _num(c.get("threshold")):
            tx = sx(_threshold_line(str(c.get("kind")), float(c["threshold"])))
            parts.append(f'<line class="threshold" x1="{tx:.1f}" x2="{tx:.1f}" y1="{y - 10:.1f}" y2="{y + 10:.1f}">'
                         f"<title>threshold {fmt(c.get('threshold'))}</title></line>")
        ci = c.get("ci")
        if ci and len(ci) == 2 and all(_num(v) for v in ci):
            parts.append(f'<line class="ci" stroke="{color}" x1="{sx(ci[0]):.1f}" x2="{sx(ci[1]):.1f}" '
                         f'y1="{y:.1f}" y2="{y:.1f}"/>')
        if _num(c.get("delta")):
            parts.append(f'<circle class="delta {"pass" if c.get("passed") else "fail"}" cx="{sx(c["delta"]):.1f}" '
                         f'cy="{y:.1f}" r="5" fill="{color}"><title>{esc(c.get("reason"))}</title></circle>')
    parts.append(f'<text class="axis-label" x="{ml + w / 2:.0f}" y="{height - 2}" text-anchor="middle">'
                 "delta (candidate − reference)</text></svg>")
    return "".join(parts)


def svg_hbars(items: list[tuple[str, float]], *, width: int = 520, color: str = "#b45309") -> str:
    """Horizontal count bars (quarantine reasons)."""
    row_h, ml, mr = 22, 190, 60
    height = row_h * len(items) + 6
    top = max([v for _, v in items] + [1])
    w = width - ml - mr
    parts = [f'<svg class="chart hbars" role="img" aria-label="counts by reason" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">']
    for i, (label, v) in enumerate(items):
        y = 3 + i * row_h
        bw = max(1.0, v / top * w) if v else 0.0
        parts.append(f'<text class="label" x="{ml - 8}" y="{y + 15}" text-anchor="end">{esc(label)}</text>'
                     f'<rect x="{ml}" y="{y + 3}" width="{bw:.1f}" height="{row_h - 6}" fill="{color}"/>'
                     f'<text class="value" x="{ml + bw + 6:.1f}" y="{y + 15}">{fmt(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    status: str   # ok | partial | not run
    body: str


def _overview(gate: Loaded, promote: Loaded, evaluate: Loaded) -> Section:
    if gate.ok:
        g = gate.data
        passed = bool(g.get("passed"))
        cls, word = ("pass", "PASSED") if passed else ("fail", "FAILED")
        checks = [c for c in g.get("checks") or [] if isinstance(c, dict)]
        n_failed = g.get("n_failed", sum(1 for c in checks if not c.get("passed")))
        detail = f"{fmt(g.get('n_checks', len(checks)))} checks, {fmt(n_failed)} failed"
    else:
        cls, word, detail = "none", "NOT RUN", f"{gate.path} {gate.problem}"
    promo = ""
    if promote.ok:
        p = promote.data
        promo = (f"promoted as <code>{esc(p.get('version'))}</code> (alias <code>{esc(p.get('alias'))}</code> "
                 f"in <code>{esc(p.get('registry'))}</code>)" if p.get("promoted")
                 else "not promoted: the registry was not touched")
    else:
        promo = f"promotion not run (<code>{esc(promote.path)}</code> {esc(promote.problem)})"
    reasons = list(gate.data.get("reasons") or []) if gate.ok else []
    body = [f'<div id="verdict-banner" class="verdict {cls}"><span class="verdict-word">Gate: {word}</span>'
            f'<span class="verdict-detail">{esc(detail)}</span><span class="verdict-promo">{promo}</span></div>']
    if reasons:
        body.append('<ul class="verdict-reasons">' + "".join(f"<li>{esc(r)}</li>" for r in reasons) + "</ul>")
    facts = []
    if evaluate.ok:
        models = evaluate.data.get("models") or {}
        for who in MODELS:
            m = models.get(who)
            if isinstance(m, dict):
                short = str(m.get("hash") or "")[:12]
                facts.append([esc(who), f"<code>{esc(m.get('path'))}</code>", f"<code>{esc(short)}</code>",
                              esc(m.get("cache") or "")])
        if evaluate.data.get("bundle_hash"):
            body.append(f'<p class="meta">benchmark bundle <code>{esc(evaluate.data["bundle_hash"])}</code>'
                        + (f", limit {esc(evaluate.data.get('limit'))} items per benchmark"
                           if evaluate.data.get("limit") else "") + "</p>")
    if facts:
        body.append(table(["model", "path", "hash", "cache"], facts, "models"))
    return Section("verdict", "Verdict", "ok" if gate.ok else "not run", "\n".join(body))


def _data(validate: Loaded, dedup: Loaded) -> Section:
    body, have = [], 0
    body.append("<h3>Validation</h3>")
    if validate.ok:
        have += 1
        v = validate.data
        body.append(table(["read", "kept", "quarantined", "reject share", "max allowed"],
                          [[fmt(v.get("read")), fmt(v.get("kept")), fmt(v.get("quarantined")),
                            pct(v.get("reject_share")), pct(v.get("max_reject_share"))]], "counts validate-totals"))
        reasons = sorted((v.get("by_reason") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
        if reasons:
            body.append("<h4>Quarantined by reason</h4>" + svg_hbars([(k, n) for k, n in reasons]))
        else:
            body.append('<p class="meta">No row was quarantined.</p>')
        sources = v.get("sources") or {}
        if sources:
            rows = [[f"<code>{esc(path)}</code>", esc(s.get("kind")), esc(s.get("format")), fmt(s.get("read")),
                     fmt(s.get("kept")), fmt(s.get("quarantined")),
                     esc(", ".join(f"{k}: {n}" for k, n in sorted((s.get("by_reason") or {}).items())) or "–"),
                     pct(s.get("reject_share"))] for path, s in sources.items()]
            failed = set(v.get("failed_sources") or [])
            body.append("<h4>Per source</h4>" + table(
                ["source", "kind", "format", "read", "kept", "quarantined", "by reason", "reject share"], rows,
                "counts sources", ["fail" if p in failed else "" for p in sources]))
    else:
        body.append(not_run("validation", validate))
    body.append("<h3>Deduplication and decontamination</h3>")
    if dedup.ok:
        have += 1
        d = dedup.data
        reasons = ["exact_duplicate", "near_duplicate", "contaminated"]
        body.append(table(["read", "kept", *[r.replace("_", " ") for r in reasons], "removed share"],
                          [[fmt(d.get("read")), fmt(d.get("kept")), *[fmt(d.get(r)) for r in reasons],
                            pct(d.get("removed_share"))]], "counts dedup-totals"))
        body.append("<h4>Removed by reason</h4>" + svg_hbars([(r, d.get(r) or 0) for r in reasons], color="#7c3aed"))
        kinds = d.get("kinds") or {}
        if kinds:
            body.append("<h4>Per kind</h4>" + table(
                ["kind", "read", "kept", *[r.replace("_", " ") for r in reasons]],
                [[esc(k), fmt(s.get("read")), fmt(s.get("kept")), *[fmt(s.get(r)) for r in reasons]]
                 for k, s in kinds.items()], "counts kinds"))
        contam = {k: n for k, n in (d.get("contaminated_by_benchmark") or {}).items()}
        if contam:
            body.append('<p class="meta">Training rows overlapping a benchmark: '
                        + esc(", ".join(f"{k} {n}" for k, n in sorted(contam.items()))) + "</p>")
    else:
        body.append(not_run("deduplication", dedup))
    return Section("data", "Data", "ok" if have == 2 else ("partial" if have else "not run"), "\n".join(body))


TRAIN_FIELDS = [("steps", "steps"), ("epochs", "epochs"), ("train_loss_first", "first loss"),
                ("train_loss_last", "last loss"), ("tokens_seen", "tokens"), ("tokens_per_s", "tokens/s"),
                ("train_wall_s", "train s"), ("method", "method"), ("precision", "precision"),
                ("device", "device"), ("weights_changed", "weights changed"),
                ("rewards_accuracies_last", "reward acc (last)"), ("rewards_margins_last", "reward margin (last)")]


def _training(root: Path, metrics: dict[str, Loaded]) -> Section:
    body, have = [], 0
    for stage in TRAIN_STAGES:
        m = metrics[stage]
        body.append(f'<div class="stage" id="train-{stage}"><h3>{stage.upper()}</h3>')
        if not m.ok:
            body.append(not_run(f"{stage} training", m) + "</div>")
            continue
        d = m.data
        if d.get("enabled") is False or d.get("trained") is False:
            have += 1
            word = "disabled" if d.get("enabled") is False else "not trained"
            note = f' <span class="note">Note: {esc(d["note"])}.</span>' if d.get("note") else ""
            body.append(f'<p class="meta">{word}: the stage passed its input model through'
                        f'{" (" + esc(d.get("pointer")) + ")" if d.get("pointer") else ""}.{note}</p></div>')
            continue
        have += 1
        shown = [(label, d.get(k)) for k, label in TRAIN_FIELDS if k in d]
        body.append(table([esc(label) for label, _ in shown], [[esc(fmt(v)) for _, v in shown]], "train-stats"))
        if stage == "dpo" and isinstance(d.get("heldout"), dict):
            body.append(_dpo_heldout(d["heldout"]))
        curve, source = loss_curve(root, stage)
        if curve:
            body.append(svg_line_chart(curve, title=f"{stage} training loss per step"))
            body.append(f'<p class="meta">{len(curve)} steps, from <code>{esc(source)}</code></p>')
        else:
            body.append(not_run(f"{stage} loss curve", None,
                                f" (no loss_curve in models/{stage}/meta.json and no dvclive/{stage} TSV)"))
        body.append("</div>")
    return Section("training", "Training", "ok" if have == len(TRAIN_STAGES) else ("partial" if have else "not run"),
                   "\n".join(body))


def _interpolation(export: Loaded, evaluate: Loaded) -> Section:
    title = "Interpolation (learn / forget)"
    if not export.ok:
        return Section("interpolation", title, "not run", not_run("export", export))
    interp = export.data.get("interpolation") or {}
    if not interp.get("points"):
        return Section("interpolation", title, "ok",
                       '<p class="meta">export.interpolation is off: the model was saved as trained (alpha 1).</p>')
    chosen = interp.get("chosen")
    rows, curve = [], []
    for p in interp["points"]:
        d = p.get("drift") or {}
        if _num(d.get("kl")) and _num(p.get("domain_gain")):
            curve.append({"alpha": p["alpha"], "kl": d["kl"], "gain": p["domain_gain"]})
        ok = p.get("within_limits")
        rows.append([esc(f"{p['alpha']:g}") + (" <strong>(kept)</strong>" if p["alpha"] == chosen else ""),
                     esc(fmt(p.get("domain_gain"), signed=True)),
                     esc(f"{fmt(d.get('kl'))} ({fmt(d.get('kl_upper'))})" if d else "–"),
                     esc(f"{fmt(d.get('perplexity_ratio'))} ({fmt(d.get('perplexity_ratio_upper'))})" if d else "–"),
                     esc("yes" if ok else "no" if ok is False else "–"), esc(fmt(p.get("seconds")))])
    limits = interp.get("limits") or {}
    gate_point = None
    if evaluate.ok:
        dom = [b for b in (evaluate.data.get("benchmarks") or {}).values()
               if isinstance(b, dict) and b.get("role") == "domain" and _num((b.get("delta") or {}).get(interp.get("metric", "acc")))]
        kl = (evaluate.data.get("drift") or {}).get("kl")
        if dom and _num(kl):
            gate_point = (float(kl), sum(b["delta"][interp.get("metric", "acc")] for b in dom) / len(dom))
    dev = interp.get("dev") or {}
    body = [f'<p class="meta"><code>merged = base + alpha × (tuned − base)</code>, each alpha scored on the dev '
            f"split ({esc(fmt(sum((b.get('n') or 0) for b in (dev.get('benchmarks') or {}).values())))} dev domain "
            f"questions, {esc(fmt(dev.get('drift_texts')))} dev drift texts; never the gate's items). Kept: "
            f"<strong>alpha {esc(f'{chosen:g}' if _num(chosen) else chosen)}</strong>. {esc(interp.get('reason'))}.</p>"]
    if curve:
        body.append(svg_frontier(curve, chosen, kl_limit=limits.get("max_kl"), gate_point=gate_point))
        if gate_point:
            body.append('<p class="meta">Square: the kept model on the gate\'s own items and texts (evaluate), '
                        "for comparison with its dev point.</p>")
    body.append(table(["alpha", "dev domain gain", "dev KL (upper)", "dev perplexity ratio (upper)",
                       "within the gate's limits", "seconds"], rows, "interp-table"))
    return Section("interpolation", title, "ok", "\n".join(body))


def _dpo_heldout(h: dict) -> str:
    """Did DPO help? The held-out pairs' preference accuracy per model and DPO vs SFT, paired."""
    acc, margin = h.get("accuracy") or {}, h.get("margin") or {}
    rows = [[esc(k), esc(fmt(acc.get(k))), esc(fmt(margin.get(k)))] for k in ("base", "sft", "dpo") if k in acc]
    vs = h.get("dpo_vs_sft") or {}
    ci = vs.get("ci") or [None, None]
    verdict = ("DPO's gain over SFT is certified (the interval excludes 0)" if vs.get("gain_certified")
               else "DPO's gain over SFT is not certified (the interval includes 0)")
    return (f'<h4>Held-out preference pairs ({esc(h.get("pairs"))} pairs, {esc(h.get("prompts"))} prompts, '
            f"never trained on)</h4>" + table(["model", "preference accuracy", "mean margin (nats)"], rows, "heldout")
            + f'<p class="meta">DPO - SFT accuracy {esc(fmt(vs.get("accuracy_delta"), signed=True))} '
              f"[{esc(fmt(ci[0], signed=True))}, {esc(fmt(ci[1], signed=True))}] (95%, paired): {esc(verdict)}.</p>")


def _checks_by_bench(gate: Loaded) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    if gate.ok:
        for c in gate.data.get("checks") or []:
            if isinstance(c, dict):
                out.setdefault(str(c.get("benchmark")), []).append(c)
    return out


def _ci(c: dict) -> str:
    ci = c.get("ci")
    return f"[{fmt(ci[0], signed=True)}, {fmt(ci[1], signed=True)}]" if ci and len(ci) == 2 else "–"


def _benchmarks(evaluate: Loaded, gate: Loaded) -> Section:
    if not evaluate.ok or not (evaluate.data.get("benchmarks")):
        return Section("benchmarks", "Benchmarks", "not run", not_run("evaluation", evaluate))
    metric = (gate.data.get("metric") if gate.ok else None) or "acc"
    benches = evaluate.data["benchmarks"]
    checks = _checks_by_bench(gate)
    rows, bars, signals = [], [], []
    for name, b in benches.items():
        if not isinstance(b, dict):
            continue
        vals = {m: (b.get(m) or {}).get(metric) if isinstance(b.get(m), dict) else None for m in MODELS}
        bars.append({"name": name, "role": b.get("role"), "n": b.get("n"), **vals})
        cs = checks.get(name, [])
        rows.append([esc(name), esc(b.get("role")), fmt(b.get("n")),
                     *[esc(fmt(vals[m])) for m in MODELS],
                     esc(fmt((b.get("delta") or {}).get(metric), signed=True)),
                     esc(fmt((b.get("delta_vs_production") or {}).get(metric), signed=True)),
                     "<br>".join(f"{esc(c.get('kind'))}: {esc(_ci(c))}" for c in cs) or "–"])
    drift = evaluate.data.get("drift") or {}
    for kind, label in (("", "all"), ("_text", "plain text"), ("_chat", "chat")):
        if _num(drift.get(f"kl{kind}")):
            signals.append([esc(label), esc(fmt(drift.get(f"tokens{kind}"))), esc(fmt(drift.get(f"kl{kind}"), digits=4)),
                            esc(fmt(drift.get(f"perplexity_base{kind}"))), esc(fmt(drift.get(f"perplexity_candidate{kind}"))),
                            esc(fmt(drift.get(f"perplexity_ratio{kind}")))])
    body = [f'<p class="meta">Metric <code>{esc(metric)}</code>. Bars: each model\'s score with its 95% '
            "Wilson interval over the n items; the table's last column is the gate's paired interval of "
            "the delta.</p>",
            svg_benchmark_bars(bars, metric),
            table(["benchmark", "role", "n", "base", "candidate", "production", "Δ vs base", "Δ vs production",
                   "paired interval (gate)"], rows, "bench-table")]
    if signals:
        body.append(f"<h3>Label-free drift on the fixed general text set ({esc(fmt(drift.get('texts')))} texts)</h3>"
                    + table(["texts", "tokens", "mean KL(candidate ‖ base), nats/token", "perplexity base",
                             "perplexity candidate", "ratio"], signals, "signals"))
    skipped = evaluate.data.get("skipped") or {}
    if skipped:
        body.append('<p class="meta">Skipped: ' + esc("; ".join(f"{k}: {v}" for k, v in skipped.items())) + "</p>")
    return Section("benchmarks", "Benchmarks", "ok", "\n".join(body))


def _gate(gate: Loaded) -> Section:
    if not gate.ok:
        return Section("gate", "Gate", "not run", not_run("the gate", gate))
    g = gate.data
    checks = [c for c in g.get("checks") or [] if isinstance(c, dict)]
    test = g.get("test") or "none"
    how = (f"paired <code>{esc(test)}</code> tests, one-sided at the end of the interval at {pct(g.get('confidence'))} "
           f"confidence, <code>{esc(g.get('multiplicity') or 'none')}</code> correction within each family; "
           "a check passes only when the data certify it") if test != "none" else \
        "point estimates (no interval test; a record from an older gate)"
    body = [f'<p class="meta">Metric <code>{esc(g.get("metric"))}</code>; {how}.</p>']
    notes = [r for r in g.get("reasons") or [] if r not in {c.get("reason") for c in checks}]
    if notes:
        body.append('<ul class="notes">' + "".join(f'<li class="fail">{esc(n)}</li>' for n in notes) + "</ul>")
    accuracy = [c for c in checks if c.get("kind") in ("gain", "forgetting", "champion", "alignment")]
    if accuracy:
        body.append(svg_delta_plot(accuracy))
        body.append('<p class="meta">Each row: the paired delta (dot) and its interval (bar); dashed: the '
                    "threshold (the required gain, or minus the forgetting budget); solid: zero. Hover a dot for "
                    "its reason.</p>")
        rows = [[esc(c.get("benchmark")), esc(c.get("kind")), esc(fmt(c.get("threshold"))),
                 esc(fmt(c.get("candidate"))), esc(fmt(c.get("reference"))), esc(fmt(c.get("delta"), signed=True)),
                 esc(_ci(c)), esc(fmt(c.get("n"))), esc(fmt(c.get("discordance"))), esc(fmt(c.get("mde"))),
                 esc(fmt(c.get("p_value"))), esc(fmt(c.get("p_adjusted"))),
                 '<span class="badge pass">pass</span>' if c.get("passed") else '<span class="badge fail">FAIL</span>',
                 esc(c.get("reason"))] for c in checks]
        body.append(table(["benchmark", "check", "threshold", "candidate", "reference", "delta", "interval", "n",
                           "discordant", "certifies drops of", "p", "p adjusted", "verdict", "reason"], rows, "checks",
                          ["pass" if c.get("passed") else "fail" for c in checks]))
    else:
        body.append('<p class="not-run">The gate recorded no checks.</p>')
    if g.get("not_checked"):
        body.append("<h3>Not checked</h3><ul>" + "".join(f"<li>{esc(n)}</li>" for n in g["not_checked"]) + "</ul>")
    if g.get("certifies"):
        body.append("<h3>What this evidence can and cannot certify</h3><ul>"
                    + "".join(f"<li>{esc(n)}</li>" for n in g["certifies"]) + "</ul>")
    return Section("gate", "Gate", "ok", "\n".join(body))


def _promotion(promote: Loaded) -> Section:
    if not promote.ok:
        return Section("promotion", "Promotion", "not run", not_run("promotion", promote))
    p = promote.data
    if p.get("promoted"):
        rows = [[esc(k), f"<code>{esc(p.get(k))}</code>"] for k in
                ("version", "alias", "registry", "model_path", "model_hash", "reused_version") if k in p]
        aliases = p.get("aliases") or {}
        if aliases:
            rows.append(["aliases", esc(", ".join(f"{k} → {v}" for k, v in sorted(aliases.items())))])
        body = '<p class="verdict-inline pass">Promoted.</p>' + table(["", ""], rows, "promotion")
    else:
        reasons = p.get("reasons") or []
        body = ('<p class="verdict-inline fail">Not promoted; the registry was not touched.</p>'
                + ('<ul class="notes">' + "".join(f"<li>{esc(r)}</li>" for r in reasons) + "</ul>" if reasons else "")
                + (f'<p class="meta">Production stays at <code>{esc(p.get("production"))}</code>.</p>'
                   if p.get("production") else ""))
    return Section("promotion", "Promotion", "ok", body)


# Field order for generation examples of any shape: the prompt, the reference, then outputs, then scores.
_PROMPT_KEYS = ("prompt", "question", "input", "instruction")
_REF_KEYS = ("reference", "target", "expected", "gold")


def _example_rows(ex: dict) -> list[tuple[str, Any]]:
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


def _example(ex: Any) -> str:
    if not isinstance(ex, dict):
        return f'<div class="example"><pre>{esc(ex)}</pre></div>'
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{f'<pre>{esc(v)}</pre>' if isinstance(v, str) else esc(fmt(v))}</td></tr>"
                   for k, v in _example_rows(ex))
    return f'<div class="example"><table class="gen">{rows}</table></div>'


def _generation_groups(gens: Any) -> list[tuple[str, dict, list]]:
    """``generations`` in any reasonable shape -> [(name, scalar stats, examples)]."""
    if isinstance(gens, list):
        return [("examples", {}, gens)]
    if not isinstance(gens, dict):
        return []
    if any(isinstance(v, list) for v in gens.values()) and not any(isinstance(v, dict) for v in gens.values()):
        stats = {k: v for k, v in gens.items() if not isinstance(v, list)}
        lists = [(k, v) for k, v in gens.items() if isinstance(v, list)]
        if len(lists) == 1 and lists[0][0] in ("examples", "samples", "items"):
            return [("examples", stats, lists[0][1])]
        return [(k, stats if i == 0 else {}, v) for i, (k, v) in enumerate(lists)]
    groups = []
    for name, g in gens.items():
        if isinstance(g, list):
            groups.append((str(name), {}, g))
        elif isinstance(g, dict):
            ex_key = next((k for k in ("examples", "samples", "items", "generations")
                           if isinstance(g.get(k), list)), None)
            stats = {k: v for k, v in g.items() if k != ex_key and not isinstance(v, (list, dict))}
            stats.update({f"{k}.{kk}": vv for k, v in g.items() if isinstance(v, dict)
                          for kk, vv in v.items() if not isinstance(vv, (list, dict))})
            groups.append((str(name), stats, g.get(ex_key, []) if ex_key else []))
    return groups


def _generations(export_meta: Loaded, export: Loaded, evaluate: Loaded, max_examples: int) -> Section:
    body, have = [], False
    gens = evaluate.data.get("generations") if evaluate.ok else None
    body.append("<h3>Held-out prompts (evaluate)</h3>")
    if gens:
        have = True
        for name, stats, examples in _generation_groups(gens):
            body.append(f'<div class="gen-group"><h4>{esc(name)}</h4>')
            if stats:
                body.append(table([esc(k) for k in stats], [[esc(fmt(v)) for v in stats.values()]], "gen-stats"))
            body += [_example(ex) for ex in examples[:max_examples]]
            if len(examples) > max_examples:
                body.append(f'<p class="meta">… and {len(examples) - max_examples} more.</p>')
            body.append("</div>")
    else:
        body.append(not_run("generation examples from evaluate", None if evaluate.ok else evaluate,
                            " (metrics/evaluate.json has no generations)" if evaluate.ok else ""))
    held = evaluate.data.get("sft_heldout") if evaluate.ok else None
    if isinstance(held, dict) and held.get("rows"):
        have = True
        body.append("<h3>Held-out SFT rows (never trained on; the domain check without a domain benchmark)</h3>")
        shown = [("rows", held.get("rows")), ("answer NLL, base (nats/token)", held.get("nll_base")),
                 ("answer NLL, candidate", held.get("nll_candidate")), ("lowered by", held.get("nll_gain")),
                 ("rows improved", held.get("rows_improved"))]
        body.append(table([esc(k) for k, _ in shown], [[esc(fmt(v)) for _, v in shown]], "heldout-stats"))
        body += [_example(ex) for ex in (held.get("examples") or [])[:max_examples]]
    elif isinstance(held, dict) and held.get("reason"):
        body.append(f'<p class="meta">Held-out SFT rows: none scored ({esc(held["reason"])}).</p>')
    body.append("<h3>Merge check (export): adapter vs merged model, greedy</h3>")
    if export.ok:
        shown = [(label, export.data.get(k)) for k, label in (
            ("prompts", "prompts"), ("matches", "identical outputs"), ("token_agreement", "token agreement"),
            ("max_logit_diff", "max logit diff"), ("dtype", "dtype")) if k in export.data]
        if shown:
            body.append(table([esc(label) for label, _ in shown],
                              [[esc(fmt(v, digits=5 if label == "max logit diff" else 3)) for label, v in shown]],
                              "export-check"))
    samples = export_meta.data.get("samples") if export_meta.ok else None
    if samples:
        have = True
        for s in samples[:max_examples]:
            body.append(_example(s))
    else:
        body.append(not_run("export samples", None if export_meta.ok else export_meta,
                            " (models/export/meta.json has no samples)" if export_meta.ok else ""))
    return Section("generations", "Example generations", "ok" if have else "not run", "\n".join(body))


# ----------------------------------------------------------------------------- the page

CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--pass:#15803d;--fail:#b91c1c;--none:#6b7280}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);
 margin:0;background:#f8fafc}
header{background:#111827;color:#f9fafb;padding:18px 32px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#cbd5e1;font-size:13px}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid var(--line);font-size:13px}
nav a{margin-right:14px;color:#1d4ed8;text-decoration:none}
main{padding:8px 32px 40px;max-width:1200px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 20px;margin:16px 0}
section h2{margin:0 0 8px;font-size:18px;display:flex;gap:10px;align-items:center}
h3{font-size:15px;margin:14px 0 6px}h4{font-size:13px;margin:10px 0 4px;color:#374151}
.status{font-size:11px;font-weight:600;text-transform:uppercase;padding:2px 8px;border-radius:10px;
 background:#e5e7eb;color:#374151}
.status.ok{background:#dcfce7;color:var(--pass)}.status.not-run{background:#f3f4f6;color:var(--none)}
.status.partial{background:#fef3c7;color:#92400e}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#f3f4f6}
tr.fail td{background:#fef2f2}tr.pass td{background:#f0fdf4}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;background:#f3f4f6;
 padding:0 3px;border-radius:3px}
pre{margin:0;white-space:pre-wrap;word-break:break-word;
 font:12px ui-monospace,Menlo,Consolas,"DejaVu Sans Mono",monospace}
.verdict{display:flex;flex-wrap:wrap;gap:16px;align-items:baseline;padding:14px 18px;border-radius:8px;color:#fff}
.verdict.pass{background:var(--pass)}.verdict.fail{background:var(--fail)}.verdict.none{background:var(--none)}
.verdict-word{font-size:22px;font-weight:700}
.verdict code{background:rgba(255,255,255,.2);color:#fff}
.verdict-reasons li,.notes li{margin:2px 0}
.verdict-inline{font-weight:700}.verdict-inline.pass{color:var(--pass)}.verdict-inline.fail{color:var(--fail)}
.badge{font-weight:700;padding:1px 6px;border-radius:4px;color:#fff}
.badge.pass{background:var(--pass)}.badge.fail{background:var(--fail)}
.not-run{color:var(--none);font-style:italic}
.meta{color:var(--muted);font-size:12px}
.chart{display:block;max-width:100%;height:auto;margin:6px 0}
.chart text{font:11px system-ui,"DejaVu Sans",sans-serif;fill:#374151}
.chart .grid{stroke:#eef0f3}.chart .axis{stroke:#9ca3af}
.chart .whisker{stroke:#111827;stroke-width:1.2}
.chart .zero{stroke:#111827;stroke-width:1}
.chart .threshold{stroke:#111827;stroke-width:1.5;stroke-dasharray:3 2}
.chart .ci{stroke-width:3;stroke-linecap:round}
.chart .sublabel{fill:#6b7280;font-size:10px}
.stage{border-top:1px solid var(--line);padding-top:4px}
.example{border:1px solid var(--line);border-radius:6px;margin:6px 0;padding:4px}
.example table{margin:0;width:100%}.example th{width:150px;background:#f9fafb;font-weight:600}
"""


def sections(root: str | Path = ".", *, max_examples: int = 8) -> list[Section]:
    """Every section of the report, each from the files its stages wrote (missing ones: not run)."""
    root = Path(root)
    metrics = {name: load(root, f"metrics/{name}.json")
               for name in ("validate", "dedup", *TRAIN_STAGES, "export", "evaluate", "gate", "promote")}
    export_meta = load(root, "models/export/meta.json")
    guarded: list[tuple[str, str, Callable[[], Section]]] = [
        ("verdict", "Verdict", lambda: _overview(metrics["gate"], metrics["promote"], metrics["evaluate"])),
        ("data", "Data", lambda: _data(metrics["validate"], metrics["dedup"])),
        ("training", "Training", lambda: _training(root, metrics)),
        ("interpolation", "Interpolation (learn / forget)", lambda: _interpolation(metrics["export"], metrics["evaluate"])),
        ("benchmarks", "Benchmarks", lambda: _benchmarks(metrics["evaluate"], metrics["gate"])),
        ("gate", "Gate", lambda: _gate(metrics["gate"])),
        ("promotion", "Promotion", lambda: _promotion(metrics["promote"])),
        ("generations", "Example generations",
         lambda: _generations(export_meta, metrics["export"], metrics["evaluate"], max_examples)),
    ]
    out = []
    for sid, title, build in guarded:
        try:
            out.append(build())
        except Exception as exc:  # a malformed file costs its section, never the report
            out.append(Section(sid, title, "not run", f'<p class="not-run"><strong>not rendered</strong>: '
                                                     f"{esc(exc.__class__.__name__)}: {esc(exc)}</p>"))
    return out


def render(root: str | Path = ".", *, max_examples: int = 8, generated_at: str | None = None) -> str:
    """The whole report as one self-contained HTML string."""
    root = Path(root)
    parts = sections(root, max_examples=max_examples)
    when = generated_at or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    sha = ""
    meta = load(root, "models/export/meta.json")
    if meta.ok and meta.data.get("git_sha"):
        sha = f" · git {esc(meta.data['git_sha'])}"
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in parts)
    body = "\n".join(
        f'<section id="{s.id}" data-status="{esc(s.status)}"><h2>{esc(s.title)}'
        + (f' <span class="status {s.status.replace(" ", "-")}">{esc(s.status)}</span>' if s.status != "ok" else "")
        + f"</h2>\n{s.body}\n</section>"
        for s in parts)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>tempering run report</title>"
            f"<style>{CSS}</style></head>\n<body>\n"
            f"<header><h1>tempering run report</h1>"
            f"<p>{esc(root.resolve())} · generated {esc(when)}{sha}</p></header>\n"
            f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n</body></html>\n")


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
