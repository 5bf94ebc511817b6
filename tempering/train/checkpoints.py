"""Checkpoints: which one a stage resumes from, and whether it belongs to this run.

Owns the one parser of checkpoint names (:func:`checkpoint_step`), the run fingerprint
(:func:`fingerprint`: params section + input hashes), complete checkpoints
(:func:`valid_checkpoints`), resume-or-wipe (:func:`prepare_checkpoints`) and finished runs
(:func:`is_finished`). Plain files and JSON: no torch, transformers or trl.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from tempering import TemperingError
from tempering.io import content_id, read_json, write_json

FINGERPRINT_FILE = "fingerprint.json"


def fingerprint(section, **inputs: str) -> str:
    """Hash of a stage's params section plus its input hashes: checkpoints resume only under it."""
    params = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return content_id({"params": params, "inputs": inputs}, 32)


def checkpoint_step(path: str | os.PathLike | None) -> int | None:
    """The global step of a Trainer checkpoint folder (``checkpoint-<step>``), or None: the one
    parser of checkpoint names (resume, tests, the stages' ``resumed_from``)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir() or not path.name.startswith("checkpoint-"):
        return None
    try:
        return int(path.name.split("-", 1)[1])
    except ValueError:
        return None


def valid_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first. ``trainer_state.json`` is written last by the Trainer,
    so a checkpoint without a readable one was cut off mid-save."""
    folder = Path(folder)
    found = []
    for path in folder.glob("checkpoint-*"):
        step = checkpoint_step(path)
        if step is None:
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.append((step, path))
    return [p for _, p in sorted(found)]


def prepare_checkpoints(folder: str | os.PathLike, fp: str) -> Path | None:
    """Return the checkpoint to resume from, or None after wiping ``folder`` for a fresh start.

    Resume only when ``fingerprint.json`` matches ``fp`` (same params section, data and base
    model); otherwise the old checkpoints belong to another run and are removed. Partial
    (killed mid-save) checkpoints are removed too.
    """
    folder = Path(folder)
    old = None
    if (folder / FINGERPRINT_FILE).exists():
        with contextlib.suppress(TemperingError, AttributeError):
            old = read_json(folder / FINGERPRINT_FILE).get("fingerprint")
    if folder.exists() and old == fp:
        good = valid_checkpoints(folder)
        for path in folder.glob("checkpoint-*"):
            if path.is_dir() and path not in good:
                shutil.rmtree(path, ignore_errors=True)
        if good:
            return good[-1]
    elif folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / FINGERPRINT_FILE, {"fingerprint": fp})
    return None


def is_finished(checkpoint: str | os.PathLike) -> bool:
    """Whether a checkpoint is the end of its run (its last step, or stopped early by a callback)."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]:
        return True
    # Early stopping (or any callback) ended the run at this step: it is finished too.
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    return bool((control.get("args") or {}).get("should_training_stop"))

