"""The stage order, read from ``dvc.yaml`` (the one source of truth for the DAG).

Flows call :func:`stage_order`; a test checks it against DVC's own graph so the two never drift.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tempering import TemperingError


def _norm(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/")


def _paths(entries) -> list[str]:
    out = []
    for entry in entries or []:
        out.append(_norm(next(iter(entry)) if isinstance(entry, dict) else entry))
    return out


def _inside(dep: str, out: str) -> bool:
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def load_stages(dvc_yaml: str | os.PathLike = "dvc.yaml") -> dict[str, dict]:
    path = Path(dvc_yaml)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TemperingError(f"{path}: not found (run from the project root)") from None
    stages = doc.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise TemperingError(f"{path}: no 'stages' mapping")
    return stages


def stage_order(dvc_yaml: str | os.PathLike = "dvc.yaml") -> list[str]:
    """Stages in a topological order of their deps/outs, ties broken by file order."""
    stages = load_stages(dvc_yaml)
    outs = {}
    for name, stage in stages.items():
        outs[name] = _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))
    upstream: dict[str, set[str]] = {name: set() for name in stages}
    for name, stage in stages.items():
        for dep in _paths(stage.get("deps")):
            for other, other_outs in outs.items():
                if other != name and any(_inside(dep, o) for o in other_outs):
                    upstream[name].add(other)
    order: list[str] = []
    remaining = list(stages)
    while remaining:
        ready = [n for n in remaining if upstream[n] <= set(order)]
        if not ready:
            raise TemperingError(f"{dvc_yaml}: cycle between stages {remaining}")
        order.append(ready[0])
        remaining.remove(ready[0])
    return order


