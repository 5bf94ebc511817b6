"""Process environment defaults: offline, no telemetry, quiet progress bars under CI.

Called once at the start of every stage CLI and flow. Never overrides what the user set.
"""

from __future__ import annotations

import logging
import os

OFFLINE_DEFAULTS = {
    # Hugging Face: never reach the hub unless the user asks for a hub model (base_model only).
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # W&B: offline by default; runs sync later with `wandb sync` when a key is configured.
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DISABLE_GIT": "false",
    # DVC / Prefect telemetry off: these otherwise try the network on every command.
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# Library log lines that say nothing a user can act on, dropped at their source logger (never
# elsewhere). bitsandbytes tries, on every import on an AVX512-BF16 CPU, to fetch an optional
# 4-bit CPU kernel from the hub package `kernels` and warns when that package is absent; its own
# fallback kernel is used either way, and tempering never runs 4-bit on CPU (QLoRA needs CUDA).
QUIET_LOG_LINES = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}


class _DropLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_logs() -> None:
    """Attach the drop filters (idempotent; works before or after the library is imported)."""
    for name, prefixes in QUIET_LOG_LINES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in log.filters):
            log.addFilter(_DropLines(prefixes))


def is_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def setup(*, offline: bool = True) -> None:
    """Apply environment defaults. ``offline=False`` leaves the hub reachable (base_model)."""
    for key, value in OFFLINE_DEFAULTS.items():
        if not offline and key in {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"}:
            continue
        os.environ.setdefault(key, value)
    quiet_library_logs()
    if is_ci():
        # Progress bars are for people: keep them locally, silence them in CI logs.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
