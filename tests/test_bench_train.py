"""bench/bench_train.py and bench/gpu_check.{sh,py}: the measuring helpers, a smoke run of every arm
on a tiny random model (same batches across arms, finite losses), and the GPU check's clean
refusal on a machine without CUDA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench_loader import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_train")


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def test_summarize_and_padding(bench):
    assert bench.summarize([3, None, 1, 2]) == {"n": 3, "min": 1.0, "median": 2.0, "max": 3.0}
    assert bench.summarize([None]) is None
    lengths = [10, 10, 2, 2]
    assert bench.padding_share(lengths, [0, 1, 2, 3], 2) == 0.0
    assert bench.padding_share(lengths, [0, 2, 1, 3], 2) == pytest.approx(1 - 24 / 40, abs=1e-4)


def test_batch_plan_is_a_seeded_length_grouped_permutation(bench):
    lengths = [5, 50, 7, 48, 6, 49, 8, 47] * 4
    plan = bench.batch_plan(lengths, 4)
    assert sorted(plan) == list(range(len(lengths))) and plan == bench.batch_plan(lengths, 4)
    assert bench.padding_share(lengths, plan, 4) < bench.padding_share(lengths, bench._random_order(len(lengths)), 4)


def test_same_batches_flags_a_differing_step(bench):
    res = {"a": {"step_batches": ["x", "y"]}, "b": {"step_batches": ["x", "y"]}, "c": {"step_batches": ["x", "z"]}}
    assert bench.same_batches(res, ["a", "b"])["same"] is True
    bad = bench.same_batches(res, ["a", "b", "c"])
    assert bad["same"] is False and bad["differing_steps"] == {"c": [1]}
    assert bench.same_batches({"a": {"step_batches": [None]}}, ["a"])["same"] is False


def test_every_arm_on_a_tiny_model_sees_the_same_batches(bench, tmp_path):
    from tempering.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "train.json"
    assert bench.main(["--base", str(model), "--data", str(tmp_path / "none"), "--max-rows", "24", "--repeats", "2",
                       "--sft-steps", "1", "--dpo-steps", "1", "--warmup", "1", "--batch", "4", "--peak-rounds", "1",
                       "--peak-size", "128", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for kind, arms in (("sft", bench.SFT_ARMS + bench.SFT_ABLATIONS), ("dpo", bench.DPO_ARMS + bench.DPO_ABLATIONS)):
        r = res[kind]
        assert set(r["arms"]) == set(arms)
        assert r["same_batches"] is True, r["same_batches_detail"]
        assert len(r["rounds"]) == 2 and r["rounds"][0]["order"] != r["rounds"][1]["order"]  # the first arm rotates
        for arm, e in r["arms"].items():
            assert e["tokens_per_s"]["n"] == 2 and e["tokens_per_s"]["min"] > 0, arm
        for rnd in r["rounds"]:
            for arm, a in rnd["arms"].items():
                assert a["loss_last"] is not None and a["loss_last"] == a["loss_last"], (kind, arm)  # finite
            assert len(rnd["loadavg_start"]) == 3 and len(rnd["loadavg_end"]) == 3
    assert res["peak"]["bf16_gflops"] > 0 and res["sft"]["arms"]["tempering"]["mfu"]["median"] > 0
    assert {"selective_lm_head", "eager_attention_tempering",
            "eager_attention_tuned_trl", "packing"} <= set(res["sft"]["ablations"])
    assert {"compact_dpo_head", "shared_dpo_prompts", "eager_attention_tempering"} <= set(res["dpo"]["ablations"])
    # The cross-run reference cache: a rebuild reads the log-probs back.
    assert all(rnd["tempering_rebuild"]["cache_hit"] for rnd in res["dpo"]["rounds"])


def test_qlora_refuses_without_cuda(bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        bench.main(["--base", str(tmp_path), "--adapter", "qlora"])


def test_gpu_check_refuses_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    gpu = load_bench("gpu_check")
    assert gpu.main(["--out", str(tmp_path / "py")]) == gpu.REFUSED
    doc = json.loads((tmp_path / "py" / "gpu_check.json").read_text())
    assert doc["status"] == "refused" and "no CUDA GPU" in doc["reason"] and doc["steps"] == {}
    # The shell entry point refuses before installing anything.
    env = dict(os.environ, PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                                if not (Path(p) / "nvidia-smi").exists()))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "refused" in proc.stderr and not (ROOT / ".venv-gpu").exists() or shutil.which("nvidia-smi")
    assert json.loads((tmp_path / "sh" / "gpu_check.json").read_text())["status"] == "refused"


def test_gpu_check_plans_every_step(tmp_path):
    gpu = load_bench("gpu_check")
    args = gpu.argparse.Namespace(out=str(tmp_path), base="b", data="d", batch=8, repeats=3, sft_steps=10,
                                  dpo_steps=6, ddp_steps=10)
    one = {name: (cmd, reason) for name, cmd, _, reason in gpu.steps(args, 1)}
    assert set(one) == {"train_bf16", "qlora_sft", "ddp", "evaluate"}
    assert one["ddp"][0] is None and "DDP needs at least 2" in one["ddp"][1]
    assert "--adapter" in one["qlora_sft"][0] and "qlora" in one["qlora_sft"][0]
    two = {name: cmd for name, cmd, _, _ in gpu.steps(args, 2)}
    assert "train.launcher=ddp" in two["ddp"] and "train.num_processes=2" in two["ddp"]
    assert sum(limit for _, _, limit, _ in gpu.steps(args, 2)) <= 8 * 60 - 30   # fits the 8-minute check
    # --allow-cpu on a folder without a model: refused with the model's reason, nothing run.
    assert gpu.main(["--out", str(tmp_path / "o"), "--base", str(tmp_path / "nomodel"), "--allow-cpu"]) == gpu.REFUSED
    assert "no model folder" in json.loads((tmp_path / "o" / "gpu_check.json").read_text())["reason"]


def test_gpu_check_random_base_has_the_smollm2_shape(tmp_path):
    """--base random: SmolLM2-135M's config (134,515,008 parameters, counted on the meta device,
    nothing allocated) and a scaled-down build of the same folder that loads and runs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gpu = load_bench("gpu_check")
    assert gpu.random_shape("random") == gpu.random_shape("random:SmolLM2-135M") == "SmolLM2-135M"
    assert gpu.random_shape(str(tmp_path)) is None
    with pytest.raises(SystemExit):   # an unknown shape is refused before anything runs
        gpu.main(["--out", str(tmp_path / "o"), "--base", "random:Nope"])
    config = AutoConfig.from_pretrained(gpu.SHAPES["SmolLM2-135M"])
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size) == ("llama", 576, 30,
                                                                                                    49152)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in full.parameters()) == 134_515_008   # what tasks.base_model reports

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    meta = gpu.make_random_base(tmp_path / "rb", overrides=small)
    assert meta["random_weights"] is True and meta["source"] == "random:SmolLM2-135M" and "mean nothing" in meta["note"]
    assert json.loads((tmp_path / "rb" / "meta.json").read_text()) == meta
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rb")
    tok = AutoTokenizer.from_pretrained(tmp_path / "rb")
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2 and len(tok) == 49152
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert ids.shape[1] > 3 and torch.isfinite(model(ids).logits.float()).all()
    again = gpu.make_random_base(tmp_path / "rb2", overrides=small)   # seeded: the same weights
    assert again["n_params"] == meta["n_params"]
    assert (tmp_path / "rb" / "model.safetensors").read_bytes() == (tmp_path / "rb2" / "model.safetensors").read_bytes()


