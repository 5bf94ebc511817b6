"""The stage contract, checked: what each stage reads is what dvc.yaml says it reads.

DVC re-runs a stage only when a declared dependency changed, so an undeclared one is a silent
stale result. For every stage in dvc.yaml:

- its command runs the module of the same name in tasks/ (directly or through
  tempering.launcher), and every module in tasks/ is a stage;
- the module's ``PARAMS`` (the params.yaml sections or single keys it reads) is exactly the
  stage's ``params:``, and every ``params.<section>`` the module touches is declared there;
- every project module it imports, directly or through other project modules (lazy imports
  inside functions included), is under one of its ``deps:``;
- every path on its command line is a dep or an out (the registry, which DVC cannot see, is
  passed by ``${...}`` interpolation and tracked through the champion stage).
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from tempering.dag import load_stages

ROOT = Path(__file__).resolve().parents[1]
# ``${...}`` resolved from params.yaml as DVC does (make_data.out names a folder, not a literal);
# the raw commands keep theirs (the registry is passed that way on purpose).
DVC = load_stages(ROOT / "dvc.yaml")
RAW = load_stages(ROOT / "dvc.yaml", interpolate=False)
PACKAGES = ("tasks", "tempering")
# Field names on Params (validate_ because `validate` is a pydantic method name) -> params.yaml keys.
FIELD_TO_KEY = {"validate_": "validate"}


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Project modules a file imports anywhere in it (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from tempering import backend`
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _closure(module: str) -> set[str]:
    """Files of every project module reachable from ``module``, package __init__ files included."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            f = _module_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(_imports(f))
    return {f.relative_to(ROOT).as_posix() for f in seen}


def _stage_modules(cmd: str) -> list[str]:
    return re.findall(r"(?:-m|tempering\.launcher)\s+((?:tasks|tempering)\.[\w.]+)", cmd) + \
        re.findall(r"tempering\.launcher\s+(tasks\.\w+)", cmd)


def _covered(path: str, declared: list[str]) -> bool:
    path = path.rstrip("/")
    for d in declared:
        d = d.rstrip("/")
        if path == d or path.startswith(d + "/") or d.startswith(path + "/"):
            return True
    return False


def _names(entries) -> list[str]:
    """dvc.yaml deps/outs/metrics entries are strings or one-key dicts (with options)."""
    out = []
    for e in entries or []:
        out.extend(e.keys() if isinstance(e, dict) else [e])
    return [str(x) for x in out]


def _params_touched(path: Path) -> set[str]:
    """``params.<section>`` (and ``params.<section>.<key>``) read in a module's own code."""
    tree = ast.parse(path.read_text())
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    from tempering.config import Params

    sections = set(getattr(Params, "model_fields", None) or Params.__dataclass_fields__)
    out = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params"
                and node.attr in sections):
            chain = [FIELD_TO_KEY.get(node.attr, node.attr)]
            parent = parents.get(node)
            while isinstance(parent, ast.Attribute) and parent.value is node:  # params.sft.replay.source
                chain.append(parent.attr)
                node, parent = parent, parents.get(parent)
            out.add(".".join(chain))
    return out


