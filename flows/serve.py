"""Serve the tempering flows from this process: no work pool, no worker (a laptop or one GPU box).

    prefect server start --host 127.0.0.1 &            # or any PREFECT_API_URL
    python -m flows.serve                              # pipeline + weekly refresh, Ctrl-C stops
    prefect deployment run tempering-pipeline/pipeline -p overrides='["sft.max_steps=10"]'

The refresh deployment fires on the weekly cron of ``refresh-weekly`` in ``prefect.yaml`` (one
place for the schedule); ``--no-schedule`` serves it for manual runs only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tempering import env

env.setup()

import yaml  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from flows.pipeline import pipeline  # noqa: E402
from flows.refresh import refresh  # noqa: E402

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
WEEKLY_DEPLOYMENT = "refresh-weekly"


def weekly_schedule(prefect_yaml: str | Path = PREFECT_YAML) -> dict:
    """The cron schedule of the weekly refresh deployment in prefect.yaml."""
    doc = yaml.safe_load(Path(prefect_yaml).read_text(encoding="utf-8"))
    for dep in doc.get("deployments") or []:
        if dep.get("name") == WEEKLY_DEPLOYMENT:
            return dict(dep["schedules"][0])
    raise KeyError(f"{prefect_yaml}: no deployment named {WEEKLY_DEPLOYMENT}")


def deployments(root: str = ".", params_file: str = "params.yaml", overrides: list[str] | None = None,
                schedule: bool = True) -> list:
    parameters = {"root": root, "params_file": params_file, "overrides": list(overrides or [])}
    weekly = weekly_schedule() if schedule else None
    return [
        pipeline.to_deployment(name="pipeline", parameters=parameters, tags=["tempering"]),
        refresh.to_deployment(name="refresh", parameters=parameters, tags=["tempering", "refresh"],
                              schedule=Cron(weekly["cron"], timezone=weekly.get("timezone", "UTC"))
                              if weekly else None,
                              concurrency_limit=1),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project root the runs work in")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-schedule", action="store_true", help="no weekly refresh, manual runs only")
    args = parser.parse_args(argv)
    from prefect import serve

    serve(*deployments(str(Path(args.root).resolve()), args.params, args.overrides,
                       schedule=not args.no_schedule))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
