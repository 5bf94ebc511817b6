"""train.launcher: the accelerate configs parse, and the launcher builds the right command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tempering import TemperingError
from tempering.config import LaunchParams, ParamsError, load_params
from tempering.dag import load_stages
from tempering.launcher import CONFIG_FILES, build_command, main

ROOT = Path(__file__).resolve().parents[1]
ACCEL = ROOT / "infra" / "accelerate"
EXPECTED_TYPE = {"single_gpu": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP",
                 "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}


@pytest.mark.parametrize("launcher", sorted(EXPECTED_TYPE))
def test_accelerate_configs_parse(launcher: str):
    """accelerate's own config class loads every file (it rejects unknown keys)."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = ACCEL / CONFIG_FILES[launcher]
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.distributed_type.value == EXPECTED_TYPE[launcher]
    assert cfg.num_machines == 1
    if launcher == "single_gpu":
        assert cfg.num_processes == 1
    else:
        assert cfg.num_processes > 1
    if launcher.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(launcher[-1])
    if launcher == "fsdp":
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_every_launcher_choice_has_a_config_file():
    choices = LaunchParams.model_fields["launcher"].annotation.__args__
    assert set(choices) == set(CONFIG_FILES)
    for name, file in CONFIG_FILES.items():
        assert file is None if name == "none" else (ACCEL / file).is_file(), name


def test_plain_launch_is_python_dash_m():
    cmd = build_command(LaunchParams(), "tasks.sft", ["--out", "models/sft"], root=ROOT, python="py")
    assert cmd == ["py", "-m", "tasks.sft", "--out", "models/sft"]


@pytest.mark.parametrize("launcher", sorted(EXPECTED_TYPE))
def test_accelerate_launch_command(launcher: str):
    train = LaunchParams(launcher=launcher, num_processes=4 if launcher != "single_gpu" else None)
    args = ["--base", "models/cpt", "--set", "sft.max_steps=3"]
    cmd = build_command(train, "tasks.sft", args, root=ROOT, python="py")
    expected = ["py", "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / CONFIG_FILES[launcher])]
    if launcher != "single_gpu":
        expected += ["--num_processes", "4"]
    assert cmd == expected + ["--module", "tasks.sft", *args]
    # accelerate's own parser reads it back: the right config, the module, the stage's arguments.
    from accelerate.commands.launch import launch_command_parser

    ns = launch_command_parser().parse_args(cmd[3:])
    assert ns.config_file == str(ACCEL / CONFIG_FILES[launcher])
    assert ns.module is True and ns.training_script == "tasks.sft"
    assert ns.training_script_args == args
    assert ns.num_processes == (4 if launcher != "single_gpu" else None)


def test_missing_config_file_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(TemperingError, match="accelerate config .*fsdp.yaml not found"):
        build_command(LaunchParams(launcher="fsdp"), "tasks.sft", [], root=tmp_path)


def test_unknown_launcher_is_rejected_by_the_schema(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"launcher": "horovod"}}))
    with pytest.raises(ParamsError, match="train.launcher"):
        load_params(params)


def test_training_stages_go_through_the_launcher():
    """dvc.yaml is the one place stage commands live; the training ones are prefixed, not copied."""
    stages = load_stages(ROOT / "dvc.yaml")
    for name in ("cpt", "sft", "dpo"):
        assert stages[name]["cmd"].startswith(f"python -m tempering.launcher tasks.{name} "), name
        assert "train" in stages[name]["params"], name


def test_main_runs_the_stage_in_process_or_under_accelerate(tmp_path: Path, monkeypatch, capsys):
    """none: the module runs here with the stage's argv; otherwise accelerate gets the command."""
    (tmp_path / "fake_stage.py").write_text(
        "import sys\nprint('ARGS', sys.argv[1:])\nraise SystemExit(3 if '--fail' in sys.argv else 0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"launcher": "none"}}))
    assert main(["fake_stage", "--out", "x"]) == 0
    assert "ARGS ['--out', 'x']" in capsys.readouterr().out
    assert main(["fake_stage", "--fail"]) == 3

    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd: calls.append(cmd) or 0)
    (tmp_path / "infra/accelerate").mkdir(parents=True)
    (tmp_path / "infra/accelerate/ddp.yaml").write_text((ACCEL / "ddp.yaml").read_text())
    # the params file and overrides come from the stage's own arguments
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump({"train": {"launcher": "ddp"}}))
    assert main(["fake_stage", "--params", "gpu.yaml", "--set", "train.num_processes=2"]) == 0
    assert calls == [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(Path("infra/accelerate/ddp.yaml")), "--num_processes", "2", "--module", "fake_stage",
                      "--params", "gpu.yaml", "--set", "train.num_processes=2"]]
    assert main(["fake_stage", "--set", "train.launcher=mpi"]) == 2
    assert "tempering launcher: error: params.yaml: train.launcher" in capsys.readouterr().err
