"""Checkpoints: which one a stage resumes from, and whether it belongs to this run.

Owns the one parser of checkpoint names (:func:`checkpoint_step`), the run fingerprint
(:func:`fingerprint`: params section + input hashes + the training code), complete checkpoints
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


# The libraries whose versions are part of the training code (a new one may train differently).
TRAINING_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate")


def training_code_id(stage_file: str | os.PathLike | None = None) -> str:
    """Hash of the code that trains: every source file of ``tempering.train``, the stage's own
    module (``stage_file``, e.g. tasks/sft.py) and the versions of :data:`TRAINING_LIBRARIES`."""
    import hashlib
    from importlib import metadata

    files = sorted(Path(__file__).parent.glob("*.py"))
    if stage_file is not None:
        files.append(Path(stage_file))
    sources = {p.name if p.parent == Path(__file__).parent else f"stage/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
               for p in files}
    versions = {}
    for lib in TRAINING_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[lib] = metadata.version(lib)
    return content_id({"sources": sources, "versions": versions}, 32)


def fingerprint(section, *, stage_file: str | os.PathLike | None = None, **inputs: str) -> str:
    """Hash of a stage's params section, its input hashes and the training code
    (:func:`training_code_id`): checkpoints resume only under it. A code change restarts training
    as DVC re-runs the stage for it, so a finished checkpoint of older code is never passed off as
    this code's model; a crash resumes, since the code is the same."""
    params = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return content_id({"params": params, "inputs": inputs, "code": training_code_id(stage_file)}, 32)


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

