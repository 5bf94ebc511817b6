"""params.yaml loads into frozen typed sections; bad keys and values give one line naming the key."""

from pathlib import Path

import pytest
import yaml

from tempering.config import ParamsError, apply_overrides, from_dict, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.sft.learning_rate > 0
    assert p.validate_.sources, "default run must have sources"
    assert {b.role for b in p.evaluate.benchmarks} == {"domain", "general"}


def test_sections_are_frozen():
    p = load_params(ROOT / "params.yaml")
    with pytest.raises(Exception):
        p.sft.learning_rate = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("sft.lr=1e-4", "sft.lr", "unknown key"),
        ("sft.learning_rate=-1", "sft.learning_rate", "greater than 0"),
        ("sft.adapter.method=ia3x", "sft.adapter.method", "'lora'"),
        ("dedup.threshold=1.5", "dedup.threshold", "less than or equal to 1"),
        ("nonsense.x=1", "nonsense", "unknown key"),
        ("validate.max_reject_share=abc", "validate.max_reject_share", "valid number"),
        ("gate.max_forgetting={default: 2}", "gate.max_forgetting", "> 0 and <= 1"),
        ("gate.test=none", "gate.test", "'bootstrap' or 'mcnemar'"),
        ("dpo.max_prompt_length=999", "<root>", "max_prompt_length must be smaller"),
    ],
)
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", [override])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(ROOT / "params.yaml") + ": ")
    assert key in msg and words in msg


def test_overrides_parse_like_yaml():
    raw = apply_overrides({}, ["sft.learning_rate=5e-4", "cpt.enabled=true", "evaluate.limit=null"])
    assert raw == {"sft": {"learning_rate": 5e-4}, "cpt": {"enabled": True}, "evaluate": {"limit": None}}
    p = from_dict(apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), ["sft.learning_rate=5e-4"]))
    assert p.sft.learning_rate == 5e-4


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n")
    with pytest.raises(ParamsError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_params(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(top)


def test_defaults_only_file_is_valid(tmp_path):
    empty = tmp_path / "p.yaml"
    empty.write_text("")
    assert load_params(empty).sft.adapter.method == "lora"
