"""The whole DAG, for real, on a tiny random-weight model: `dvc repro`, then the Prefect flow.

One project per test session (the `tiny_project` fixture, tests/conftest.py): `dvc repro` runs
every stage as its CLI (as a user would), a second `dvc repro` must do nothing, and the Prefect
flow (under prefect_test_harness) runs the same stages in the same order and finds them all up
to date.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from tiny_project import run as _run  # shared with the refresh and deploy tests

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tiny_project: Path) -> Path:
    """The session's tiny-model project (tests/conftest.py), after one full `dvc repro`."""
    return tiny_project


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_stage_wrote_its_outputs(project: Path):
    for path in ["models/base/config.json", "models/base/meta.json",
                 "data/generated/corpus.txt", "data/generated/benchmarks/domain.jsonl",
                 "data/validated/sft.jsonl", "data/quarantine/validate.jsonl",
                 "data/clean/sft.jsonl", "data/clean/preference.jsonl", "data/quarantine/dedup.jsonl",
                 "models/cpt/config.json", "models/sft/adapter_config.json", "models/dpo/adapter_config.json",
                 "models/export/config.json", "models/export/model_card.md", "models/export/meta.json",
                 "metrics/evaluate.json", "metrics/gate.json", "reports/gate.md", "metrics/promote.json",
                 "dvc.lock"]:
        assert (project / path).exists(), path
    # dvclive loss curves for `dvc plots show`
    assert list((project / "dvclive/sft/plots/metrics").rglob("*.tsv"))
    # Nothing half-written left behind.
    assert not list(project.rglob(".tmp-*"))


def test_bad_rows_were_quarantined_not_lost(project: Path):
    q = [json.loads(line) for line in (project / "data/quarantine/validate.jsonl").read_text().splitlines()]
    d = [json.loads(line) for line in (project / "data/quarantine/dedup.jsonl").read_text().splitlines()]
    assert q and all(r.get("reason") for r in q)
    assert d and all(r.get("duplicate_of") or r.get("reason") == "contaminated" for r in d)


def test_training_loss_finite_and_weights_changed(project: Path):
    for stage in ("cpt", "sft", "dpo"):
        m = _json(project / f"metrics/{stage}.json")
        assert m["steps"] > 0, stage
        assert math.isfinite(m["train_loss_last"]), stage
        assert m["weights_changed"] is True, stage


def test_gate_decision_matches_metrics(project: Path):
    sys.path.insert(0, str(project))
    try:
        from tasks.gate import decide
        from tempering.config import load_params
    finally:
        sys.path.pop(0)
        from tasks.gate import load_samples
    evaluation = _json(project / "metrics/evaluate.json")
    gate = _json(project / "metrics/gate.json")
    params = load_params(project / "params.yaml")
    verdict = decide(evaluation, load_samples(project / "eval/samples"), params.gate)
    assert verdict.passed == gate["passed"]
    assert gate["candidate"]["hash"] == evaluation["models"]["candidate"]["hash"]
    # Every configured benchmark and both drift limits were judged; each verdict follows its rule.
    kinds = {(c["benchmark"], c["kind"]) for c in gate["checks"]}
    assert {b["name"] for b in evaluation["configured"]} <= {b for b, _ in kinds}
    assert {("drift", "kl"), ("drift", "perplexity")} <= kinds
    ok = True
    for c in gate["checks"]:
        rule = c["p_adjusted"] is not None and c["p_adjusted"] <= 0.025 and c["powered"] is not False
        assert c["passed"] == rule, c
        if c["passed"] and c["kind"] in ("forgetting", "gain"):
            bound = -c["threshold"] if c["kind"] == "forgetting" else c["threshold"]
            assert c["ci"][0] >= bound - 1e-3, c   # the lower end certifies it
        ok &= c["passed"]
    assert gate["passed"] == ok
    # The tiny project's gate is lenient (tests/tiny_project.py: a random model has nothing to
    # forget), so this run must promote; the refusal path is the exp-run test's (a strict knob).
    assert gate["passed"] is True, gate["reasons"]
    promote = _json(project / "metrics/promote.json")
    assert promote["promoted"] is True
    registry = project / params.promote.registry
    aliases = json.loads((registry / params.promote.model_name / "aliases.json").read_text())
    assert params.promote.alias in aliases, aliases


