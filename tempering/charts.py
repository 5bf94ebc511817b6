"""The run report's offline charts: pure functions from data to inline SVG markup.

Owns every chart of the report (loss curve, interpolation frontier, benchmark bars, gate deltas,
count bars), the axis, grid and tick helpers they share, and the layout of the benchmark chart's
axis labels (:func:`bench_label_layout`, :func:`label_boxes`), which is what guarantees that no
two labels overlap. Each function returns :class:`markupsafe.Markup`; every piece of text that
comes from data (benchmark names, reasons, check kinds) goes through :func:`markupsafe.escape`,
so a name such as ``<script>`` is drawn as text. No JavaScript, fonts or network: the SVG opens
from disk inside the report page (:mod:`tempering.html_report`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

from tempering.stats import wilson

MODELS = ("base", "candidate", "production")
COLORS = {"base": "#8a94a6", "candidate": "#2563eb", "production": "#d97706"}
PASS, FAIL, NONE = "#15803d", "#b91c1c", "#6b7280"

# Advance width per character of the chart's label fonts (11 px labels, 10 px sublabels), taken
# from DejaVu Sans, the widest of the stack's fallbacks, so an estimate that fits, fits.
LABEL_CHAR_PX, SUBLABEL_CHAR_PX = 6.9, 6.3
# Ascent and descent of those fonts (DejaVu Sans: 0.93 and 0.24 em, rounded up): a label's box.
LABEL_ASCENT_PX, LABEL_DESCENT_PX = 10.5, 3.0
LABEL_ANGLE = 40  # degrees: labels that do not fit side by side are drawn rotated by this much


def esc(x: Any) -> Markup:
    """Data as text inside SVG/HTML (``None`` is empty)."""
    return escape("" if x is None else str(x))


def is_num(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def fmt(x: Any, digits: int = 3, signed: bool = False) -> str:
    """A number as the report prints it: ``–`` for none, yes/no, thousands separators, ``digits``
    decimals, a sign when ``signed``."""
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
    """A share as a percentage with one decimal (``–`` when not a number)."""
    return f"{100 * x:.1f}%" if is_num(x) else "–"


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) in [lo, hi]."""
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


# ----------------------------------------------------------------------------- shared pieces


def svg_open(cls: str, label: str, width: float, height: float, title: str | None = None) -> str:
    """The opening of an inline chart: the svg element (accessible name, size) and its title."""
    return (f'<svg class="chart {cls}" role="img" aria-label="{esc(label)}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
            + (f"<title>{esc(title)}</title>" if title is not None else ""))


def y_grid(y0: float, y1: float, sy: Callable[[float], float], ml: float, w: float,
           values: list[float] | None = None) -> list[str]:
    """Horizontal grid lines with their tick labels on the left."""
    return [f'<line class="grid" x1="{ml}" x2="{ml + w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
            f'<text class="tick" x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
            for t in (values if values is not None else ticks(y0, y1))]


def axes(ml: float, mt: float, w: float, h: float, height: float, x_label: str, y_label: str) -> list[str]:
    """The x and y axis lines and their labels (the y label rotated)."""
    return [f'<line class="axis" x1="{ml}" x2="{ml + w}" y1="{mt + h}" y2="{mt + h}"/>'
            f'<line class="axis" x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + h}"/>',
            f'<text class="axis-label" x="{ml + w / 2:.0f}" y="{height - 4}" text-anchor="middle">{esc(x_label)}</text>'
            f'<text class="axis-label" x="12" y="{mt + h / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 12 {mt + h / 2:.0f})">{esc(y_label)}</text>']


# ----------------------------------------------------------------------------- line charts


def line_chart(points: list[dict], *, title: str, width: int = 560, height: int = 220,
               color: str = "#2563eb") -> Markup:
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

    parts = [svg_open("loss-chart", title, width, height, title)] + y_grid(y0, y1, sy, ml, w)
    for t in ticks(x0, x1, 6):
        if float(t).is_integer():
            parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{mt + h + 16}" text-anchor="middle">{int(t)}</text>')
    parts += axes(ml, mt, w, h, height, "step", "loss")
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    parts.append(f'<polyline class="curve" fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
    if len(pts) <= 200:
        for x, y in pts:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                         f"<title>step {x:g}: loss {y:.4f}</title></circle>")
    parts.append("</svg>")
    return Markup("".join(parts))