def test_every_stage_runs_its_own_module_and_every_module_is_a_stage():
    modules = {p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"}
    assert modules == set(DVC), (modules ^ set(DVC))
    for stage, spec in DVC.items():
        assert f"tasks.{stage}" in _stage_modules(spec["cmd"]), (stage, spec["cmd"])


@pytest.mark.parametrize("stage", sorted(DVC))
def test_declared_params_are_the_stages_params(stage):
    module = importlib.import_module(f"tasks.{stage}")
    declared = set(module.PARAMS)
    dvc = set(DVC[stage].get("params") or [])
    assert declared == dvc, (f"tasks/{stage}.py PARAMS and dvc.yaml stages.{stage}.params differ: "
                             f"only in PARAMS {sorted(declared - dvc)}, only in dvc.yaml {sorted(dvc - declared)}")
    # What the code touches is declared: it or a section above it (`sft` covers
    # `params.sft.replay.source`), or (for a section read key by key) each key. A section passed
    # down whole (`bundle(cfg, params.gate)`) counts as read when any key under it is declared:
    # the helper's own keys are then the declaration's responsibility.
    for used in _params_touched(ROOT / "tasks" / f"{stage}.py"):
        parts = used.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        ok = bool(prefixes & declared) or any(d.startswith(used + ".") for d in declared)
        assert ok, f"tasks/{stage}.py reads params.{used}, which PARAMS / dvc.yaml do not declare"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_imported_project_module_is_a_dep(stage):
    spec = DVC[stage]
    deps = _names(spec.get("deps"))
    files = set()
    for module in _stage_modules(spec["cmd"]):
        files |= _closure(module)
    missing = sorted(f for f in files if not _covered(f, deps))
    assert not missing, f"dvc.yaml stages.{stage}.deps misses the project code it runs: {missing}"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_path_on_the_command_line_is_a_dep_or_an_out(stage):
    spec = DVC[stage]
    declared = _names(spec.get("deps")) + _names(spec.get("outs")) + _names(spec.get("metrics")) + \
        _names(spec.get("plots"))
    tokens = RAW[stage]["cmd"].split()
    paths = [t for i, t in enumerate(tokens)
             if i and tokens[i - 1].startswith("--") and "${" not in t and not t.startswith("-")
             and ("/" in t or (ROOT / t).is_dir() or t in {"."})]
    paths = [p for p in paths if p != "."]  # report's --root: the workspace itself
    missing = [p for p in paths if not _covered(p, declared)]
    assert not missing, f"dvc.yaml stages.{stage}: command-line paths neither deps nor outs: {missing}"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_file_a_declared_param_points_at_is_a_dep(stage):
    """Files named in params.yaml are read too: a stage reading evaluate.benchmarks / .drift
    depends on every benchmark file (and PIQA's labels) and the drift text set; validate on
    every file of validate.sources."""
    from tempering.config import load_params

    declared = set(importlib.import_module(f"tasks.{stage}").PARAMS)
    ev = load_params(ROOT / "params.yaml").evaluate
    files = []
    if declared & {"evaluate", "evaluate.benchmarks"}:
        files += [f for b in ev.benchmarks for f in (b.path, b.labels) if f]
    if declared & {"evaluate", "evaluate.drift"} and ev.drift.path:
        files.append(ev.drift.path)
    if declared & {"evaluate", "evaluate.dev"}:
        files += [b.path for b in ev.dev.benchmarks] + ([ev.dev.drift.path] if ev.dev.drift.path else [])
    if "validate" in declared:
        files += [s.path for s in load_params(ROOT / "params.yaml").validate_.sources]
    deps = _names(DVC[stage].get("deps"))
    missing = [f for f in files if not _covered(f, deps)]
    assert not missing, f"dvc.yaml stages.{stage}.deps misses files its params name: {missing}"


def test_the_contract_test_sees_a_missing_dep():
    """The import walk is not vacuous: the validate stage really imports the training backend and
    the shared config/io modules, and a stage without them in its deps would fail above."""
    files = _closure("tasks.validate")
    assert {"tempering/config.py", "tempering/io.py", "tempering/__init__.py"} <= files
    assert not _covered("tempering/config.py", ["tasks/validate.py", "data/generated"])


def test_make_data_paths_are_params_not_literals():
    """make_data's folder is named once (make_data.out): dvc.yaml interpolates it wherever a stage
    writes or reads it, and resolving it gives the folder the params name."""
    from tempering.config import load_params

    out = load_params(ROOT / "params.yaml").make_data.out
    text = (ROOT / "dvc.yaml").read_text()
    assert out not in text, f"dvc.yaml names {out} literally; use ${{make_data.out}}"
    assert _names(DVC["make_data"]["outs"]) == [out]
    for stage in ("validate", "dedup", "evaluate", "export"):
        assert _covered(f"{out}/benchmarks/domain.jsonl", _names(DVC[stage]["deps"])), stage


def test_interpolation_names_a_missing_key(tmp_path):
    from tempering import TemperingError

    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo ${nope.key}\n    outs: [x]\n")
    (tmp_path / "params.yaml").write_text("make_data: {out: data/generated}\n")
    with pytest.raises(TemperingError, match=r"stages.a: \$\{nope.key\} is not a key of params.yaml"):
        load_stages(tmp_path / "dvc.yaml")
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: gen --out ${make_data.out}\n    outs: ['${make_data.out}']\n")
    assert load_stages(tmp_path / "dvc.yaml")["a"] == {"cmd": "gen --out data/generated", "outs": ["data/generated"]}
