"""Prefect flow ``tempering-refresh``: new data in, a gated model out, everything versioned.

    python -m flows.refresh                                  # refresh.source from params.yaml
    python -m flows.refresh --source s3://bucket/exports/ --set gate.min_domain_gain=0.05

One refresh, holding the workspace lock (a second refresh waits, then fails naming the holder):

1. **Snapshot**: mirror ``refresh.source`` (a local folder or any fsspec URL) into
   ``refresh.snapshot_dir`` and version it with ``dvc add``. Files are compared by md5 with the
   previous refresh's snapshot: unchanged files are the same DVC objects (stored and pushed once),
   and an unchanged snapshot changes nothing downstream.
2. **Pipeline**: the ``tempering-pipeline`` flow up to (not including) ``promote``: DVC re-runs
   only the stages whose deps or params changed; validate and dedup see old and new rows together,
   so rows of the new snapshot that repeat earlier ones are quarantined as duplicates.
3. **Push** data and models (and DVC's run cache) to ``refresh.remote`` before anything is
   promoted: a production alias never points at a model whose data is not in the remote.
4. **Promote** (the ``promote`` stage and any after it): a failed gate is a completed run whose
   result says "not promoted" and why; the registry is untouched.
5. **Record** the run in ``refresh.history_dir/<run>/`` (``record.json``, ``dvc.lock``,
   ``metrics/``, the snapshot's ``.dvc`` file); the next refresh diffs against it: snapshot files
   added/changed/removed, stages re-run, stage outputs changed in ``dvc.lock``, metric deltas.

A crashed stage fails the flow run with the stage's one-line error (recorded as ``failed``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from tempering import env

env.setup()

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.states import Completed  # noqa: E402

from flows.pipeline import StageFailed, pipeline, report_link, summary_markdown  # noqa: E402
from flows.workspace import check_params, use_params, workspace_lock  # noqa: E402
from tempering import TemperingError  # noqa: E402
from tempering.dag import load_stages, run_dvc, stage_order  # noqa: E402
from tempering.io import atomic_path, read_json_or_none, write_text  # noqa: E402

PROMOTE_STAGE = "promote"
LATEST = "LATEST"


# ----------------------------------------------------------------------------- helpers


def _dvc(root: Path, *args: str) -> str:
    code, out = run_dvc(*args, root=root)
    if code != 0:
        lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("ERROR")] or out.splitlines()[-1:]
        raise TemperingError(f"dvc {' '.join(args)}: {lines[-1] if lines else 'failed'}")
    return out


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): _md5(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def previous_run(history: Path) -> tuple[str | None, dict | None]:
    """The latest recorded refresh: (run name, record) or (None, None)."""
    try:
        name = (history / LATEST).read_text(encoding="utf-8").strip()
    except OSError:
        return None, None
    return name, read_json_or_none(history / name / "record.json")


def _depends_on(root: Path, folder: str) -> list[str]:
    """Stages of dvc.yaml with a dep on (or inside) ``folder``."""
    folder = os.path.normpath(folder)
    out = []
    for name, stage in load_stages(root / "dvc.yaml").items():
        for dep in stage.get("deps") or []:
            dep = os.path.normpath(next(iter(dep)) if isinstance(dep, dict) else dep)
            if dep == folder or dep.startswith(folder + os.sep) or folder.startswith(dep + os.sep):
                out.append(name)
                break
    return out


def diff_files(old: dict[str, str], new: dict[str, str]) -> dict[str, list[str]]:
    return {"added": sorted(set(new) - set(old)),
            "changed": sorted(k for k in set(new) & set(old) if new[k] != old[k]),
            "removed": sorted(set(old) - set(new)),
            "unchanged": sorted(k for k in set(new) & set(old) if new[k] == old[k])}


def diff_lock(old_text: str | None, new_text: str | None) -> list[str]:
    """Stages whose dvc.lock entry (cmd, deps, params, outs hashes) differs between two runs."""
    old = (yaml.safe_load(old_text) or {}).get("stages", {}) if old_text else {}
    new = (yaml.safe_load(new_text) or {}).get("stages", {}) if new_text else {}
    return sorted(s for s in set(old) | set(new) if old.get(s) != new.get(s))


def _flat_metrics(metrics: dict) -> dict[str, float]:
    """Headline numbers to compare run to run: candidate accuracy per benchmark."""
    out = {}
    for name, b in ((metrics.get("evaluate") or {}).get("benchmarks") or {}).items():
        acc = (b.get("candidate") or {}).get("acc")
        if isinstance(acc, (int, float)):
            out[f"{name}.candidate_acc"] = float(acc)
    return out


# ----------------------------------------------------------------------------- tasks


@task(name="snapshot", retries=2, retry_delay_seconds=10)
def take_snapshot(root: str, source: str, snapshot_dir: str, previous_files: dict | None) -> dict:
    """Mirror ``source`` into ``snapshot_dir`` (atomically) and ``dvc add`` it."""
    import fsspec

    root_p = Path(root)
    fs, src = fsspec.core.url_to_fs(source)
    if "://" not in source and not os.path.isabs(source):
        src = str((root_p / source).resolve())
    if not fs.exists(src) or not fs.isdir(src):
        raise TemperingError(f"refresh.source {source}: not found or not a folder")
    remote_files = [f for f in fs.find(src, withdirs=False)]
    if not remote_files:
        raise TemperingError(f"refresh.source {source}: no files")
    base = src.rstrip("/")
    target = root_p / snapshot_dir
    with atomic_path(target) as tmp:
        tmp.mkdir()
        for remote in remote_files:
            rel = remote[len(base):].lstrip("/")
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
    files = _files(target)
    old = previous_files if previous_files is not None else {}
    _dvc(root_p, "add", "-q", snapshot_dir)
    dvc_file = root_p / f"{snapshot_dir}.dvc"
    out = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [{}])[0]
    return {"source": source, "dir": snapshot_dir, "md5": out.get("md5"), "files": files,
            **diff_files(old, files)}


@task(name="push", retries=2, retry_delay_seconds=30)
def push(root: str, remote: str | None, remote_name: str, run_cache: bool) -> dict:
    """``dvc push`` data and models (and the run cache) to the configured remote."""
    if remote is None:
        return {"pushed": False, "reason": "refresh.remote is null"}
    root_p = Path(root)
    url = remote if "://" in remote or os.path.isabs(remote) else str((root_p / remote).resolve())
    if "://" not in url:
        Path(url).mkdir(parents=True, exist_ok=True)
    # --local: the remote of this workspace goes to .dvc/config.local, not the committed config.
    _dvc(root_p, "remote", "add", "--local", "--force", remote_name, url)
    args = ["push", "-r", remote_name] + (["--run-cache"] if run_cache else [])
    out = _dvc(root_p, *args)
    line = next((ln.strip() for ln in reversed(out.splitlines())
                 if "pushed" in ln or "up to date" in ln.lower()), out.strip().splitlines()[-1:] or "")
    return {"pushed": True, "remote": url, "name": remote_name, "dvc": line if isinstance(line, str) else ""}


def write_record(history: Path, run: str, record: dict, root: Path) -> Path:
    """runs/<run>/{record.json, dvc.lock, metrics/*, snapshot.dvc.yaml}; then LATEST -> run."""
    folder = history / run
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        if (root / "dvc.lock").exists():
            shutil.copy2(root / "dvc.lock", tmp / "dvc.lock")
        if (root / "metrics").is_dir():
            shutil.copytree(root / "metrics", tmp / "metrics",
                            ignore=shutil.ignore_patterns(".tmp-*"))
        snap = (record.get("snapshot") or {}).get("dir")
        if snap and (root / f"{snap}.dvc").exists():
            shutil.copy2(root / f"{snap}.dvc", tmp / "snapshot.dvc.yaml")  # not *.dvc: DVC would track it
        (tmp / "record.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    write_text(history / LATEST, run + "\n")
    return folder


def refresh_markdown(result: dict, root: Path) -> str:
    lines = [f"# tempering refresh `{result['run']}`", ""]
    if result["promoted"]:
        lines.append(f"**PROMOTED** as `{result.get('version')}`")
    else:
        lines.append("**NOT PROMOTED**" + (": " + "; ".join(result["reasons"]) if result["reasons"] else ""))
    snap = result.get("snapshot")
    lines += ["", "## What changed", ""]
    if snap:
        lines.append(f"- snapshot `{snap['dir']}` from `{snap['source']}` (md5 `{snap.get('md5')}`): "
                     f"{len(snap['added'])} added, {len(snap['changed'])} changed, "
                     f"{len(snap['removed'])} removed, {len(snap['unchanged'])} unchanged file(s)")
        for kind in ("added", "changed", "removed"):
            if snap[kind]:
                lines.append(f"  - {kind}: " + ", ".join(f"`{f}`" for f in snap[kind]))
    else:
        lines.append("- no snapshot source configured (refresh.source is null)")
    ran = [s for s, v in result["stages"].items() if v == "ran"]
    skipped = [s for s, v in result["stages"].items() if v == "skipped"]
    lines.append(f"- stages re-run: {', '.join(ran) or 'none'}; skipped (unchanged): {', '.join(skipped) or 'none'}")
    lines.append(f"- stage entries changed in dvc.lock since `{result.get('previous') or '-'}`: "
                 f"{', '.join(result['changed_in_lock']) or 'none'}")
    for k, d in (result.get("metric_deltas") or {}).items():
        lines.append(f"- {k}: {d['previous']:.3f} -> {d['current']:.3f}")
    push_info = result.get("push") or {}
    lines.append(f"- push: {push_info.get('dvc') or push_info.get('reason') or '-'}"
                 + (f" -> `{push_info['remote']}`" if push_info.get("remote") else ""))
    lines += ["", summary_markdown(root), report_link(root), "",
              f"Run record: `{result['record']}`"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the flow


def _run_name() -> str:
    try:
        from prefect.runtime import flow_run

        rid = str(flow_run.id or "")[:8]
    except Exception:  # noqa: BLE001 - outside a flow run
        rid = ""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + (rid or uuid.uuid4().hex[:8])


@flow(name="tempering-refresh", log_prints=True)
def refresh(root: str = ".", params_file: str = "params.yaml", overrides: list[str] | None = None,
            source: str | None = None):
    """Snapshot -> pipeline -> push -> promote -> record. Completed ("Promoted" or "Not promoted")
    unless a stage crashes. ``source`` overrides ``refresh.source`` for this run."""
    logger = get_run_logger()
    root_p = Path(root).resolve()
    overrides = list(overrides or [])
    cfg = check_params(root_p, params_file, overrides).refresh
    source = source or cfg.source
    history = root_p / cfg.history_dir
    with workspace_lock(root_p, timeout=cfg.lock_timeout_s, what="tempering-refresh"):
        started = time.time()
        run = _run_name()
        prev_name, prev = previous_run(history)
        prev_lock = (history / prev_name / "dvc.lock").read_text() if prev_name and (history / prev_name / "dvc.lock").exists() else None
        record = {"run": run, "status": "running", "started": started, "previous": prev_name,
                  "params_file": params_file, "overrides": overrides, "source": source,
                  "snapshot": None, "stages": {}}
        try:
            use_params(root_p, params_file, overrides)
            if source:
                users = _depends_on(root_p, cfg.snapshot_dir)
                if not users:
                    raise TemperingError(
                        f"refresh.source is set but no stage in dvc.yaml depends on {cfg.snapshot_dir}: add it "
                        "to the validate stage's deps and point validate.sources at its files "
                        "(docs/orchestration.md)")
                prev_files = ((prev or {}).get("snapshot") or {}).get("files")
                if prev_files is None:
                    prev_files = _files(root_p / cfg.snapshot_dir)
                record["snapshot"] = take_snapshot(str(root_p), source, cfg.snapshot_dir, prev_files)
                snap = record["snapshot"]
                logger.info("snapshot %s: %d added, %d changed, %d removed, %d unchanged", snap["md5"],
                            len(snap["added"]), len(snap["changed"]), len(snap["removed"]), len(snap["unchanged"]))
            order = stage_order(root_p / "dvc.yaml")
            cut = order.index(PROMOTE_STAGE) if PROMOTE_STAGE in order else len(order)
            head, tail = order[:cut], order[cut:]
            record["stages"].update(pipeline(root=str(root_p), stages=head))
            record["push"] = push(str(root_p), cfg.remote, cfg.remote_name, cfg.push_run_cache)
            if tail:
                record["stages"].update(pipeline(root=str(root_p), stages=tail))
        except BaseException as exc:
            record.update(status="failed", error=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                          finished=time.time())
            with_lock = (root_p / "dvc.lock").read_text() if (root_p / "dvc.lock").exists() else None
            record["changed_in_lock"] = diff_lock(prev_lock, with_lock)
            write_record(history, run, record, root_p)
            raise

        gate = read_json_or_none(root_p / "metrics" / "gate.json") or {}
        prom = read_json_or_none(root_p / "metrics" / "promote.json") or {}
        metrics = {p.stem: read_json_or_none(p) for p in sorted((root_p / "metrics").glob("*.json"))}
        promoted = bool(prom.get("promoted"))
        reasons = list(prom.get("reasons") or ([] if promoted else gate.get("reasons") or []))
        if not promoted and not reasons:
            reasons = ["no promote stage result (metrics/promote.json missing)"]
        current = _flat_metrics(metrics)
        previous = _flat_metrics({"evaluate": ((prev or {}).get("metrics") or {}).get("evaluate")})
        deltas = {k: {"previous": previous[k], "current": v} for k, v in current.items() if k in previous}
        new_lock = (root_p / "dvc.lock").read_text() if (root_p / "dvc.lock").exists() else None
        record.update(
            status="promoted" if promoted else "not_promoted", finished=time.time(),
            promoted=promoted, version=prom.get("version"), reasons=reasons,
            gate={"passed": gate.get("passed"), "reasons": gate.get("reasons") or []},
            changed_in_lock=diff_lock(prev_lock, new_lock), metric_deltas=deltas,
            metrics={k: metrics.get(k) for k in ("evaluate", "gate", "promote", "validate", "dedup")},
        )
        folder = write_record(history, run, record, root_p)

    result = {k: record.get(k) for k in ("run", "status", "promoted", "version", "reasons", "previous",
                                          "snapshot", "stages", "changed_in_lock", "metric_deltas", "push")}
    result["gate_passed"] = record["gate"]["passed"]
    result["record"] = str(folder / "record.json")
    md = refresh_markdown(result, root_p)
    create_markdown_artifact(key="tempering-refresh", markdown=md,
                             description="tempering refresh: what changed, metrics, gate, promotion")
    if promoted:
        logger.info("promoted %s", result["version"])
        return Completed(message=f"promoted {result['version']}", data=result, name="Promoted")
    logger.warning("not promoted: %s", "; ".join(reasons))
    return Completed(message="not promoted: " + "; ".join(reasons), data=result, name="Not promoted")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.refresh", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project root holding dvc.yaml")
    parser.add_argument("--params", default="params.yaml", help="params file (relative to --root)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--source", default=None, help="snapshot source for this run (default: refresh.source)")
    args = parser.parse_args(argv)
    try:
        result = refresh(root=args.root, params_file=args.params, overrides=args.overrides, source=args.source)
    except (StageFailed, TemperingError) as exc:
        print(f"tempering refresh: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
