"""The refresh flow: snapshots versioned with DVC, gated promotion, run records, one writer at a time.

Two layers:
- a toy DVC project (four tiny stages named like the real ones, seconds per refresh) for the
  failure paths: a crashed stage failing the run with its one-line error, a source no stage
  reads, and the workspace lock under two concurrent refreshes;
- the real DAG on the tiny random model (a copy of the session's reproduced project): two
  snapshots in a row, the second deduplicated against the first, only the changed stages re-run,
  promoted then refused by the gate, data and models in the DVC remote.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.pipeline import StageFailed
from flows.refresh import refresh
from flows.workspace import WorkspaceLocked, workspace_lock
from tiny_project import copy_project, dvc

# ----------------------------------------------------------------------------- toy project

TOY_DVC = """\
stages:
  validate:
    cmd: python toy.py validate
    deps: [toy.py, data/snapshot]
    outs: [out/validated.txt]
  train:
    cmd: python toy.py train
    deps: [out/validated.txt]
    outs: [out/model.txt]
  gate:
    cmd: python toy.py gate
    deps: [out/model.txt]
    params: [gate.min_domain_gain]
    metrics:
      - metrics/gate.json: {cache: false}
  promote:
    cmd: python toy.py promote
    deps: [metrics/gate.json, out/model.txt]
    metrics:
      - metrics/promote.json: {cache: false}
"""
TOY_PY = """\
import json, os, pathlib, sys, time, yaml
stage = sys.argv[1]
out = pathlib.Path("out"); out.mkdir(exist_ok=True); pathlib.Path("metrics").mkdir(exist_ok=True)
if stage == "validate":
    rows = []
    for f in sorted(pathlib.Path("data/snapshot").rglob("*")):
        if f.is_file():
            if f.name == "crash.txt":
                print("tempering validate: error: data/snapshot/crash.txt: row 1: field output is empty", file=sys.stderr)
                sys.exit(2)
            rows += f.read_text().splitlines()
    time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
    (out / "validated.txt").write_text("\\n".join(sorted(set(rows))) + "\\n")
elif stage == "train":
    (out / "model.txt").write_text(str(len((out / "validated.txt").read_text().split())))
elif stage == "gate":
    need = yaml.safe_load(open("params.yaml"))["gate"]["min_domain_gain"]
    ok = need <= 0
    json.dump({"passed": ok, "reasons": [] if ok else [f"domain: gain 0.000 < min_domain_gain {need}"]},
              open("metrics/gate.json", "w"))
elif stage == "promote":
    gate = json.load(open("metrics/gate.json"))
    reg = pathlib.Path("registry"); reg.mkdir(exist_ok=True)
    if gate["passed"]:
        version = f"v{len(list(reg.glob('v*'))) + 1}"
        (reg / version).write_text((out / "model.txt").read_text())
        json.dump({"promoted": True, "version": version}, open("metrics/promote.json", "w"))
    else:
        json.dump({"promoted": False, "reasons": ["gate failed: " + r for r in gate["reasons"]]},
                  open("metrics/promote.json", "w"))
