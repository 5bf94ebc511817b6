"""Process defaults (tempering.env): offline env, and library log lines a user cannot act on."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from tempering import env

ROOT = Path(__file__).resolve().parents[1]
BNB_LINE = "Failed to load CPU gemm_4bit_forward"


def test_setup_never_overrides_what_the_user_set(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    env.setup()
    assert os.environ["WANDB_MODE"] == "online"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_the_quiet_filter_drops_only_its_own_lines(caplog):
    env.quiet_library_logs()
    env.quiet_library_logs()  # idempotent: one filter, not two
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(isinstance(f, env._DropLines) for f in log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning(BNB_LINE + " from kernels-community: %s.", "No module named 'kernels'")
        log.warning("a real problem")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a real problem"]


def _import_bnb(setup: bool) -> str:
    code = ("from tempering import env; env.setup(); " if setup else "") + "import bitsandbytes"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_importing_bitsandbytes_after_setup_prints_no_cpu_kernel_warning():
    quiet = _import_bnb(setup=True)
    assert BNB_LINE not in quiet
    # The control shows the check has teeth where bitsandbytes does warn (an AVX512-BF16 CPU
    # without the `kernels` package, as on the project's machines).
    loud = _import_bnb(setup=False)
    if BNB_LINE not in loud:
        import pytest

        pytest.skip("bitsandbytes does not print its CPU-kernel warning on this machine")
