"""The one entry point every stage CLI goes through.

``stage_main`` parses ``--params`` / ``--set key=value`` plus the stage's own path arguments, loads
the typed params, runs the stage's plain ``run`` function and prints its summary as JSON. User
errors (:class:`tempering.TemperingError`) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from tempering import TemperingError, env


def base_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m tasks.{stage}",
        description=(doc or "").strip().splitlines()[0] if doc else None,
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set sft.learning_rate=1e-4 (repeatable)")
    return parser


def stage_main(
    stage: str,
    run: Callable[..., dict],
    add_arguments: Callable[[argparse.ArgumentParser], None],
    argv: Sequence[str] | None = None,
    *,
    doc: str | None = None,
    offline: bool = True,
) -> int:
    """Run a stage from the command line. ``run(params, **paths)`` gets the full frozen params."""
    env.setup(offline=offline)
    parser = base_parser(stage, doc)
    add_arguments(parser)
    args = parser.parse_args(argv)
    paths = {k: v for k, v in vars(args).items() if k not in {"params", "overrides"}}
    try:
        from tempering.config import load_params

        params = load_params(args.params, args.overrides)
        summary = run(params, **paths)
    except TemperingError as exc:
        print(f"tempering {stage}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tempering {stage}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary or {}, indent=2, default=str))
    return 0
