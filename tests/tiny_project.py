"""Test helpers: a copy of this project on a tiny random-weight model, and subprocess plumbing.

``build_tiny_project`` copies the project's code and DAG into a folder, points ``base_model`` at a
tiny random Llama (``tempering.testing.make_tiny_model``) with ``TINY_OVERRIDES``, and makes it a
git + DVC repository. The session fixture ``tiny_project`` (tests/conftest.py) reproduces it once;
tests that change it work on ``copy_project`` copies (DVC cache included, so nothing re-runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", "params.yaml", "tasks", "tempering", "flows", "infra", "benchmarks", ".dvcignore",
        "bench/results-frontier.json"]  # the report stage plots the committed replay sweep

# Small enough to run in about two minutes on 2 cores, large enough for every stage to do work.
TINY_OVERRIDES = {
    "base_model": {"dtype": "float32"},
    "make_data": {"n_entities": 6, "sft_paraphrases": 2, "n_general": 16},
    # A random model answers with newlines only: its replay rows would all be quarantined as empty
    # (and validate would stop, as it should). Off here: the stage writes its empty source, which
    # validate accepts (allow_empty). The real model's replay runs in test_smollm2_e2e.
    "replay": {"enabled": False},
    "cpt": {"enabled": True, "max_steps": 3, "batch_size": 4, "block_size": 64, "save_steps": 2},
    "sft": {"max_steps": 6, "batch_size": 4, "save_steps": 3, "learning_rate": 5e-3},
    "dpo": {"max_steps": 4, "batch_size": 4, "save_steps": 2},
    # 8 items per benchmark cannot certify the default budgets; the tiny project's gate is
    # lenient (a random model has nothing to forget) and keeps every check's code path.
    "evaluate": {"limit": 8, "batch_size": 8, "drift": {"n_texts": 16}, "dev": {"drift": {"n_texts": 16}}},
    # Two points keep the sweep's code path (dev scoring, the choice, the saved interpolation).
    "export": {"interpolation": {"alphas": [1.0, 0.5]}},
    # A handful of held-out preference pairs cannot certify any alignment margin (even 1.0 fails
    # when the bootstrap can draw only flipped pairs): measured by evaluate, not checked here.
    "gate": {"min_domain_gain": -1.0, "max_forgetting": {"default": 1.0}, "production_margin": None,
             "alignment_margin": None, "max_kl": 50.0, "max_perplexity_ratio": 50.0, "min_drift_texts": 8},
    "tracking": {"wandb": "offline"},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def env_for_subprocess() -> dict:
    """This interpreter's venv first on PATH (stage commands call `python`), everything offline."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update({"DVC_NO_ANALYTICS": "1", "WANDB_MODE": "offline", "CI": env.get("CI", "true"),
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return env


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output when it exits non-zero."""
    proc = subprocess.run(cmd, cwd=cwd, env=env_for_subprocess(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def dvc(root: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], root, timeout=timeout)


def git_commit(root: Path, message: str = "tiny") -> None:
    ident = ["-c", "user.email=t@t", "-c", "user.name=t"]
    run(["git", *ident, "add", "-A"], root)
    run(["git", *ident, "commit", "-qm", message], root)


def build_tiny_project(root: Path, tiny_model_dir: Path, overrides: dict | None = None) -> Path:
    """Copy the project into ``root`` on a tiny model; git + DVC initialised, nothing run yet."""
    from tempering.testing import make_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    tiny = make_tiny_model(tiny_model_dir)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = merge(params, merge(TINY_OVERRIDES, overrides or {}))
    params["base_model"]["source"] = str(tiny)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    git_commit(root)
    dvc(root, "init", "-q")
    return root


def copy_project(src: Path, dst: Path) -> Path:
    """A working copy of a reproduced project (git, DVC cache and outputs included)."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "tempering.lock"))
    return dst
