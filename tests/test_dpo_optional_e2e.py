"""DPO is optional, as CPT is: the tiny project (tests/conftest.py) with its preference source
removed, as a new user with SFT data only would run it (`dvc repro`), reaches export with the SFT
model passed through dpo; then the same project with dpo.enabled: false.

Kept cheap: a copy of the session's reproduced project (DVC cache included), so only validate,
dedup, dpo and export re-run, and only up to `export` (evaluate and later stages read
models/export alone, which the main tiny-project run covers). Still two more `dvc repro` runs
(about 50 s on 2 cores): `slow`, so it runs in `make test-e2e` and CI, and the default suite
keeps its 10-minute budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tiny_project import copy_project, dvc, git_commit


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def _set_params(root: Path, **sections) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(root, "params")


@pytest.mark.slow
def test_sft_only_project_and_dpo_disabled_reach_export(tiny_project: Path, tmp_path: Path):
    root = copy_project(tiny_project, tmp_path / "sft_only")
    sources = yaml.safe_load((root / "params.yaml").read_text())["validate"]["sources"]
    sft_only = [s for s in sources if s["kind"] != "preference"]
    assert len(sft_only) < len(sources)
    _set_params(root, validate={"sources": sft_only})

    # 1. No preference source at all: dpo passes the SFT model through with a note, export merges it.
    ran = _ran(dvc(root, "repro", "export", timeout=900).stdout)
    assert {"validate", "dedup", "dpo", "export"} <= ran and "sft" not in ran, ran
    assert (root / "data/clean/preference.jsonl").read_text() == ""
    dpo = json.loads((root / "metrics/dpo.json").read_text())
    assert dpo["trained"] is False and dpo["enabled"] is True and dpo["steps"] == 0
    assert dpo["note"].startswith("no preference rows to train on (data/clean/preference.jsonl)")
    pointer = json.loads((root / "models/dpo/pointer.json").read_text())
    assert (root / "models/dpo" / pointer["model"]).resolve() == (root / "models/sft").resolve()
    assert not list((root / "models/dpo").glob("*.safetensors"))
    export = json.loads((root / "metrics/export.json").read_text())
    assert export["prompts"] > 0 and export["token_agreement"] >= 0.5
    assert list((root / "models/export").glob("*.safetensors"))
    card = (root / "models/export/model_card.md").read_text()
    assert "Not trained: no preference rows to train on" in card
    validate = json.loads((root / "metrics/validate.json").read_text())
    assert validate["preference_tokens"]["skipped"] == "no preference rows"

    # 2. The preference data back, DPO switched off: validate and dedup see the pairs (and the
    #    preference token checks pass on them), SFT is reused, dpo passes through, export re-runs.
    _set_params(root, validate={"sources": sources}, dpo={"enabled": False})
    ran = _ran(dvc(root, "repro", "export", timeout=900).stdout)
    assert {"validate", "dpo", "export"} <= ran and "sft" not in ran, ran
    assert (root / "data/clean/preference.jsonl").read_text().strip()
    validate = json.loads((root / "metrics/validate.json").read_text())
    assert validate["preference_tokens"]["checked"] and validate["preference_tokens"]["failed"] == []
    dpo = json.loads((root / "metrics/dpo.json").read_text())
    assert dpo["trained"] is False and dpo["enabled"] is False
    assert dpo["note"].startswith("dpo.enabled is false")
    assert "Not trained: dpo.enabled is false" in (root / "models/export/model_card.md").read_text()
    out = dvc(root, "status", "export").stdout
    assert "changed" not in out, out
