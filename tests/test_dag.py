"""The flow's stage order is derived from dvc.yaml and agrees with DVC's own graph."""

import os
from pathlib import Path

import pytest

from tempering.dag import stage_order

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = ["base_model", "make_data", "replay", "validate", "dedup", "cpt", "sft", "dpo", "export",
            "champion", "evaluate", "gate", "promote", "report"]


def test_stage_order_matches_issue_dag():
    assert stage_order(ROOT / "dvc.yaml") == EXPECTED


def test_stage_order_agrees_with_dvc_graph():
    """Every edge in DVC's own graph goes forward in our order, and the stage sets are equal."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph
        names = {stage.addressing for stage in graph.nodes}
        order = stage_order(ROOT / "dvc.yaml")
        assert names == set(order)
        pos = {name: i for i, name in enumerate(order)}
        # dvc's graph edges point from a stage to the stages it depends on.
        for stage, upstream in graph.edges:
            assert pos[upstream.addressing] < pos[stage.addressing], (stage, upstream)


def test_every_stage_has_a_module_and_main():
    import importlib

    for name in EXPECTED:
        mod = importlib.import_module(f"tasks.{name}")
        assert callable(mod.run) and callable(mod.main)
        assert f"python -m tasks.{name}" in (mod.__doc__ or ""), f"tasks/{name}.py docstring lacks its command"


def test_cycle_is_reported(tmp_path):
    from tempering import TemperingError

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  a:\n    cmd: x\n    deps: [b.txt]\n    outs: [a.txt]\n"
        "  b:\n    cmd: y\n    deps: [a.txt]\n    outs: [b.txt]\n"
    )
    with pytest.raises(TemperingError, match="cycle"):
        stage_order(tmp_path / "dvc.yaml")
