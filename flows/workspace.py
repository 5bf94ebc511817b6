"""The workspace the flows run in: one writer at a time, and the params a run asked for.

- :func:`workspace_lock`: an exclusive ``flock`` on ``.dvc/tmp/tempering.lock``. Two flow runs
  (two processes, or two threads of one worker) never write the same workspace at once: the
  second waits up to ``refresh.lock_timeout_s`` and then fails naming the holder. Re-entrant in
  the thread that holds it, so the refresh flow can call the pipeline flow as a subflow.
- :func:`use_params`: a run's ``params_file`` and ``--set``-style ``overrides`` are checked by
  the typed schema first (one-line error naming the key), then written into ``params.yaml``
  keeping its comments, the way ``dvc exp run -S`` does, so ``dvc.lock`` records what ran.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tempering import TemperingError
from tempering.io import read_json_or_none

LOCK_FILE = Path(".dvc") / "tmp" / "tempering.lock"
POLL_S = 0.2

_held: dict[str, int] = {}          # lock path -> thread id holding it in this process
_held_guard = threading.Lock()


class WorkspaceLocked(TemperingError):
    """Another run holds the workspace lock and did not release it in time."""


def _holder(path: Path) -> str:
    info = read_json_or_none(path)  # missing, empty (just created) or torn: no holder to name
    if not isinstance(info, dict):
        return "another run"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.get("since", 0)))
    return f"{info.get('what', 'a run')} (pid {info.get('pid')} on {info.get('host')}, since {since})"


@contextlib.contextmanager
def workspace_lock(root: str | os.PathLike, *, timeout: float = 3600.0, what: str = "a flow run") -> Iterator[Path]:
    """Hold the workspace's exclusive lock for the duration of the block."""
    path = (Path(root) / LOCK_FILE).resolve()
    key = str(path)
    me = threading.get_ident()
    with _held_guard:
        reentrant = _held.get(key) == me
    if reentrant:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WorkspaceLocked(
                        f"workspace {Path(root).resolve()} is locked by {_holder(path)}; waited "
                        f"{timeout:g} s (refresh.lock_timeout_s)") from None
                time.sleep(POLL_S)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        with _held_guard:
            _held[key] = me
        try:
            yield path
        finally:
            with _held_guard:
                _held.pop(key, None)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- params


def _params_path(root: Path, params_file: str | os.PathLike) -> Path:
    p = Path(params_file)
    return p if p.is_absolute() else root / p


def check_params(root: str | os.PathLike, params_file: str = "params.yaml",
                 overrides: Sequence[str] = ()):
    """Load and check the run's params (file + overrides) without writing anything."""
    from tempering.config import load_params

    return load_params(_params_path(Path(root), params_file), list(overrides or ()))


def use_params(root: str | os.PathLike, params_file: str = "params.yaml",
               overrides: Sequence[str] = ()) -> bool:
    """Make ``root/params.yaml`` the run's params; returns True when it was changed.

    Call it holding the workspace lock. A ``params_file`` other than ``params.yaml`` replaces
    it (comments and all); overrides are then set in place, keeping the file's comments.
    """
    from dvc.utils.serialize import modify_yaml

    from tempering.config import parse_value

    root = Path(root)
    check_params(root, params_file, overrides)
    target = root / "params.yaml"
    source = _params_path(root, params_file)
    changed = False
    if source.resolve() != target.resolve():
        text = source.read_text(encoding="utf-8")
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            changed = True
    if overrides:
        with modify_yaml(target) as doc:
            for item in overrides:
                key, value = item.split("=", 1)
                node = doc
                parts = key.strip().split(".")
                for part in parts[:-1]:
                    if part not in node or node[part] is None:
                        node[part] = {}
                    node = node[part]
                new = parse_value(value)
                if node.get(parts[-1]) != new:
                    node[parts[-1]] = new
                    changed = True
    return changed