def _fake_fetch(table):
    """A stand-in for pip download: name -> (version, Requires-Dist) from a table, recording calls."""
    calls = []

    def fetch(name, want):
        calls.append((name, want))
        version, requires = table.get(name, (want[2:] if want.startswith("==") else "1.0", []))
        return version, requires

    fetch.calls = calls
    return fetch


def test_gpu_wheels_carry_the_check_and_never_torch():
    """The wheel list, computed against the device image's packages without downloading."""
    wheels = load_bench("gpu_wheels")
    image, pins = wheels.load_image(), wheels.pyproject_pins()
    assert image["torch"] == "2.11.0" and image["transformers"] == "5.17.0" and "pyarrow" in image
    assert "pydantic" not in image and "trl" not in image
    table = {
        "trl": ("1.16.0", ["accelerate>=1.10.1", "datasets>=4.7.0", "transformers>=4.56.2", "pyarrow>=21.0.0",
                           "rich; extra == 'dev'"]),
        "bitsandbytes": ("0.50.2", ["torch<3,>=2.4", "numpy>=1.17"]),
        "lm-eval": ("0.4.13", ["datasets>=2.16.0", "sqlitedict", "sacrebleu>=1.5.0"]),
        "datasets": ("5.2.0", ["pyarrow>=24.0.0", "fsspec[http]<=2026.9.0,>=2023.1.0", "huggingface-hub<3.0,>=1.31.0",
                               "dill<0.4.2,>=0.3.0"]),
        "transformers": ("5.23.0", ["huggingface-hub<3.0,>=1.31.0", "tokenizers<0.24.0,>=0.23.1",
                                    "pywin32; sys_platform == 'win32'"]),
        "peft": ("0.21.2", ["torch>=1.13.0", "transformers"]),
        "pydantic": ("2.14.4", ["pydantic-core==2.50.5", "typing-extensions>=4.14.1"]),
    }
    fetch = _fake_fetch(table)
    plan = wheels.plan(fetch, image, pins, installed={"pydantic": "2.14.4", "dill": "0.4.1"})
    carried = set(plan.carried)
    assert {"trl", "bitsandbytes", "lm-eval", "datasets", "transformers", "peft"} <= carried
    assert {"pydantic", "pydantic-core", "sqlitedict", "dill"} <= carried        # the image lacks them
    assert "fsspec" in carried            # the image's version is unknown and datasets caps it
    for name in ("torch", "numpy", "accelerate", "huggingface-hub", "tokenizers", "pyarrow", "sacrebleu"):
        assert name not in carried and name in plan.from_image, name
    assert not any(wheels.never_carried(n) for n in carried) and "pywin32" not in carried and "rich" not in carried
    assert plan.carried["transformers"].version == pins["transformers"] == "5.23.0"   # the pin, not the image's 5.17
    assert plan.carried["dill"].version == "0.4.1"           # the tested environment's version
    assert ("pydantic-core", "==2.50.5") in fetch.calls
    assert set(plan.spares["pyarrow"].split(",")) == {">=21.0.0", ">=24.0.0"}   # a spare, if small enough
    assert "torch" not in plan.spares and "torch" not in {n for n, _ in fetch.calls}
    roots = wheels.roots(pins)
    assert "trl==1.16.0" in roots and "bitsandbytes==0.50.2" in roots and "lm-eval==0.4.13" in roots
    assert "torch" in roots and not any(r.startswith(("prefect", "great-expectations", "dvc", "wandb")) for r in roots)

    # torch is never carried: a requirement the image's torch cannot meet stops the plan.
    table["bitsandbytes"] = ("0.50.2", ["torch>=3"])
    with pytest.raises(wheels.PlanError, match="never carried"):
        wheels.plan(_fake_fetch(table), image, pins)


