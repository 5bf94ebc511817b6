"""tempering.train.checkpoints: resume only under a matching fingerprint, and what changes one."""

from __future__ import annotations

import json
from pathlib import Path

from tempering.config import from_dict
from tempering.train.checkpoints import fingerprint, prepare_checkpoints


def _fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    ck = folder / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ck


def test_prepare_checkpoints_resumes_only_on_matching_fingerprint(tmp_path):
    folder = tmp_path / "ck"
    assert prepare_checkpoints(folder, "fp1") is None  # fresh
    _fake_checkpoint(folder, 2)
    _fake_checkpoint(folder, 4)
    partial = _fake_checkpoint(folder, 6, complete=False)  # killed mid-save
    assert prepare_checkpoints(folder, "fp1") == folder / "checkpoint-4"
    assert not partial.exists()
    assert prepare_checkpoints(folder, "fp2") is None  # other params/data: start over
    assert not list(folder.glob("checkpoint-*"))
    assert json.loads((folder / "fingerprint.json").read_text())["fingerprint"] == "fp2"


def test_fingerprint_changes_with_params_and_inputs():
    p1 = from_dict({}).sft
    p2 = from_dict({"sft": {"learning_rate": 1e-4}}).sft
    assert fingerprint(p1, data="a") == fingerprint(p1, data="a")
    assert fingerprint(p1, data="a") != fingerprint(p2, data="a")
    assert fingerprint(p1, data="a") != fingerprint(p1, data="b")


def test_fingerprint_changes_with_the_training_code(tmp_path):
    """A finished checkpoint of other code is not this code's model: the stage's module (and
    tempering.train's sources, and the training libraries' versions) are in the fingerprint."""
    p = from_dict({}).sft
    stage = tmp_path / "sft.py"
    stage.write_text("STEP = 1\n")
    first = fingerprint(p, stage_file=stage, data="a")
    assert fingerprint(p, stage_file=stage, data="a") == first
    stage.write_text("STEP = 2\n")
    assert fingerprint(p, stage_file=stage, data="a") != first
    assert fingerprint(p, data="a") != first
