"""tempering.train.precision: native bf16 detection, the autocast choice, the physical core count."""

from __future__ import annotations

import pytest

from tempering import TemperingError
from tempering.train import precision
from tempering.train.precision import choose_precision, cpu_has_bf16, physical_cores


def test_cpu_bf16_detection_reads_the_flags():
    assert cpu_has_bf16("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_bf16("flags\t\t: fpu avx2 avx512f\n")


def test_precision_auto_follows_hardware(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda cpuinfo=None: True)
    assert choose_precision("auto").name == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda cpuinfo=None: False)
    assert choose_precision("auto").name == "fp32"
    assert choose_precision("bf16").name == "bf16"  # an explicit choice wins
    with pytest.raises(TemperingError, match="fp16 needs a CUDA GPU"):
        choose_precision("fp16")


def test_physical_cores_is_sane():
    import os

    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
