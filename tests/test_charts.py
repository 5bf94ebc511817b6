"""The report's charts (tempering/charts.py): axis labels never overlap, data is escaped.

The label test needs no browser: it takes the boxes the layout itself computes (each label's
estimated advance width and the font's ascent and descent, rotated with the label) and checks
every pair with the separating-axis test. The estimates are an upper bound on what a browser
draws (``tests/test_html_report.py`` checks the same charts' real boxes in Chromium).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import pytest
import yaml

from tempering import charts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NAMES = [b["name"] for b in yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["benchmarks"]]
assert len(DEFAULT_NAMES) >= 5, DEFAULT_NAMES  # the default bundle, read from params.yaml
LONG_NAMES = ["domain", "general_knowledge", "general_arithmetic", "arc_easy", "arc_challenge", "hellaswag",
              "piqa", "boolq", "winogrande_debiased_xl", "truthfulqa_mc2_multiple_choice", "mmlu_high_school_macro",
              "a_benchmark_name_far_longer_than_any_real_one_so_far"]


def _rows(names, n=499):
    return [{"name": name, "role": "general", "n": n, "base": 0.5, "candidate": 0.52} for name in names]


def _overlapping(boxes) -> list[tuple[int, int]]:
    return [(i, j) for (i, p), (j, q) in itertools.combinations(enumerate(boxes), 2) if charts.boxes_overlap(p, q)]


def test_the_overlap_test_sees_an_overlap():
    square = ((0, 0), (10, 0), (10, 10), (0, 10))
    assert charts.boxes_overlap(square, tuple((x + 5, y + 5) for x, y in square))
    assert not charts.boxes_overlap(square, tuple((x + 10, y) for x, y in square))   # touching only
    diamond = ((15, 5), (20, 0), (25, 5), (20, 10))
    assert not charts.boxes_overlap(square, diamond)


@pytest.mark.parametrize("names", [DEFAULT_NAMES, ["domain", "general_knowledge", "general_arithmetic"],
                                   LONG_NAMES[:8], LONG_NAMES, LONG_NAMES * 2, ["x"], []],
                         ids=["default-bundle", "issue-pair", "eight", "twelve-long", "twenty-four", "one", "none"])
def test_benchmark_axis_labels_never_overlap(names):
    lay = charts.bench_label_layout(_rows(names))
    boxes = charts.label_boxes(lay)
    assert len(boxes) == (len(names) if lay.rotate else 2 * len(names))
    assert _overlapping(boxes) == []
    # Every label inside the chart: left of the plot's right edge, right of 0, above the bottom.
    for box in boxes:
        xs, ys = [x for x, _ in box], [y for _, y in box]
        assert min(xs) >= 0 and max(xs) <= lay.width and max(ys) <= lay.height, (box, lay.width, lay.height)
    # The chart draws exactly these labels, at these anchors.
    svg = str(charts.benchmark_bars(_rows(names), "acc"))
    drawn = re.findall(r'<text class="label" x="([\d.]+)" y="([\d.]+)"', svg)
    expected = [lb for lb in lay.labels if lb.cls == "label"]
    assert [(float(x), float(y)) for x, y in drawn] == [(round(lb.x, 1), lb.y) for lb in expected]
    assert (f'width="{lay.width}" height="{lay.height}"' in svg) and (("rotate(-40 " in svg) == lay.rotate)


def test_the_issue_pair_collides_when_forced_side_by_side(monkeypatch):
    """Control: drawn flat at the default chart width, as the chart once drew them, the labels of
    the default bundle's long names do collide, so the test above can fail."""
    names = ["domain", "general_knowledge", "general_arithmetic", "arc_easy", "arc_challenge", "hellaswag", "piqa",
             "boolq"]
    monkeypatch.setattr(charts, "LABEL_CHAR_PX", 0.0)
    monkeypatch.setattr(charts, "SUBLABEL_CHAR_PX", 0.0)
    flat = charts.bench_label_layout(_rows(names))
    assert not flat.rotate
    monkeypatch.undo()
    real = dataclasses.replace(flat, labels=tuple(
        dataclasses.replace(lb, width=len(lb.text) * (charts.LABEL_CHAR_PX if lb.cls == "label" else charts.SUBLABEL_CHAR_PX))
        for lb in flat.labels))
    pairs = _overlapping(charts.label_boxes(real))
    texts = {(real.labels[i].text, real.labels[j].text) for i, j in pairs}
    assert ("general_knowledge", "general_arithmetic") in texts


def test_data_is_escaped_in_every_chart():
    evil = "<script>alert(1)</script>"
    svgs = [charts.benchmark_bars(_rows([evil, "ok"]), evil),
            charts.benchmark_bars(_rows([evil]), "acc"),
            charts.delta_plot([{"benchmark": evil, "kind": evil, "threshold": 0.05, "delta": 0.1, "ci": [0.0, 0.2],
                                "passed": True, "reason": evil}]),
            charts.hbars([(evil, 3)]),
            charts.line_chart([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], title=evil)]
    for svg in svgs:
        assert "<script" not in svg and "&lt;script&gt;alert(1)&lt;/script&gt;" in svg


def test_number_formatting():
    assert charts.fmt(None) == "–" and charts.fmt(True) == "yes" and charts.fmt(12345) == "12,345"
    assert charts.fmt(0.5) == "0.500" and charts.fmt(0.5, signed=True) == "+0.500" and charts.fmt(-3, signed=True) == "-3"
    assert charts.fmt(1234.5) == "1,234.5" and charts.pct(0.0236) == "2.4%" and charts.pct(None) == "–"
    assert charts.ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_frontiers_draw_one_coloured_curve_per_share_with_a_legend():
    from tempering import charts

    curves = [{"label": "share <0>", "chosen": 0.5, "points": [{"alpha": 1, "kl": 1.0, "gain": 0.2},
                                                               {"alpha": 0.5, "kl": 0.4, "gain": 0.1}]},
              {"label": "share 0.2", "chosen": 1.0, "points": [{"alpha": 0.5, "kl": 0.2, "gain": 0.15},
                                                               {"alpha": 1, "kl": 0.6, "gain": 0.3}]},
              {"label": "empty", "chosen": None, "points": []}]
    svg = str(charts.frontiers(curves, kl_limit=0.3))
    assert svg.count('class="curve"') == 2 and svg.count("<circle") == 4 and svg.count('r="6"') == 2
    colours = {c for c in charts.CURVE_COLORS[:2]}
    assert all(f'stroke="{c}"' in svg for c in colours)
    assert "share &lt;0&gt;" in svg and "<0>" not in svg        # labels are text, escaped
    assert "gate.max_kl 0.3" in svg and ">empty<" not in svg     # a curve with no points is left out
    assert "α 1" not in svg                                      # alpha labels only on a single curve
    single = str(charts.frontier([{"alpha": 1, "kl": 1.0, "gain": 0.2}], 1.0))
    assert "α 1" in single and single.count('class="curve"') == 1
