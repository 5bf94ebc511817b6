"""Process environment defaults: offline, no telemetry, quiet progress bars under CI.

Called once at the start of every stage CLI and flow. Never overrides what the user set.
"""

from __future__ import annotations

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


def is_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def setup(*, offline: bool = True) -> None:
    """Apply environment defaults. ``offline=False`` leaves the hub reachable (base_model)."""
    for key, value in OFFLINE_DEFAULTS.items():
        if not offline and key in {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"}:
            continue
        os.environ.setdefault(key, value)
    if is_ci():
        # Progress bars are for people: keep them locally, silence them in CI logs.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