# One colour per curve of a multi-curve frontier (the replay sweep), in the order given.
CURVE_COLORS = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2")


def frontier(points: list[dict], chosen: float | None, *, kl_limit: float | None = None,
             gate_point: tuple[float, float] | None = None, width: int = 560, height: int = 260) -> Markup:
    """The learn / forget curve of the interpolation sweep: dev KL from the base (x) against dev
    domain gain (y), one point per alpha joined in alpha order, the kept one ringed, the gate's KL
    limit dashed, and (when evaluated) the kept model's gate-set numbers as a square."""
    title = "Interpolation sweep: dev domain gain against dev KL from the base, one point per alpha"
    return frontiers([{"label": None, "points": points, "chosen": chosen}], kl_limit=kl_limit,
                     gate_point=gate_point, title=title, width=width, height=height)


def frontiers(curves: list[dict], *, kl_limit: float | None = None, gate_point: tuple[float, float] | None = None,
              title: str = "Learn / forget frontiers: dev domain gain against dev KL from the base",
              width: int = 560, height: int = 260) -> Markup:
    """Several learn / forget curves on one pair of axes (the replay share x alpha sweep): each
    curve ``{"label", "points": [{"alpha", "kl", "gain"}], "chosen"}`` in its own colour, its
    points joined in alpha order and its kept alpha ringed; a legend when curves have labels."""
    curves = [dict(c, pts=sorted(((float(p["kl"]), float(p["gain"]), float(p["alpha"])) for p in c["points"]),
                                 key=lambda q: q[2]))
              for c in curves if c.get("points")]
    ml, mr, mt, mb = 56, 16, 14, 40
    labelled = [c for c in curves if c.get("label") is not None]
    legend_h = 16 * len(labelled)
    height += legend_h
    w, h = width - ml - mr, height - mt - mb - legend_h
    every = [q for c in curves for q in c["pts"]]
    xs = [x for x, _, _ in every] + ([kl_limit] if kl_limit is not None else []) + \
        ([gate_point[0]] if gate_point else []) + [0.0]
    ys = [y for _, y, _ in every] + ([gate_point[1]] if gate_point else []) + [0.0]
    x0, x1 = 0.0, max(xs) * 1.1 or 1.0
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return mt + (1 - (y - y0) / (y1 - y0)) * h

    parts = [svg_open("frontier-chart", title, width, height, title)] + y_grid(y0, y1, sy, ml, w)
    for t in ticks(x0, x1, 6):
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{mt + h + 16}" text-anchor="middle">{t:g}</text>')
    parts += axes(ml, mt, w, h, height - legend_h, "dev KL(candidate ‖ base), nats/token", "dev domain gain")
    if kl_limit is not None:
        parts.append(f'<line class="threshold" x1="{sx(kl_limit):.1f}" x2="{sx(kl_limit):.1f}" y1="{mt}" '
                     f'y2="{mt + h}" stroke="#b91c1c" stroke-dasharray="4 3"><title>gate.max_kl {kl_limit:g}</title></line>')
    for k, c in enumerate(curves):
        color = CURVE_COLORS[k % len(CURVE_COLORS)]
        name = f"{c['label']}: " if c.get("label") is not None else ""
        chosen = c.get("chosen")
        parts.append(f'<polyline class="curve" fill="none" stroke="{color}" stroke-width="2" points="'
                     + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in c["pts"]) + '"/>')
        for x, y, a in c["pts"]:
            kept = chosen is not None and abs(a - chosen) < 1e-12
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{6 if kept else 3.5}" '
                         f'fill="{"#ffffff" if kept else color}" stroke="{color}" stroke-width="2">'
                         f"<title>{esc(name)}alpha {a:g}: gain {y:+.3f}, KL {x:.3f}{' (kept)' if kept else ''}</title></circle>")
            if len(curves) == 1:
                parts.append(f'<text class="tick" x="{sx(x) + 7:.1f}" y="{sy(y) - 7:.1f}">α {a:g}</text>')
    for k, c in enumerate(labelled):
        y = height - legend_h + 16 * k + 4
        color = CURVE_COLORS[curves.index(c) % len(CURVE_COLORS)]
        parts.append(f'<line x1="{ml}" x2="{ml + 18}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="2"/>'
                     f'<text class="tick" x="{ml + 24}" y="{y + 4:.1f}">{esc(c["label"])}</text>')
    if gate_point:
        gx, gy = gate_point
        parts.append(f'<rect x="{sx(gx) - 4:.1f}" y="{sy(gy) - 4:.1f}" width="8" height="8" fill="#059669">'
                     f"<title>the kept model on the gate's own items and texts: gain {gy:+.3f}, KL {gx:.3f}</title></rect>")
    parts.append("</svg>")
    return Markup("".join(parts))


