"""The boundaries of tempering.train, checked.

- Only ``tempering/train/sft.py`` and ``tempering/train/dpo.py`` import trl, and only
  ``tempering/train/models.py`` imports peft, anywhere under tempering/ and tasks/ (module level
  or lazily inside functions).
- The modules validate and evaluate use (precision, data, models, losses, checkpoints) load
  neither trl nor peft: not on import, and not while tokenizing as SFT and DPO do.
- Every method the trainers override (and every private transformers/trl method they call) still
  exists in the pinned trl/transformers with the signature the override was written against.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _importers(top: str) -> set[str]:
    """Files under tempering/ and tasks/ that import ``top`` (or a submodule) anywhere in them."""
    found = set()
    for package in ("tempering", "tasks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                if any(n == top or n.startswith(top + ".") for n in names):
                    found.add(path.relative_to(ROOT).as_posix())
    return found


def test_only_the_sft_and_dpo_modules_import_trl():
    assert _importers("trl") == {"tempering/train/sft.py", "tempering/train/dpo.py"}


def test_only_the_models_module_imports_peft():
    assert _importers("peft") == {"tempering/train/models.py"}


def test_the_import_walk_sees_lazy_imports(tmp_path, monkeypatch):
    """Not vacuous: an import inside a function counts."""
    (tmp_path / "tempering").mkdir()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "x.py").write_text("def f():\n    from trl.trainer import utils\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _importers("trl") == {"tasks/x.py"}


PROBE = """
import json, sys
import tempering.train.checkpoints, tempering.train.losses, tempering.train.models, tempering.train.precision
from tempering.train import data
on_import = sorted(m for m in ("trl", "peft", "transformers", "torch") if m in sys.modules)
tok = data.load_tokenizer(sys.argv[1])
data.tokenize_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
data.dpo_truncate(data.tokenize_preference(tok, [{"role": "user", "content": "q"}], "a", "b"), 64, 32)
print(json.dumps({"on_import": on_import, "after": sorted(m for m in ("trl", "peft") if m in sys.modules)}))
"""


def test_validate_and_evaluate_modules_load_no_trainer_stack(tmp_path):
    """What validate and evaluate use: importing loads nothing heavy, tokenizing loads neither
    trl nor peft (a fresh interpreter, so other tests' imports do not count)."""
    from tempering.testing import make_tiny_model

    tiny = make_tiny_model(tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-c", PROBE, str(tiny)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"on_import": [], "after": []}, seen


# ---------------------------------------------------------------------------- pinned overrides

# (class, method) -> the signature in trl 1.16.0 / transformers 5.23.0 (pyproject.toml's pins).
PINNED = {
    ("SFTTrainer", "compute_loss"): "(self, model, inputs, return_outputs=False, num_items_in_batch=None)",
    ("SFTTrainer", "training_step"): "(self, *args, **kwargs)",
    ("DPOTrainer", "training_step"): "(self, *args, **kwargs)",
    ("DPOTrainer", "_prepare_dataset"): (
        "(self, dataset: datasets.arrow_dataset.Dataset | datasets.iterable_dataset.IterableDataset, "
        "processing_class: transformers.tokenization_utils_base.PreTrainedTokenizerBase | "
        "transformers.processing_utils.ProcessorMixin, args: trl.trainer.dpo_config.DPOConfig, dataset_name: str) "
        "-> datasets.arrow_dataset.Dataset | datasets.iterable_dataset.IterableDataset"),
    ("DPOTrainer", "_precompute_ref_logps"): (
        "(self, dataset: datasets.arrow_dataset.Dataset, name: str, batch_size: int) -> datasets.arrow_dataset.Dataset"),
    ("Trainer", "_get_train_sampler"): (
        "(self, train_dataset: torch.utils.data.dataset.Dataset | None = None) -> "
        "torch.utils.data.sampler.Sampler | None"),
    ("Trainer", "_get_eval_sampler"): (
        "(self, eval_dataset: torch.utils.data.dataset.Dataset) -> torch.utils.data.sampler.Sampler | None"),
}
# Called, not overridden: TemperingSFTTrainer's plain path, restoring a finished run, the DPO cache.
CALLED = {
    ("Trainer", "compute_loss"): (
        "(self, model: torch.nn.modules.module.Module, inputs: dict[str, torch.Tensor | typing.Any], "
        "return_outputs: bool = False, num_items_in_batch: torch.Tensor | int | None = None) -> "
        "torch.Tensor | tuple[torch.Tensor, typing.Any]"),
    ("Trainer", "_load_from_checkpoint"): (
        "(self, resume_from_checkpoint: str, model: torch.nn.modules.module.Module | None = None) -> None"),
    ("DPOTrainer", "compute_ref_log_probs"): "(self, model, inputs)",
}
UPGRADE = ("a trl/transformers upgrade changed {where}; re-check tempering's override or call of it "
           "(tempering/train/loop.py, sft.py, dpo.py), then record the new signature here")


def _classes():
    from transformers import Trainer
    from trl import DPOTrainer, SFTTrainer

    return {"Trainer": Trainer, "SFTTrainer": SFTTrainer, "DPOTrainer": DPOTrainer}


def _signature(owner: str, name: str) -> str:
    cls = _classes()[owner]
    assert name in vars(cls), UPGRADE.format(where=f"{owner}.{name} (no longer defined there)")
    return str(inspect.signature(vars(cls)[name]))


@pytest.mark.parametrize("owner,name", sorted(PINNED) + sorted(CALLED))
def test_pinned_trl_and_transformers_methods_keep_their_signature(owner, name):
    recorded = {**PINNED, **CALLED}[(owner, name)]
    assert _signature(owner, name) == recorded, UPGRADE.format(where=f"the signature of {owner}.{name}")


def test_every_override_is_pinned():
    """A new override of a trl/transformers method needs its pin above; each pinned one is the
    method the trainer actually inherits (the nearest definition in its parents)."""
    from tempering.train.dpo import TemperingDPOTrainer
    from tempering.train.loop import TemperingTrainerMixin
    from tempering.train.sft import TemperingSFTTrainer

    pinned = set()
    for ours, parent in ((TemperingSFTTrainer, "SFTTrainer"), (TemperingDPOTrainer, "DPOTrainer")):
        base = _classes()[parent]
        for name in set(vars(ours)) | set(vars(TemperingTrainerMixin)):
            if name.startswith("__") or not callable(getattr(base, name, None)):
                continue
            owner = next(c for c in base.__mro__ if name in vars(c)).__name__
            assert (owner, name) in PINNED, f"{ours.__name__}.{name} overrides {owner}.{name} without a pin"
            pinned.add((owner, name))
    assert pinned == set(PINNED)


def test_the_pins_are_the_pinned_versions():
    import transformers
    import trl

    pins = (ROOT / "pyproject.toml").read_text()
    assert f'"trl=={trl.__version__}"' in pins and f'"transformers=={transformers.__version__}"' in pins, \
        "installed trl/transformers differ from pyproject.toml's pins: the recorded signatures are for the pins"