def test_gpu_wheels_slim_bitsandbytes_keeps_one_cuda_library(tmp_path):
    import base64
    import hashlib
    import zipfile

    wheels = load_bench("gpu_wheels")
    files = {f"bitsandbytes/libbitsandbytes_{k}.so": k.encode() * 100 for k in ("cpu", "cuda126", "cuda130", "rocm64")}
    files["bitsandbytes/__init__.py"] = b"x = 1\n"

    def row(name, data):
        return f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"

    record = "bitsandbytes-0.50.2.dist-info/RECORD"
    path = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(record, "\n".join([row(n, d) for n, d in files.items()] + [f"{record},,"]) + "\n")
    _, dropped = wheels.slim_bitsandbytes(path, "130")
    assert sorted(dropped) == ["bitsandbytes/libbitsandbytes_cuda126.so", "bitsandbytes/libbitsandbytes_rocm64.so"]
    with zipfile.ZipFile(path) as z:
        assert sorted(n for n in z.namelist() if n.endswith(".so")) == [
            "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
    assert wheels.record_ok(path)
    with pytest.raises(wheels.PlanError, match="cuda999"):
        wheels.slim_bitsandbytes(path, "999")


def test_gpu_check_steps_import_no_orchestration_or_data_layer():
    """What the GPU check's steps import pulls in none of prefect, great-expectations, dvc, dvclive or
    datasketch: bench/gpu_wheels.py does not carry them."""
    code = ("import sys; sys.path.insert(0, 'bench'); import bench_train, bench_eval; "
            "import tempering.config, tempering.scorecard, tempering.scoring, tempering.launcher, tasks.make_data, "
            "tasks.sft, tempering.train.sft, tempering.train.dpo, tempering.train.models; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'great_expectations', 'dvc', "
            "'dvclive', 'datasketch', 'gguf'}); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([os.sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
