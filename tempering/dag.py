"""The DAG as DVC holds it: the stage order read from ``dvc.yaml`` (the one source of truth),
and the one way the project runs DVC itself.

Flows call :func:`stage_order`; a test checks it against DVC's own graph so the two never drift.
:func:`run_dvc` is the only subprocess call of ``dvc`` (the Prefect pipeline's per-stage
``dvc repro``, the refresh flow's ``dvc add`` / ``push``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


_VAR = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


def _lookup(params: dict, key: str, where: str):
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise TemperingError(f"{where}: ${{{key}}} is not a key of params.yaml")
        node = node[part]
    if isinstance(node, (dict, list)) or node is None:
        raise TemperingError(f"{where}: ${{{key}}} is not a single value in params.yaml")
    return node


def resolve(node, params: dict, where: str = "dvc.yaml"):
    """``${section.key}`` in every string of ``node`` replaced from ``params`` (params.yaml), as
    DVC's templating does for the values it reads by default; dict keys too (a metrics entry)."""
    if isinstance(node, str):
        return _VAR.sub(lambda m: str(_lookup(params, m.group(1), where)), node)
    if isinstance(node, list):
        return [resolve(x, params, where) for x in node]
    if isinstance(node, dict):
        return {resolve(k, params, where): resolve(v, params, where) for k, v in node.items()}
    return node


def load_stages(dvc_yaml: str | os.PathLike = "dvc.yaml", *, interpolate: bool = True) -> dict[str, dict]:
    """The ``stages`` mapping of ``dvc.yaml``; with ``interpolate``, ``${...}`` resolved from the
    ``params.yaml`` beside it (so ``${make_data.out}`` in a dep matches the out it names)."""
    path = Path(dvc_yaml)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TemperingError(f"{path}: not found (run from the project root)") from None
    stages = doc.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise TemperingError(f"{path}: no 'stages' mapping")
    if interpolate and _VAR.search(path.read_text(encoding="utf-8")):
        params_file = path.parent / "params.yaml"
        try:
            params = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise TemperingError(f"{path}: uses ${{...}} but {params_file} is not found") from None
        stages = {name: resolve(stage, params, f"{path}: stages.{name}") for name, stage in stages.items()}
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




def run_dvc(*args: str, root: str | os.PathLike = ".") -> tuple[int, str]:
    """``python -m dvc <args>`` in ``root`` with this interpreter: (exit code, stdout + stderr).

    This interpreter's folder (the project's venv) goes first on PATH, because the stage commands
    in ``dvc.yaml`` call ``python``. Callers word their own errors from the output."""
    environ = dict(os.environ)
    environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environ.get("PATH", "")
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=environ, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr
