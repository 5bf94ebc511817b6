"""Prefect flow: the DVC stages, in ``dvc.yaml``'s order, each as a Prefect task.

    python -m flows.pipeline                 # whole pipeline (temporary local Prefect server)
    python -m flows.pipeline --stages sft dpo
    python -m flows.pipeline --params params.gpu.yaml --set sft.learning_rate=5e-4

Each task asks DVC to reproduce exactly one stage (``dvc repro --single-item <stage>``), so DVC
keeps owning caching, skipping and lineage, and Prefect owns scheduling, retries and artifacts.
The stage list comes from ``dvc.yaml`` (``tempering.dag.stage_order``); there is no second copy
of the DAG here, and no pipeline logic: that lives in ``tasks/``.

A run holds the workspace lock (``flows.workspace``) and first makes ``params.yaml`` the
requested params file plus overrides (checked by the typed schema, like ``dvc exp run -S``).
Deployments (``prefect.yaml``) pass ``params_file`` and ``overrides`` as parameters.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tempering import env

env.setup()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from flows.workspace import check_params, use_params, workspace_lock  # noqa: E402
from tempering import TemperingError  # noqa: E402
from tempering.dag import run_dvc, stage_order  # noqa: E402

# The HTML report of a run (tempering.html_report); linked from the flow run's artifacts.
REPORT_HTML = "reports/report.html"
DEFAULT_LOCK_TIMEOUT_S = 3600.0

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
    code, output = run_dvc("repro", "--single-item", stage, root=root)
    if code != 0:
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


def report_link(root: str | os.PathLike = ".") -> str:
    """Markdown line pointing at the run's HTML report; also attaches it as a link artifact."""
    from prefect.artifacts import create_link_artifact

    path = (Path(root) / REPORT_HTML).resolve()
    if not path.exists():
        return f"HTML report: not generated (`{REPORT_HTML}`)"
    create_link_artifact(key="tempering-report", link=path.as_uri(), link_text=str(path),
                         description="tempering: HTML report of this run")
    return f"HTML report: [{REPORT_HTML}]({path.as_uri()}) (`{path}`)"


def summary_markdown(root: str | os.PathLike = ".") -> str:
    """Markdown table of metrics, the gate's reasons and the promotion (from the metrics files)."""
    from tempering.report import summarize, to_markdown

    return to_markdown(summarize(root))


def summary_artifact(root: str | os.PathLike = ".") -> str:
    """Markdown table of metrics and the gate's reasons, attached to the flow run."""
    md = summary_markdown(root) + "\n" + report_link(root) + "\n"
    create_markdown_artifact(key="tempering-run-summary", markdown=md,
                             description="tempering: benchmarks, gate verdict, promotion")
    return md


def _lock_timeout(root: Path, params_file: str, overrides) -> float:
    """refresh.lock_timeout_s of the run's params; the default for projects without params."""
    if not (root / params_file).exists() and params_file == "params.yaml" and not overrides:
        return DEFAULT_LOCK_TIMEOUT_S
    return check_params(root, params_file, overrides or ()).refresh.lock_timeout_s


@flow(name="tempering-pipeline", log_prints=True)
def pipeline(root: str = ".", stages: list[str] | None = None, params_file: str = "params.yaml",
             overrides: list[str] | None = None) -> dict:
    """Reproduce the DVC stages in order; returns {stage: "ran" | "skipped"} and attaches a summary.

    ``params_file`` (relative to ``root``) and ``overrides`` (``section.key=value``) choose the
    params of the run; they are written into ``params.yaml`` before the first stage.
    """
    logger = get_run_logger()
    root_path = Path(root)
    dvc_yaml = root_path / "dvc.yaml"
    order = stage_order(dvc_yaml)
    if stages:
        unknown = sorted(set(stages) - set(order))
        if unknown:
            raise TemperingError(f"{dvc_yaml}: unknown stage(s) {unknown}; stages are {order}")
        order = [s for s in order if s in stages]
    timeout = _lock_timeout(root_path, params_file, overrides)
    with workspace_lock(root_path, timeout=timeout, what="tempering-pipeline"):
        if overrides or params_file != "params.yaml":
            if use_params(root_path, params_file, overrides or ()):
                logger.info("params.yaml set from %s with overrides %s", params_file, overrides or [])
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
    parser.add_argument("--params", default="params.yaml", help="params file (relative to --root)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run, e.g. --set sft.learning_rate=1e-4")
    args = parser.parse_args(argv)
    try:
        result = pipeline(root=args.root, stages=args.stages, params_file=args.params,
                          overrides=args.overrides)
    except (StageFailed, TemperingError) as exc:
        print(f"tempering pipeline: error: {exc}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
