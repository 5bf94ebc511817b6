"""Prefect flow: the DVC stages, in ``dvc.yaml``'s order, each as a Prefect task.

    python -m flows.pipeline                 # whole pipeline (temporary local Prefect server)
    python -m flows.pipeline --stages sft dpo

Each task asks DVC to reproduce exactly one stage (``dvc repro --single-item <stage>``), so DVC
keeps owning caching, skipping and lineage, and Prefect owns scheduling, retries and artifacts.
The stage list comes from ``dvc.yaml`` (``tempering.dag.stage_order``); there is no second copy
of the DAG here, and no pipeline logic: that lives in ``tasks/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tempering import env

env.setup()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from tempering import TemperingError  # noqa: E402
from tempering.dag import stage_order  # noqa: E402

# Stages whose failure can be transient (OOM, preempted GPU node): retry, resuming from the
# last checkpoint. Data stages are deterministic: a retry would fail the same way.
RETRYABLE = {"base_model", "cpt", "sft", "dpo", "export", "evaluate"}


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message is the stage's own one-line error."""


def _one_line_error(stage: str, output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("tempering ") and ": error:" in ln:
            return ln
    for ln in reversed(lines):
        if ln.startswith("ERROR"):
            return f"stage {stage}: {ln}"
    return f"stage {stage} failed" + (f": {lines[-1]}" if lines else "")


def dvc_repro_stage(stage: str, root: str | os.PathLike = ".") -> str:
    """Run ``dvc repro --single-item <stage>`` in ``root``; returns DVC's output."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    environ = dict(os.environ)
    # The stage commands call `python`: make it this interpreter (the project's venv).
    environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environ.get("PATH", "")
    proc = subprocess.run(cmd, cwd=root, env=environ, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise StageFailed(_one_line_error(stage, output))
    return output


def _stage_task(stage: str):
    return task(
        dvc_repro_stage,
        name=stage,
        retries=1 if stage in RETRYABLE else 0,
        retry_delay_seconds=5,
        task_run_name=f"dvc repro {stage}",
    )


def summary_artifact(root: str | os.PathLike = ".") -> str:
    """Markdown table of metrics and the gate's reasons, attached to the flow run."""
    from tempering.report import summarize, to_markdown

    md = to_markdown(summarize(root))
    create_markdown_artifact(key="tempering-run-summary", markdown=md,
                             description="tempering: benchmarks, gate verdict, promotion")
    return md


@flow(name="tempering-pipeline", log_prints=True)
def pipeline(root: str = ".", stages: list[str] | None = None) -> dict:
    """Reproduce the DVC stages in order; returns {stage: "ran" | "skipped"} and attaches a summary."""
    logger = get_run_logger()
    dvc_yaml = Path(root) / "dvc.yaml"
    order = stage_order(dvc_yaml)
    if stages:
        unknown = sorted(set(stages) - set(order))
        if unknown:
            raise TemperingError(f"{dvc_yaml}: unknown stage(s) {unknown}; stages are {order}")
        order = [s for s in order if s in stages]
    # Sequential on purpose: DVC holds one lock per workspace, and the DAG is a near-chain.
    # Parallelism lives inside the stages (and, past one machine, in work pools).
    result = {}
    for stage in order:
        out = _stage_task(stage)(stage, root)
        result[stage] = "skipped" if "didn't change, skipping" in out else "ran"
        logger.info("stage %s: %s", stage, result[stage])
    if "promote" in result or not stages:
        summary_artifact(root)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project root holding dvc.yaml")
    parser.add_argument("--stages", nargs="*", help="run only these stages (in DAG order)")
    args = parser.parse_args(argv)
    try:
        result = pipeline(root=args.root, stages=args.stages)
    except (StageFailed, TemperingError) as exc:
        print(f"tempering pipeline: error: {exc}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
