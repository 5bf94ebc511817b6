"""The model registry: immutable versions, atomic aliases, rollback, concurrency, CLI, promote stage."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest

from tempering import TemperingError
from tempering.io import hash_path
from tempering.registry import Registry, git_tag, main, mirror_wandb


def fake_model(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"tag": tag}))
    (folder / "model.safetensors").write_bytes(tag.encode() * 1000)
    (folder / "model_card.md").write_text(f"# {tag}\n")
    return folder


def test_register_alias_previous_and_rollback(tmp_path):
    reg = Registry(tmp_path / "reg", "m")
    v1 = reg.register(fake_model(tmp_path / "a", "a"), {"metrics": {"x": 1}})
    v2 = reg.register(fake_model(tmp_path / "b", "b"), {"metrics": {"x": 2}})
    assert (v1, v2) == ("v0001", "v0002")
    assert reg.aliases() == {"production": "v0002", "previous": "v0001"}
    assert json.loads((reg.model_path("production") / "config.json").read_text())["tag"] == "b"
    assert reg.record("previous")["metrics"] == {"x": 1}
    assert reg.rollback() == {"production": "v0001", "previous": "v0002"}
    assert json.loads((reg.model_path("production") / "config.json").read_text())["tag"] == "a"
    moves = [h for h in reg.history() if "alias" in h]
    assert [m["to"] for m in moves] == ["v0001", "v0002", "v0001"]
    # Versions are immutable copies: changing the source does not change the registry.
    (tmp_path / "a" / "config.json").write_text("{}")
    assert json.loads((reg.model_path("v0001") / "config.json").read_text())["tag"] == "a"


def test_errors_are_one_line(tmp_path):
    reg = Registry(tmp_path / "reg", "m")
    with pytest.raises(TemperingError, match="nothing to roll back"):
        reg.rollback()
    with pytest.raises(TemperingError, match="no alias 'production'"):
        reg.resolve("production")
    with pytest.raises(TemperingError, match="not a model folder"):
        reg.register(tmp_path, {})
    with pytest.raises(TemperingError, match="not a valid registry name"):
        Registry(tmp_path, "../escape")
    assert reg.versions() == []


def _promote(args):
    root, i = args
    src = fake_model(Path(root) / f"src{i}", f"model-{i}")
    return Registry(Path(root) / "reg", "m").register(src, {"i": i})


def test_concurrent_promotions_leave_a_consistent_registry(tmp_path):
    n = 6
    with mp.get_context("spawn").Pool(n) as pool:
        versions = pool.map(_promote, [(str(tmp_path), i) for i in range(n)])
    reg = Registry(tmp_path / "reg", "m")
    assert sorted(versions) == [f"v{i:04d}" for i in range(1, n + 1)]  # no number used twice, no gap
    assert reg.versions() == sorted(versions)
    aliases = reg.aliases()
    assert aliases["production"] in versions and aliases["previous"] in versions
    assert aliases["production"] != aliases["previous"]
    # The alias history is one chain: each move starts where the previous one ended.
    moves = [h for h in reg.history() if h.get("alias") == "production"]
    assert len(moves) == n
    for before, after in zip(moves, moves[1:]):
        assert after["from"] == before["to"]
    assert moves[-1]["to"] == aliases["production"]
    # Every version is complete and holds the model it says.
    for v in versions:
        rec = reg.record(v)
        assert json.loads((reg.model_path(v) / "config.json").read_text())["tag"] == f"model-{rec['i']}"
    assert not list((tmp_path / "reg" / "m" / "versions").glob(".tmp-*"))


def test_cli_list_show_promote_rollback(tmp_path, capsys):
    reg = Registry(tmp_path / "reg", "m")
    reg.register(fake_model(tmp_path / "a", "a"), {"gate": {"passed": True, "reasons": []},
                                                   "lineage": {"git_sha": "abc", "data": {"sft.jsonl": "f00"}}})
    reg.register(fake_model(tmp_path / "b", "b"), {})
    common = ["--registry", str(tmp_path / "reg"), "--name", "m"]
    assert main(common + ["list"]) == 0
    out = capsys.readouterr().out
    assert "v0001" in out and "v0002  " in out and "production" in out and "previous" in out
    assert main(common + ["show", "v0001"]) == 0
    out = capsys.readouterr().out
    assert "git_sha:  abc" in out and "gate:     passed" in out
    assert main(common + ["promote", "v0001"]) == 0
    assert reg.aliases()["production"] == "v0001"
    assert main(common + ["rollback"]) == 0
    assert reg.aliases()["production"] == "v0002"
    assert main(common + ["show", "v0009"]) == 2
    assert "no version v0009" in capsys.readouterr().err


def test_mirrors_are_off_offline_and_git_tag_writes_gto_tags(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg", "m")
    v = reg.register(fake_model(tmp_path / "a", "a"), {})
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert mirror_wandb(reg, v, "production", "p") is None
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    monkeypatch.setenv("GIT_AUTHOR_NAME", "t")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "t@t")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "t")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@t")
    assert git_tag(v, "m", "production", cwd=repo) == "m@v0001"
    tags = subprocess.run(["git", "tag", "-l"], cwd=repo, capture_output=True, text=True).stdout.split()
    assert set(tags) == {"m@v0001", "m#production#1"}
    assert git_tag("v0002", "m", "production", cwd=tmp_path / "nogit") is None


def _params(tmp_path, **promote):
    from tempering.config import from_dict

    return from_dict({"promote": {"registry": str(tmp_path / "reg"), "model_name": "m", **promote},
                      "tracking": {"wandb": "disabled"}})


def test_promote_stage_registers_only_when_the_gate_passed(tmp_path):
    from tasks.promote import run

    model = fake_model(tmp_path / "export", "cand")
    (model / "meta.json").write_text(json.dumps({"lineage": {"base_model": {"source": "x"}},
                                                 "data_hashes": {"sft": "abc"}}))
    (tmp_path / "evaluate.json").write_text(json.dumps({"benchmarks": {}}))
    failed = tmp_path / "gate_failed.json"
    failed.write_text(json.dumps({"passed": False, "reasons": ["domain: gain: too small"]}))
    passed = tmp_path / "gate_passed.json"

    def judged(folder):  # a passing verdict about exactly these weights
        passed.write_text(json.dumps({"passed": True, "reasons": [], "candidate": {"hash": hash_path(folder)}}))

    judged(model)
    params = _params(tmp_path)
    kw = dict(model=str(model), evaluation=str(tmp_path / "evaluate.json"), metrics=str(tmp_path / "promote.json"))

    out = run(params, gate=str(failed), **kw)
    assert out["promoted"] is False and out["reasons"] == ["gate failed: domain: gain: too small"]
    assert not (tmp_path / "reg").exists()

    out = run(params, gate=str(passed), **kw)
    assert out["promoted"] is True and out["version"] == "v0001"
    rec = Registry(tmp_path / "reg", "m").record("production")
    assert rec["gate"]["passed"] and rec["lineage"]["data"] == {"sft": "abc"}
    assert rec["lineage"]["base_model"] == {"source": "x"} and rec["lineage"]["parent"] is None
    assert rec["params"]["promote"]["model_name"] == "m"
    # The same weights again: no second copy, the alias stays.
    out = run(params, gate=str(passed), **kw)
    assert out["version"] == "v0001"
    assert Registry(tmp_path / "reg", "m").versions() == ["v0001"]
    # New weights: the old verdict did not judge them, so it is refused ...
    (model / "model.safetensors").write_bytes(b"new" * 100)
    with pytest.raises(TemperingError, match="refusing to register a model the gate did not judge"):
        run(params, gate=str(passed), **kw)
    assert Registry(tmp_path / "reg", "m").versions() == ["v0001"]
    # ... and a verdict about them makes a new version whose parent is the old production.
    judged(model)
    out = run(params, gate=str(passed), **kw)
    reg = Registry(tmp_path / "reg", "m")
    assert out["version"] == "v0002" and reg.record("v0002")["lineage"]["parent"] == "v0001"
    assert reg.aliases() == {"production": "v0002", "previous": "v0001"}


def test_registry_cli_runs_as_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tempering.registry", "--registry", str(tmp_path), "list"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "no versions" in proc.stdout


def test_champion_file_follows_promotions_and_rollbacks(tmp_path):
    """The champion stage's file (an evaluate dependency) changes exactly when the alias moves."""
    from tasks.champion import run as champion

    params = _params(tmp_path)
    out = tmp_path / "champion.json"
    kw = dict(registry=str(tmp_path / "reg"), registry_name="m", alias="production", out=str(out))
    assert champion(params, **kw)["version"] is None
    empty = out.read_bytes()
    reg = Registry(tmp_path / "reg", "m")
    v1 = reg.register(fake_model(tmp_path / "a", "a"), {"model_hash": "ha"}, alias="production")
    champion(params, **kw)
    first = out.read_bytes()
    assert first != empty and json.loads(first)["version"] == v1 and json.loads(first)["model_hash"] == "ha"
    champion(params, **kw)
    assert out.read_bytes() == first          # nothing moved: byte-identical, DVC skips evaluate
    v2 = reg.register(fake_model(tmp_path / "b", "b"), {"model_hash": "hb"}, alias="production")
    assert json.loads(json.dumps(champion(params, **kw)))["version"] == v2
    reg.rollback()
    assert champion(params, **kw)["version"] == v1 and out.read_bytes() == first