# ----------------------------------------------------------------------------- benchmark bars


@dataclass(frozen=True)
class Label:
    """One axis label as drawn: its text, anchor point, anchor side, rotation (degrees, clockwise
    positive as in SVG), estimated advance width and font class (``label`` or ``sublabel``)."""

    text: str
    x: float
    y: float
    anchor: str      # "middle" | "end"
    angle: float
    width: float
    cls: str


@dataclass(frozen=True)
class BenchLayout:
    """Where the benchmark chart puts things: margins, plot size, group width, and every label."""

    width: int
    height: int
    ml: float
    mr: float
    mt: float
    h: float
    group: float
    rotate: bool
    labels: tuple[Label, ...]

    @property
    def w(self) -> float:
        return self.width - self.ml - self.mr


def bench_axis_texts(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Each benchmark's label (its name) and sublabel (role and item count)."""
    return ([str(r["name"]) for r in rows], [f"{r.get('role') or ''} · n={r.get('n')}" for r in rows])


def bench_label_layout(rows: list[dict], *, width: int = 720, height: int = 280) -> BenchLayout:
    """Lay out the benchmark chart's axis labels so that no two overlap.

    Labels sit side by side (name, then role and n below it) when each fits its group's width;
    otherwise every label (name, role and n in one line) is rotated by ``LABEL_ANGLE``, the chart
    grows downwards to hold it, and the left margin widens until the first labels' tails fit. Two
    rotated labels are parallel strips ``group * sin(angle)`` apart, so they clear each other when
    that exceeds the line height; the group width is kept at least that wide (the chart widens)."""
    ml, mr, mt, mb = 48, 16, 30, 44
    h = height - mt - mb
    names, subs = bench_axis_texts(rows)
    n = max(1, len(rows))
    group = (width - ml - mr) / n
    widest = max([len(t) * LABEL_CHAR_PX for t in names] + [len(t) * SUBLABEL_CHAR_PX for t in subs] + [0])
    rotate = widest > group - 8
    if not rotate:
        labels = []
        for i, (name, sub) in enumerate(zip(names, subs)):
            cx = ml + i * group + group / 2
            labels.append(Label(name, cx, mt + h + 18, "middle", 0.0, len(name) * LABEL_CHAR_PX, "label"))
            labels.append(Label(sub, cx, mt + h + 32, "middle", 0.0, len(sub) * SUBLABEL_CHAR_PX, "sublabel"))
        return BenchLayout(width, height, ml, mr, mt, h, group, False, tuple(labels))
    lengths = [len(f"{a} · {b}") * LABEL_CHAR_PX for a, b in zip(names, subs)]
    rad = math.radians(LABEL_ANGLE)
    cos, sin = math.cos(rad), math.sin(rad)
    # Parallel rotated strips are group * sin(angle) apart: keep that above a line's height.
    min_group = (LABEL_ASCENT_PX + LABEL_DESCENT_PX + 2) / sin
    width = max(width, int(math.ceil(ml + mr + n * min_group)))
    mb = 24 + int(max(lengths) * sin) + 8
    height = int(mt + h + mb)
    for _ in range(4):  # widen the left margin until the first labels' tails fit (group shrinks)
        group = (width - ml - mr) / n
        # A rotated label reaches left by its length along the baseline plus its ascent across it.
        need = max(L * cos + LABEL_ASCENT_PX * sin - (i + 0.5) * group for i, L in enumerate(lengths)) + 2
        if need <= ml:
            break
        ml = int(math.ceil(need))
        if (width - ml - mr) / n < min_group:
            width = int(math.ceil(ml + mr + n * min_group))
    group = (width - ml - mr) / n
    labels = [Label(f"{a} · {b}", ml + i * group + group / 2, mt + h + 14, "end", -LABEL_ANGLE, L, "label")
              for i, (a, b, L) in enumerate(zip(names, subs, lengths))]
    return BenchLayout(width, height, ml, mr, mt, h, group, True, tuple(labels))


def label_boxes(layout: BenchLayout) -> list[tuple[tuple[float, float], ...]]:
    """Each label's drawn box as four corners (rotated labels give rotated rectangles), from the
    same estimates the layout uses: the advance width, the font's ascent and descent."""
    out = []
    for lb in layout.labels:
        x0 = lb.x - lb.width if lb.anchor == "end" else lb.x - lb.width / 2
        scale = 1.0 if lb.cls == "label" else 10 / 11
        top, bottom = lb.y - LABEL_ASCENT_PX * scale, lb.y + LABEL_DESCENT_PX * scale
        corners = [(x0, top), (x0 + lb.width, top), (x0 + lb.width, bottom), (x0, bottom)]
        a = math.radians(lb.angle)
        c, s = math.cos(a), math.sin(a)
        out.append(tuple((lb.x + (x - lb.x) * c - (y - lb.y) * s, lb.y + (x - lb.x) * s + (y - lb.y) * c)
                         for x, y in corners))
    return out


def boxes_overlap(p: tuple[tuple[float, float], ...], q: tuple[tuple[float, float], ...]) -> bool:
    """Whether two convex polygons intersect (separating axis theorem; touching is not overlap)."""
    for poly in (p, q):
        for i in range(len(poly)):
            (x1, y1), (x2, y2) = poly[i], poly[(i + 1) % len(poly)]
            ax, ay = y1 - y2, x2 - x1
            a = [x * ax + y * ay for x, y in p]
            b = [x * ax + y * ay for x, y in q]
            if max(a) <= min(b) or max(b) <= min(a):
                return False
    return True


def benchmark_bars(rows: list[dict], metric: str, *, width: int = 720, height: int = 280) -> Markup:
    """Grouped bars per benchmark (base, candidate, production) with 95% Wilson whiskers; the axis
    labels are placed by :func:`bench_label_layout`, so long names (``general_knowledge`` beside
    ``general_arithmetic``) never overlap."""
    present = [m for m in MODELS if any(is_num(r.get(m)) for r in rows)]
    lay = bench_label_layout(rows, width=width, height=height)
    ml, mt, h, w, group = lay.ml, lay.mt, lay.h, lay.w, lay.group
    bar = min(48.0, group * 0.8 / max(1, len(present)))

    def sy(v: float) -> float:
        return mt + (1 - v) * h

    parts = [svg_open("bench-chart", f"benchmark {metric}", lay.width, lay.height,
                      f"{metric} per benchmark: base vs candidate vs production (95% Wilson intervals)")]
    parts += y_grid(0, 1, sy, ml, w, [0, 0.25, 0.5, 0.75, 1.0])
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
            if not is_num(v):
                continue
            v = max(0.0, min(1.0, float(v)))
            lo, hi = wilson(v, int(r.get("n") or 0))
            cx = x + bar / 2
            parts.append(
                f'<rect class="bar bar-{m}" x="{x + 2:.1f}" y="{sy(v):.1f}" width="{bar - 4:.1f}" '
                f'height="{max(0.5, v * h):.1f}" fill="{COLORS[m]}">'
                f"<title>{esc(r['name'])} {m}: {esc(metric)} {v:.3f} (95% interval {lo:.3f} to {hi:.3f}, "
                f"n={int(r.get('n') or 0)})</title></rect>"
                f'<line class="whisker" x1="{cx:.1f}" x2="{cx:.1f}" y1="{sy(hi):.1f}" y2="{sy(lo):.1f}"/>'
                f'<line class="whisker" x1="{cx - 5:.1f}" x2="{cx + 5:.1f}" y1="{sy(hi):.1f}" y2="{sy(hi):.1f}"/>'
                f'<line class="whisker" x1="{cx - 5:.1f}" x2="{cx + 5:.1f}" y1="{sy(lo):.1f}" y2="{sy(lo):.1f}"/>'
                f'<text class="value" x="{cx:.1f}" y="{sy(hi) - 4:.1f}" text-anchor="middle">{v:.2f}</text>')
    names, subs = bench_axis_texts(rows)
    if lay.rotate:  # one label per benchmark: the name, then role and n in the sublabel's style
        for lb, name, sub in zip(lay.labels, names, subs):
            parts.append(f'<text class="label" x="{lb.x:.1f}" y="{lb.y}" text-anchor="end" '
                         f'transform="rotate({lb.angle:g} {lb.x:.1f} {lb.y})">{esc(name)}'
                         f'<tspan class="sublabel"> · {esc(sub)}</tspan></text>')
    else:           # two per benchmark: the name, and role and n below it
        for lb in lay.labels:
            parts.append(f'<text class="{lb.cls}" x="{lb.x:.1f}" y="{lb.y}" text-anchor="middle">{esc(lb.text)}</text>')
    parts.append(f'<line class="axis" x1="{ml}" x2="{ml + w}" y1="{mt + h}" y2="{mt + h}"/></svg>')
    return Markup("".join(parts))


# ----------------------------------------------------------------------------- gate deltas, counts


def threshold_line(kind: str, threshold: float) -> float:
    """Where a check's threshold sits on the delta axis (forgetting budgets are drops)."""
    return -threshold if kind in ("forgetting", "champion", "alignment") else threshold


def delta_plot(checks: list[dict], *, width: int = 720) -> Markup:
    """One row per gate check: the delta (point) with its interval, the threshold (dashed), 0."""
    row_h, ml, mr, mt, mb = 30, 230, 24, 10, 30
    height = mt + mb + row_h * len(checks)
    w = width - ml - mr
    vals = [0.0]
    for c in checks:
        for v in [c.get("delta"), *(c.get("ci") or [])]:
            if is_num(v):
                vals.append(float(v))
        if is_num(c.get("threshold")):
            vals.append(threshold_line(str(c.get("kind")), float(c["threshold"])))
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, 0.1)
    lo, hi = lo - span * 0.1, hi + span * 0.1

    def sx(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * w

    parts = [svg_open("delta-chart", "gate deltas", width, height,
                      "Gate checks: delta vs reference with its interval; dashed = threshold")]
    for t in ticks(lo, hi, 6):
        parts.append(f'<line class="grid" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{mt}" y2="{height - mb}"/>'
                     f'<text class="tick" x="{sx(t):.1f}" y="{height - mb + 16}" text-anchor="middle">{t:+g}</text>')
    parts.append(f'<line class="zero" x1="{sx(0):.1f}" x2="{sx(0):.1f}" y1="{mt}" y2="{height - mb}"/>')
    for i, c in enumerate(checks):
        y = mt + row_h * i + row_h / 2
        color = PASS if c.get("passed") else FAIL
        parts.append(f'<text class="label" x="{ml - 8}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{esc(c.get("benchmark"))} · {esc(c.get("kind"))}</text>')
        if is_num(c.get("threshold")):
            tx = sx(threshold_line(str(c.get("kind")), float(c["threshold"])))
            parts.append(f'<line class="threshold" x1="{tx:.1f}" x2="{tx:.1f}" y1="{y - 10:.1f}" y2="{y + 10:.1f}">'
                         f"<title>threshold {esc(fmt(c.get('threshold')))}</title></line>")
        ci = c.get("ci")
        if ci and len(ci) == 2 and all(is_num(v) for v in ci):
            parts.append(f'<line class="ci" stroke="{color}" x1="{sx(ci[0]):.1f}" x2="{sx(ci[1]):.1f}" '
                         f'y1="{y:.1f}" y2="{y:.1f}"/>')
        if is_num(c.get("delta")):
            parts.append(f'<circle class="delta {"pass" if c.get("passed") else "fail"}" cx="{sx(c["delta"]):.1f}" '
                         f'cy="{y:.1f}" r="5" fill="{color}"><title>{esc(c.get("reason"))}</title></circle>')
    parts.append(f'<text class="axis-label" x="{ml + w / 2:.0f}" y="{height - 2}" text-anchor="middle">'
                 "delta (candidate − reference)</text></svg>")
    return Markup("".join(parts))


def hbars(items: list[tuple[str, float]], *, width: int = 520, color: str = "#b45309") -> Markup:
    """Horizontal count bars (quarantine reasons)."""
    row_h, ml, mr = 22, 190, 60
    height = row_h * len(items) + 6
    top = max([v for _, v in items] + [1])
    w = width - ml - mr
    parts = [svg_open("hbars", "counts by reason", width, height)]
    for i, (label, v) in enumerate(items):
        y = 3 + i * row_h
        bw = max(1.0, v / top * w) if v else 0.0
        parts.append(f'<text class="label" x="{ml - 8}" y="{y + 15}" text-anchor="end">{esc(label)}</text>'
                     f'<rect x="{ml}" y="{y + 3}" width="{bw:.1f}" height="{row_h - 6}" fill="{color}"/>'
                     f'<text class="value" x="{ml + bw + 6:.1f}" y="{y + 15}">{esc(fmt(v))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
