"""The Prefect flow: stage list from dvc.yaml, one-line stage errors, nothing run twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.pipeline import StageFailed, _one_line_error, pipeline

FAILING_DVC = """\
stages:
  first:
    cmd: python write.py a.txt
    outs: [a.txt]
  second:
    cmd: python fail.py
    deps: [a.txt]
    outs: [b.txt]
  third:
    cmd: python write.py c.txt
    deps: [b.txt]
    outs: [c.txt]
"""
SCRIPTS = {
    "write.py": "import sys; open(sys.argv[1], 'w').write('x')\n",
    "fail.py": "import sys\nprint('tempering second: error: data/x.jsonl: row 3: field output is empty', file=sys.stderr)\nsys.exit(2)\n",
}


@pytest.fixture()
def failing_project(tmp_path: Path) -> Path:
    (tmp_path / "dvc.yaml").write_text(FAILING_DVC)
    for name, text in SCRIPTS.items():
        (tmp_path / name).write_text(text)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    return tmp_path


def test_one_line_error_prefers_the_stage_message():
    out = "Running stage 'x':\n> python -m tasks.x\ntempering x: error: a.jsonl: row 2: field output: empty\nERROR: failed to reproduce 'x'"
    assert _one_line_error("x", out) == "tempering x: error: a.jsonl: row 2: field output: empty"
    assert _one_line_error("x", "ERROR: boom\n") == "stage x: ERROR: boom"
    assert _one_line_error("x", "") == "stage x failed"


def test_flow_fails_with_the_stage_error_and_stops(failing_project: Path, prefect_harness):
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + old
    try:
        with pytest.raises(StageFailed) as err:
            pipeline(root=str(failing_project))
    finally:
        os.environ["PATH"] = old
    assert str(err.value) == "tempering second: error: data/x.jsonl: row 3: field output is empty"
    assert (failing_project / "a.txt").exists()
    assert not (failing_project / "c.txt").exists(), "a stage after the failure must not run"


def test_flow_rejects_unknown_stage(failing_project: Path, prefect_harness):
    from tempering import TemperingError

    with pytest.raises(TemperingError, match="unknown stage"):
        pipeline(root=str(failing_project), stages=["nope"])


def test_run_params_file_and_overrides_land_in_params_yaml(tmp_path: Path):
    """Deployment parameters: checked by the schema first, then written keeping comments."""
    import yaml

    from flows.workspace import use_params
    from tempering.config import ParamsError

    params = tmp_path / "params.yaml"
    params.write_text("# the knobs\nsft:\n  learning_rate: 1.0e-3  # LoRA tolerates more\n  max_steps: -1\n")
    assert use_params(tmp_path, "params.yaml", ["sft.learning_rate=5e-4", "sft.max_steps=7"]) is True
    text = params.read_text()
    assert "# the knobs" in text and "# LoRA tolerates more" in text
    assert yaml.safe_load(text)["sft"] == {"learning_rate": 5e-4, "max_steps": 7}
    assert use_params(tmp_path, "params.yaml", ["sft.max_steps=7"]) is False
    with pytest.raises(ParamsError, match="sft.learning_rate"):
        use_params(tmp_path, "params.yaml", ["sft.learning_rate=-1"])
    assert yaml.safe_load(params.read_text())["sft"]["learning_rate"] == 5e-4, "a rejected override wrote"
    (tmp_path / "gpu.yaml").write_text("# GPU box\ntrain:\n  launcher: ddp\n")
    assert use_params(tmp_path, "gpu.yaml", ["train.num_processes=4"]) is True
    assert yaml.safe_load(params.read_text())["train"] == {"launcher": "ddp", "num_processes": 4}
    assert params.read_text().startswith("# GPU box")