def _repro(project: Path) -> set[str]:
    out = _run([sys.executable, "-m", "dvc", "repro"], project).stdout
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_a_promotion_rejudges_once_then_repro_does_nothing(project: Path):
    """The first run promoted v0001: the champion changed, so the next repro re-runs evaluate
    against it (every score from a cache or the registry: nothing is scored again) and the gate;
    after that only the champion stage (always_changed: it reads the registry) ever runs."""
    assert _json(project / "metrics/promote.json")["promoted"] is True
    ran = _repro(project)
    assert {"champion", "evaluate", "gate", "promote", "report"} == ran, ran
    models = _json(project / "metrics/evaluate.json")["models"]
    assert models["production"]["cache"] == "registry", models
    assert models["candidate"]["cache"] == models["base"]["cache"] == "hit", models
    assert _json(project / "metrics/promote.json")["reused_version"] is True
    out = json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], project).stdout)
    assert out == {"champion": ["always changed"]}, out
    assert _repro(project) == {"champion"}


def test_prefect_flow_runs_same_stages(project: Path, prefect_harness):
    """The flow derives its stages from dvc.yaml and, with nothing changed, skips every one."""
    from flows.pipeline import pipeline
    from tempering.dag import stage_order

    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + old_path
    try:
        result = pipeline(root=str(project))
    finally:
        os.environ["PATH"] = old_path
    assert list(result) == stage_order(project / "dvc.yaml")
    assert result.pop("champion") == "ran"   # always_changed: it reads the registry
    assert set(result.values()) == {"skipped"}, result


def test_dvc_metrics_show_and_exp_run_with_a_changed_knob(project: Path, tmp_path: Path):
    """`dvc metrics show` lists the stages' metrics; `dvc exp run -S` re-runs only what the knob
    touches (a stricter gate: gate, promote, report) and the verdict follows the new threshold."""
    from tiny_project import copy_project, dvc

    shown = dvc(project, "metrics", "show", "--json").stdout
    metrics = json.loads(shown)
    files = next(iter(metrics.values()))["data"]
    assert {"metrics/evaluate.json", "metrics/gate.json", "metrics/promote.json"} <= set(files)
    assert "passed" in files["metrics/gate.json"]["data"]

    work = copy_project(project, tmp_path / "exp")
    out = dvc(work, "exp", "run", "-S", "gate.min_domain_gain=1.0").stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"champion", "gate", "promote", "report"}, out
    gate = _json(work / "metrics/gate.json")
    assert gate["passed"] is False
    assert any("domain: gain" in r for r in gate["reasons"])
    promote = _json(work / "metrics/promote.json")
    assert promote["promoted"] is False and promote["reasons"]


def _exp_rows(shown) -> dict[str, dict]:
    """`dvc exp show --json` -> {experiment name or "baseline": its data}, whatever the nesting."""
    rows: dict[str, dict] = {}

    def walk(node, top: bool):
        if isinstance(node, list):
            for x in node:
                walk(x, top)
        elif isinstance(node, dict):
            if "rev" in node and isinstance(node.get("data"), dict):
                if node.get("name") and not top:
                    rows[node["name"]] = node["data"]
                elif top and node["rev"] != "workspace":
                    rows["baseline"] = node["data"]
            for key in ("experiments", "revs"):
                if key in node:
                    walk(node[key], False)

    walk(shown, True)
    return rows


def _metric(data: dict, file: str, *keys):
    value = data["metrics"][file]["data"]
    for k in keys:
        value = value[k]
    return value


def test_dvc_exp_show_compares_experiments_against_the_committed_baseline(project: Path, tmp_path: Path):
    """DVC's experiment workflow, as in example-get-started: the run's small metrics are committed
    with it (not git-ignored), then two `dvc exp run -S` experiments; `dvc exp show --json` gives
    each one's gate verdict and domain accuracy, and the baseline's, with no missing (`!`) cells."""
    from tiny_project import copy_project, dvc, git_commit

    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/metrics/*.json" not in ignored and "/metrics/" not in ignored  # git carries the metrics
    work = copy_project(project, tmp_path / "exps")
    git_commit(work, "baseline run")  # dvc.lock, metrics/*.json, reports/*.md
    dvc(work, "exp", "run", "-n", "strict", "-S", "gate.min_domain_gain=1.0")
    dvc(work, "exp", "run", "-n", "kl49", "-S", "gate.min_domain_gain=-1.0", "-S", "gate.max_kl=49.0")
    shown = json.loads(dvc(work, "exp", "show", "--json").stdout)
    rows = _exp_rows(shown)
    assert {"baseline", "strict", "kl49"} <= set(rows), list(rows)
    base_gate = _metric(rows["baseline"], "metrics/gate.json", "passed")
    assert _metric(rows["strict"], "metrics/gate.json", "passed") is False
    assert _metric(rows["kl49"], "metrics/gate.json", "passed") == base_gate
    domain = {name: _metric(rows[name], "metrics/evaluate.json", "benchmarks", "domain", "candidate", "acc")
              for name in ("baseline", "strict", "kl49")}
    assert len(set(domain.values())) == 1 and 0.0 <= domain["baseline"] <= 1.0, domain  # gate knobs: same model
