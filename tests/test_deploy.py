"""Deployments: prefect.yaml and the GPU work pool templates, then a real Prefect server.

The integration test starts `prefect server start` on 127.0.0.1 (a free port, its own
PREFECT_HOME, analytics off), creates the work pools from infra/work-pools, registers every
deployment of prefect.yaml with `prefect deploy --all`, serves the flows with `python -m
flows.serve`, triggers a pipeline run through the API on the tiny-model project and checks that it
completes with its artifacts; then it stops both processes. Nothing leaves loopback.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from tiny_project import copy_project, env_for_subprocess

ROOT = Path(__file__).resolve().parents[1]
POOLS = {"local-process": ("process", None),
         "gpu-docker": ("docker", ROOT / "infra/work-pools/docker-gpu.json"),
         "gpu-kubernetes": ("kubernetes", ROOT / "infra/work-pools/kubernetes-gpu.json")}


def _prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _defaults(template: dict) -> dict:
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}


# ----------------------------------------------------------------------------- static checks


def test_prefect_yaml_deployments_match_their_flows():
    from prefect.flows import load_flow_from_entrypoint

    deps = {d["name"]: d for d in _prefect_yaml()["deployments"]}
    assert {"pipeline-local", "refresh-local", "pipeline-gpu-docker", "pipeline-gpu-kubernetes",
            "refresh-weekly"} <= set(deps)
    flows = {}
    for name, dep in deps.items():
        path, func = dep["entrypoint"].split(":")
        flow = flows.get(dep["entrypoint"]) or load_flow_from_entrypoint(f"{ROOT / path}:{func}")
        flows[dep["entrypoint"]] = flow
        # parameters choose the params file and overrides, and the flow accepts them as given
        assert {"params_file", "overrides"} <= set(dep["parameters"]), name
        flow.validate_parameters(dep["parameters"])
        assert dep["work_pool"]["name"] in POOLS, name
    assert {f.name for f in flows.values()} == {"tempering-pipeline", "tempering-refresh"}
    for name in ("refresh-weekly", "refresh-local"):
        assert deps[name]["concurrency_limit"] == 1, name
    for name, dep in deps.items():
        if dep["work_pool"]["name"] != "local-process":
            assert dep["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/tempering"


def test_weekly_refresh_schedule():
    import asyncio

    from prefect.server.schemas.schedules import CronSchedule

    weekly = next(d for d in _prefect_yaml()["deployments"] if d["name"] == "refresh-weekly")
    (schedule,) = weekly["schedules"]
    assert schedule.get("active", True) is True and schedule["timezone"] == "UTC"
    # the dates Prefect's own scheduler would create: once a week
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    fires = asyncio.run(cron.get_dates(n=3, start=datetime(2026, 1, 1, tzinfo=timezone.utc)))
    assert fires[1] - fires[0] == timedelta(days=7) == fires[2] - fires[1]
    from flows.serve import deployments, weekly_schedule

    assert weekly_schedule() == schedule
    served = {d.name: d for d in deployments(schedule=True)}
    assert served["refresh"].schedules[0].schedule.cron == schedule["cron"]
    assert not served["pipeline"].schedules


@pytest.mark.parametrize("pool", ["gpu-docker", "gpu-kubernetes"])
def test_gpu_work_pool_templates_request_gpus(pool: str):
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = json.loads(POOLS[pool][1].read_text())
    validate_base_job_template(template)
    job = apply_values(template["job_configuration"], _defaults(template))
    if pool == "gpu-docker":
        (request,) = job["container_create_kwargs"]["device_requests"]
        assert request["capabilities"] == [["gpu"]] and request["count"] == -1
        assert job["image"] == "tempering-gpu:latest"
    else:
        container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"] == "tempering-gpu:latest"
    docker_tag = "tempering-gpu"
    assert docker_tag in (ROOT / "infra/Dockerfile").read_text()


def test_dockerfile_installs_the_cuda_torch_build():
    text = (ROOT / "infra/Dockerfile").read_text()
    pin = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"torch==' in line)
    version = pin.split("==")[1].split('"')[0]
    assert "download.pytorch.org/whl/cu" in text and f"torch=={version}" in text


# ----------------------------------------------------------------------------- real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 (free port, own PREFECT_HOME); yields (api_url, env)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = env_for_subprocess()
    env.pop("PREFECT_API_URL", None)
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1", "PREFECT_SERVER_UI_ENABLED": "false"})
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui", "--analytics-off"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait(lambda: urllib.request.urlopen(url + "/health", timeout=2).status == 200, 120,
              "prefect server", proc)
        yield url, dict(env, PREFECT_API_URL=url)
    finally:
        _stop(proc)
        log.close()


def test_deploy_serve_and_run_through_the_api(prefect_server, tiny_project: Path, tmp_path: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, env = prefect_server
    project = copy_project(tiny_project, tmp_path / "project")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with get_client(sync_client=True) as client:
            # the work pools of docs/orchestration.md, GPU templates validated by the server
            for name, (kind, template) in POOLS.items():
                client.create_work_pool(WorkPoolCreate(
                    name=name, type=kind, base_job_template=json.loads(template.read_text()) if template else {}))
            pool = client.read_work_pool("gpu-kubernetes")
            assert pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1

        # every deployment of prefect.yaml registers against the real server
        deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                                cwd=ROOT, env=dict(env, PWD=str(ROOT)), capture_output=True, text=True,
                                timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

        serve_log = open(tmp_path / "serve.log", "w")
        served = subprocess.Popen([sys.executable, "-m", "flows.serve", "--root", str(project)],
                                  cwd=ROOT, env=env, stdout=serve_log, stderr=subprocess.STDOUT)
        try:
            with get_client(sync_client=True) as client:
                weekly = client.read_deployment_by_name("tempering-refresh/refresh-weekly")
                assert weekly.schedules and weekly.schedules[0].schedule.cron == "0 3 * * 1"
                assert weekly.work_pool_name == "gpu-docker"
                assert client.read_deployment_by_name("tempering-pipeline/pipeline-local").parameters[
                    "params_file"] == "params.yaml"
                _wait(lambda: client.read_deployment_by_name("tempering-pipeline/pipeline"), 120,
                      "served deployment", served)

            # a run through the API: the gate threshold changes, so gate and promote re-run
            run = run_deployment("tempering-pipeline/pipeline", timeout=420,
                                 parameters={"overrides": ["gate.min_domain_gain=0.5"]})
            assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
            with get_client(sync_client=True) as client:
                artifacts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        finally:
            _stop(served)
            serve_log.close()
    keys = {a.key for a in artifacts}
    assert "tempering-run-summary" in keys, keys
    summary = next(a for a in artifacts if a.key == "tempering-run-summary").data
    assert "**Gate:" in summary and "| benchmark |" in summary
    assert "HTML report" in summary
    assert yaml.safe_load((project / "params.yaml").read_text())["gate"]["min_domain_gain"] == 0.5
    assert json.loads((project / "metrics/gate.json").read_text())["passed"] is False
