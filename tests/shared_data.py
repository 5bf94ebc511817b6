"""The real public datasets the tests read but the repo never holds (training data stays the user's).

The folder is ``<repo>/../shared/data`` or ``$TEMPERING_SHARED_DATA``. On a user's fresh clone it
is absent and the tests that need it skip, saying so under ``-ra``. ``.ci/run`` sets
``TEMPERING_REQUIRE_SHARED_DATA=1`` whenever the folder is present, and then a missing file is a
failure, not a skip: under CI nothing skips silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TEMPERING_SHARED_DATA") or ROOT.parent / "shared" / "data")


def required() -> bool:
    return os.environ.get("TEMPERING_REQUIRE_SHARED_DATA") == "1"


def need(path: Path) -> Path:
    """``path`` (under SHARED) if it exists; else skip, or fail where the data is required."""
    if not path.exists():
        message = f"{path} not present (real public data; see ../shared/data/README.md)"
        if required():
            pytest.fail(f"{message}, but TEMPERING_REQUIRE_SHARED_DATA=1", pytrace=False)
        pytest.skip(message)
    return path
