"""tempering.train.models: peft configs from params, the QLoRA one-line error, the frozen base dtype."""

from __future__ import annotations

from pathlib import Path

import pytest

from tempering import TemperingError
from tempering.config import from_dict
from tempering.train.models import frozen_dtype, load_model, peft_config
from tempering.train.precision import Precision


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tempering.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_peft_config_from_adapter_params():
    p = from_dict({"sft": {"adapter": {"method": "lora", "r": 8, "alpha": 16, "use_rslora": True,
                                       "use_dora": True, "target_modules": ["q_proj", "v_proj"]}}})
    c = peft_config(p.sft.adapter)
    assert (c.r, c.lora_alpha, c.use_rslora, c.use_dora) == (8, 16, True, True)
    assert set(c.target_modules) == {"q_proj", "v_proj"}
    assert peft_config(from_dict({"sft": {"adapter": {"method": "full"}}}).sft.adapter) is None


def test_qlora_without_cuda_is_a_one_line_error(tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TemperingError) as err:
        load_model(tiny, method="qlora", section="sft")
    assert str(err.value).startswith("sft.adapter.method: qlora needs a CUDA GPU") and "\n" not in str(err.value)


def test_frozen_dtype_only_for_frozen_bases():
    import torch

    bf16, fp16, fp32 = (Precision(n, d, "t") for n, d in (("bf16", "cpu"), ("fp16", "cuda"), ("fp32", "cpu")))
    assert frozen_dtype("lora", bf16) is torch.bfloat16
    assert frozen_dtype("prefix", fp16) is torch.float16
    assert frozen_dtype("lora", fp32) is torch.float32
    assert frozen_dtype("full", bf16) is torch.float32  # trained weights stay float32
    assert frozen_dtype("lora", bf16, "float32") is torch.float32