"""


def _toy_params(source: Path, **refresh) -> str:
    cfg = {"source": str(source), "remote": "../remote", "lock_timeout_s": 120, **refresh}
    return yaml.safe_dump({"gate": {"min_domain_gain": 0.0}, "refresh": cfg}, sort_keys=False)


def _write_snapshot(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.fixture()
def toy(tmp_path: Path) -> Path:
    root = tmp_path / "toy"
    root.mkdir()
    (root / "dvc.yaml").write_text(TOY_DVC)
    (root / "toy.py").write_text(TOY_PY)
    source = _write_snapshot(tmp_path / "source", {"a.txt": "apple\nbanana\n", "b.txt": "cherry\n"})
    (root / "params.yaml").write_text(_toy_params(source))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    return root


def _record(root: Path, run: str | None = None) -> dict:
    run = run or (root / "runs" / "LATEST").read_text().strip()
    return json.loads((root / "runs" / run / "record.json").read_text())


def _remote_objects(remote: Path) -> set[str]:
    return {str(p.relative_to(remote)) for p in (remote / "files").rglob("*") if p.is_file()}


def test_toy_refresh_crashed_stage_fails_with_its_error(toy: Path, prefect_harness):
    _write_snapshot(toy.parent / "source", {"crash.txt": "x\n"})
    state = refresh(root=str(toy), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed) as err:
        state.result()
    assert str(err.value) == "tempering validate: error: data/snapshot/crash.txt: row 1: field output is empty"
    record = _record(toy)
    assert record["status"] == "failed" and record["error"] == str(err.value)
    assert not (toy / "registry").exists() and not (toy / "metrics/promote.json").exists()


def test_toy_refresh_needs_a_stage_depending_on_the_snapshot(toy: Path, prefect_harness):
    (toy / "dvc.yaml").write_text(TOY_DVC.replace("deps: [toy.py, data/snapshot]", "deps: [toy.py]"))
    with pytest.raises(Exception, match="no stage in dvc.yaml depends on data/snapshot"):
        refresh(root=str(toy))


def test_two_refreshes_at_once_take_turns(toy: Path, prefect_harness, monkeypatch):
    """Two refresh runs started together on one workspace: the lock serialises them, both
    complete, and the workspace is consistent afterwards."""
    monkeypatch.setenv("TOY_SLEEP", "1")
    results, errors = {}, {}

    def go(name: str) -> None:
        try:
            results[name] = refresh(root=str(toy))
        except BaseException as exc:  # noqa: BLE001
            errors[name] = exc

    threads = [threading.Thread(target=go, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    runs = sorted((_record(toy, r["run"]) for r in results.values()), key=lambda r: r["started"])
    assert runs[0]["finished"] <= runs[1]["started"], "two refreshes held the workspace at once"
    assert runs[1]["previous"] == runs[0]["run"]
    assert runs[1]["stages"]["validate"] == "skipped"
    assert dvc(toy, "status").stdout.strip().endswith("Data and pipelines are up to date.")


def test_refresh_waits_then_fails_naming_the_lock_holder(toy: Path, prefect_harness):
    (toy / "params.yaml").write_text(_toy_params(toy.parent / "source", lock_timeout_s=1))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with workspace_lock(toy, what="another refresh"):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        with pytest.raises(WorkspaceLocked, match="locked by another refresh"):
            refresh(root=str(toy))
        assert time.monotonic() - started >= 1
    finally:
        release.set()
        holder.join()
    assert not (toy / "data/snapshot").exists(), "a refused refresh must not touch the workspace"


# ----------------------------------------------------------------------------- the real DAG


def _add_pairs(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


LENIENT_GATE = ["gate.min_domain_gain=-1.0", "gate.max_forgetting.default=1.0", "gate.production_margin=null"]


def _wire_snapshot(root: Path, source: Path) -> None:
    """What a user does once (docs/orchestration.md): read preference pairs from the snapshot,
    make validate depend on it, and name the source."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for spec in params["validate"]["sources"]:
        if spec["kind"] == "preference":
            spec["path"] = "data/snapshot/preference.jsonl"
    params["refresh"]["source"] = str(source)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    head, validate = (root / "dvc.yaml").read_text().split("\n  validate:\n", 1)
    dep = "      - ${make_data.out}\n"
    assert dep in validate.split("\n  dedup:")[0], "the validate stage's deps changed: update this test"
    validate = validate.replace(dep, dep + "      - data/snapshot\n", 1)
    (root / "dvc.yaml").write_text(head + "\n  validate:\n" + validate)


