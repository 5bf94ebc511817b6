"""Start a training stage as a plain process or under ``accelerate launch`` (``train.launcher``).

The training stages' commands in ``dvc.yaml`` go through this module::

    python -m tempering.launcher tasks.sft --base models/cpt --data data/clean ...

With ``train.launcher: none`` the stage module runs in this very process (exactly
``python -m tasks.sft ...``). Any other value runs::

    python -m accelerate.commands.launch --config_file infra/accelerate/<launcher>.yaml \\
        [--num_processes N] --module tasks.sft --base models/cpt ...

so the same stage code runs on one GPU, under DDP, FSDP or DeepSpeed ZeRO-2/3. The stage
command itself lives only in ``dvc.yaml``: this module prefixes it, it never rebuilds it.
The params file and ``--set`` overrides are read from the stage's own arguments, so the launch
uses the same params the stage will.
"""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tempering import TemperingError

# train.launcher -> accelerate config file in train.config_dir (None = no accelerate).
CONFIG_FILES = {
    "none": None,
    "single_gpu": "single_gpu.yaml",
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "deepspeed_zero2": "deepspeed_zero2.yaml",
    "deepspeed_zero3": "deepspeed_zero3.yaml",
}
ACCELERATE = ["-m", "accelerate.commands.launch"]


def config_file(train, root: str | os.PathLike = ".") -> Path | None:
    """The accelerate config file ``train`` (a ``LaunchParams``) selects, or None for a plain run."""
    name = CONFIG_FILES[train.launcher]
    if name is None:
        return None
    path = Path(root) / train.config_dir / name
    if not path.is_file():
        raise TemperingError(f"train.launcher={train.launcher}: accelerate config {path} not found")
    return path


def build_command(train, module: str, args: Sequence[str] = (), *, root: str | os.PathLike = ".",
                  python: str | None = None) -> list[str]:
    """The command line that runs ``python -m <module> <args>`` under ``train.launcher``."""
    python = python or sys.executable
    cfg = config_file(train, root)
    if cfg is None:
        return [python, "-m", module, *args]
    cmd = [python, *ACCELERATE, "--config_file", str(cfg)]
    if train.num_processes is not None:
        cmd += ["--num_processes", str(train.num_processes)]
    return cmd + ["--module", module, *args]


def _stage_params(args: Sequence[str]) -> tuple[str, list[str]]:
    """The ``--params`` file and ``--set`` overrides among a stage's arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(list(args))
    return known.params, known.overrides


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m tempering.launcher <stage module> [stage args...]", file=sys.stderr)
        return 2
    module, args = argv[0], argv[1:]
    try:
        from tempering.config import load_params

        params_file, overrides = _stage_params(args)
        train = load_params(params_file, overrides).train
        cmd = build_command(train, module, args)
    except TemperingError as exc:
        print(f"tempering launcher: error: {exc}", file=sys.stderr)
        return 2
    if train.launcher == "none":
        # Exactly `python -m <module> <args>`, without a second interpreter start.
        sys.argv = [module, *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or 0
            print(exc.code, file=sys.stderr)
            return 1
        return 0
    print("tempering launcher: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