# Two whole `dvc repro` runs (95 s on 2 cores): `slow`, so it runs in `make test-e2e` (CI runs both
# suites) and the default suite stays under 10 minutes.
@pytest.mark.slow
def test_refresh_two_snapshots_on_the_tiny_model(tiny_project: Path, tmp_path: Path, prefect_harness):
    root = copy_project(tiny_project, tmp_path / "project")
    source = tmp_path / "source"
    source.mkdir()
    raw_pairs = (root / "data/generated/preference.jsonl").read_text().splitlines()
    (source / "preference.jsonl").write_text("\n".join(raw_pairs) + "\n")
    (source / "README.md").write_text("weekly export of the preference pairs\n")
    _wire_snapshot(root, source)

    # Snapshot 1: the preference pairs move to the snapshot; the SFT and text data do not change.
    first = refresh(root=str(root), overrides=LENIENT_GATE)
    stages = first["stages"]
    assert first["snapshot"]["added"] == ["README.md", "preference.jsonl"]
    assert [s for s in ("base_model", "make_data", "cpt", "sft") if stages[s] != "skipped"] == []
    assert [s for s in ("validate", "dedup", "dpo", "export", "evaluate", "gate", "promote")
            if stages[s] != "ran"] == []
    assert first["promoted"] is True, first["reasons"]
    promoted_1 = json.loads((root / "metrics/promote.json").read_text())
    production = promoted_1["version"]
    assert production == first["version"]
    # The snapshot holds the same pairs as before, so DPO retrained to the same weights: a model's
    # hash is its weights, config and tokenizer (not its folder or model card), so promote points
    # the alias at the version the project's first run registered instead of storing a copy.
    assert promoted_1["reused_version"] is True, promoted_1
    kept_1 = {r["id"]: r for r in map(json.loads, (root / "data/clean/preference.jsonl").read_text().splitlines())}
    remote = root.parent / "tempering-remote"
    objects_1 = _remote_objects(remote)
    assert objects_1

    # Snapshot 2: the same export plus pairs that repeat pairs of snapshot 1 (one with other
    # case and punctuation). Dedup removes them against the first snapshot's rows, so the clean
    # preference data is unchanged and training is not re-run.
    from_snapshot = [r for r in kept_1.values() if r["source"].startswith("data/snapshot/")][:3]
    repeats = [json.loads(raw_pairs[int(r["source"].rsplit(":", 1)[1]) - 1]) for r in from_snapshot]
    variant = dict(repeats[0], chosen=repeats[0]["chosen"].upper() + "!")
    _add_pairs(source / "preference.jsonl", repeats + [variant])
    state = refresh(root=str(root), overrides=["gate.min_domain_gain=1.0"], return_state=True)
    assert state.is_completed() and state.name == "Not promoted", state
    second = state.result()
    assert second["previous"] == first["run"]
    assert second["snapshot"]["changed"] == ["preference.jsonl"]
    assert second["snapshot"]["unchanged"] == ["README.md"]
    quarantine = [json.loads(line) for line in (root / "data/quarantine/dedup.jsonl").read_text().splitlines()]
    where = [((q.get("original") or {}).get("source") or "").rsplit(":", 1) for q in quarantine]
    new_rows = [q for q, (file, line) in zip(quarantine, where)
                if file == "data/snapshot/preference.jsonl" and int(line) > len(raw_pairs)]
    assert len(new_rows) == 4 and {q["duplicate_of"] for q in new_rows} == {r["id"] for r in from_snapshot}, new_rows
    kept_2 = {r["id"] for r in map(json.loads, (root / "data/clean/preference.jsonl").read_text().splitlines())}
    assert kept_2 == set(kept_1)
    # only what changed re-ran: data checks; not evaluate, because the champion did not change
    # (the first refresh re-used the production version: same weights); no training or export
    ran = {s for s, v in second["stages"].items() if v == "ran"}
    assert {"validate", "dedup", "champion", "gate", "promote"} <= ran, second["stages"]
    assert not ran & {"base_model", "make_data", "cpt", "sft", "dpo", "export", "evaluate"}, second["stages"]
    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluation["models"]["production"]["version"] == production
    assert evaluation["models"]["production"]["cache"] == "registry"
    assert evaluation["models"]["candidate"]["cache"] == evaluation["models"]["base"]["cache"] == "hit"
    changed = set(second["changed_in_lock"])
    assert {"validate", "dedup", "gate"} <= changed and not changed & {"cpt", "sft", "dpo", "export", "evaluate"}
    # refused by the gate: production did not move, the reason is recorded
    assert second["promoted"] is False and any("required 1.000" in r for r in second["reasons"]), second["reasons"]
    aliases = next((root / "registry").rglob("aliases.json"))
    assert production in aliases.read_text()
    record = _record(root)
    assert record["status"] == "not_promoted" and record["previous"] == first["run"]
    # data and models are in the remote; unchanged objects were not stored twice
    objects_2 = _remote_objects(remote)
    assert objects_1 < objects_2
    assert "are in sync" in dvc(root, "status", "-c", "-r", "tempering").stdout
