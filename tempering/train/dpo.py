"""Direct preference optimisation through TRL's ``DPOTrainer``, with its reference log-prob cache.

Owns :func:`dpo_config` (a dpo params section -> ``DPOConfig``), :class:`TemperingDPOTrainer`
(``trl.DPOTrainer`` with the shared overrides of :class:`~tempering.train.loop.TemperingTrainerMixin`,
``dpo.max_prompt_length``, the compact LM head on CPU and the cached reference log-probs),
the reference cache itself (:func:`reference_cache_key`, :func:`attach_reference_logps`,
:func:`reference_logps_path`, :class:`ReferenceCache`) and :func:`build_dpo_trainer` (what the
dpo stage passes it). One of the two modules that import trl (with :mod:`tempering.train.sft`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trl
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from tempering import TemperingError
from tempering.io import content_id, read_json, write_json
from tempering.train.callbacks import stage_callbacks
from tempering.train.data import cache_root
from tempering.train.losses import fused_head_output, install_compact_lm_head
from tempering.train.loop import TemperingTrainerMixin, TrainFacts, trainer_arguments
from tempering.train.models import peft_config
from tempering.train.precision import Precision

# Models whose forward runs each pair's prompt once (a weak set: nothing stuck on the model).
_SHARED: weakref.WeakSet = weakref.WeakSet()
# Batches the shared-prompt forward packed, and those it left to the unshared path (tests, benches).
SHARED_PROMPT_BATCHES = {"shared": 0, "unshared": 0}


def dpo_config(cfg, tracking, *, output_dir: str, precision: Precision, run_name: str, **extra) -> DPOConfig:
    """A dpo params section -> ``DPOConfig``."""
    # precompute_ref_log_probs=True makes TRL keep no reference model and read the reference
    # log-probs from the dataset; we compute and cache them ourselves (TemperingDPOTrainer).
    return DPOConfig(**trainer_arguments(cfg, tracking, output_dir=output_dir, precision=precision,
                                         run_name=run_name, **extra),
                     beta=cfg.beta, loss_type=[cfg.loss_type], truncation_mode="keep_start",
                     precompute_ref_log_probs=cfg.precompute_ref)


@dataclass(frozen=True)
class ReferenceCache:
    """What one reference log-prob precompute did: its cache ``key`` (None: not cached), whether
    it was a ``hit`` and the ``seconds`` it took."""

    key: str | None
    hit: bool
    seconds: float


def reference_cache_key(*, data: str, reference: str, tokenizer: str, max_length: int, max_prompt_length: int,
                        precision: str, attention: str = "sdpa") -> str:
    """Content address of a DPO reference log-prob set: the preference data, the reference model
    (its weights' hash), the tokenizer + chat template, the max lengths, the autocast precision
    and the attention kernel (bf16 and fp32 log-probs differ, and kernels round differently), plus
    the TRL version (its tokenization of pairs)."""
    # v2: the reference runs each pair's prompt once (install_shared_prompt_forward): the same
    # log-probs up to rounding, so v1 sets are not reused.
    return content_id({"v": 2, "data": data, "reference": reference, "tokenizer": tokenizer,
                       "max_length": max_length, "max_prompt_length": max_prompt_length,
                       "precision": precision, "trl": trl.__version__,
                       **({"attention": attention} if attention != "sdpa" else {})}, 32)


def reference_logps_path(key: str) -> Path:
    """Where the reference log-probs of cache key ``key`` are stored."""
    return cache_root() / "dpo_ref" / f"ref-{key}.json"


def attach_reference_logps(trainer, dataset, key: str | None, batch_size: int) -> tuple[Any, ReferenceCache]:
    """Add ``ref_chosen_logps``/``ref_rejected_logps`` columns to a tokenized DPO dataset.

    With a ``key`` they are read from ``<cache>/dpo_ref/ref-<key>.json`` when present, else
    computed once with the reference (the policy with its adapter disabled, or the untouched
    full model: this runs before the first optimizer step) and written there atomically. Rows are
    processed longest-first in batches of ``2 * batch_size`` (no gradients: twice the batch fits)
    so padding is minimal, then put back in dataset order. Returns (dataset, what the cache did)."""
    import torch

    n = len(dataset)
    path = reference_logps_path(key) if key else None
    if path is not None and path.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, TemperingError):
            blob = read_json(path)
            if blob["rows"] == n:
                return dataset.add_column("ref_chosen_logps", blob["chosen"]).add_column(
                    "ref_rejected_logps", blob["rejected"]), ReferenceCache(key=key, hit=True, seconds=0.0)
    started = time.time()
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    rows = [{c: dataset[i][c] for c in cols} for i in range(n)]
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    order = sorted(range(n), key=lambda i: -lengths[i])
    chosen, rejected = [0.0] * n, [0.0] * n
    device = trainer.accelerator.device
    model = trainer.ref_model or trainer.model
    size = max(1, 2 * batch_size)
    for start in range(0, n, size):
        idx = order[start:start + size]
        batch = trainer.data_collator([rows[i] for i in idx])
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.no_grad():
            c, r = trainer.compute_ref_log_probs(model, batch)
        for j, i in enumerate(idx):
            chosen[i], rejected[i] = float(c[j]), float(r[j])
    if path is not None:
        write_json(path, {"rows": n, "chosen": chosen, "rejected": rejected})
    facts = ReferenceCache(key=key, hit=False, seconds=round(time.time() - started, 2))
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected), facts


def shared_prompt_rows(input_ids, attention_mask, labels):
    """The packed rows of a DPO batch whose chosen and rejected answers share their prompt, or None.

    TRL's DPO batch is ``[chosen rows; rejected rows]``: row i and row B + i are one pair, each
    ``prompt + answer`` flush left, with labels -100 on the prompt and the padding. Each pair
    becomes one :class:`tempering.scoring.Row`: the prompt once, then both answers as a prefix tree
    (tokens they begin with in common run once). Returns ``(rows, order)``: ``order`` lists, row by
    row of the batch (chosen rows first), ``(pair, request)`` whose targets that row's labels hold
    in order. None when the batch is not laid out that way (an odd size, other padding, prompts
    that differ within a pair, labels not one contiguous answer): the caller runs it unshared."""
    from tempering.scoring import Row

    n = input_ids.shape[0]
    if n == 0 or n % 2:
        return None
    half = n // 2
    ids, am, lab = input_ids.tolist(), attention_mask.tolist(), labels.tolist()
    parts = []
    for r in range(n):
        length = sum(am[r])
        if any(v != 1 for v in am[r][:length]):
            return None  # not flush left
        first = next((k for k in range(length) if lab[r][k] != -100), length)
        if any(lab[r][k] != ids[r][k] for k in range(first, length)) or any(v != -100 for v in lab[r][length:]):
            return None  # the answer is not one contiguous labelled span
        parts.append((ids[r][:first], ids[r][first:length]))
    rows = []
    for i in range(half):
        (prompt, chosen), (other, rejected) = parts[i], parts[half + i]
        if prompt != other or not prompt:
            return None
        row = Row.start(tuple(prompt))
        for request, answer in enumerate((chosen, rejected)):
            if answer:
                row.add(request, answer)
        rows.append(row)
    return rows


def install_shared_prompt_forward(model, output_cls) -> bool:
    """Run each DPO pair's prompt once: on top of the compact head (which must be installed),
    ``model(..., labels=..., fused_lm_head=True)`` packs a ``[chosen; rejected]`` batch into one
    row per pair (:func:`shared_prompt_rows`), the answers attending to the prompt and to their
    own tokens only (a 4D mask, positions restarting after the prompt: ``tempering.scoring``'s
    packed layout, now with gradients), and returns TRL's ``FusedCausalLMOutput`` in the batch's
    own layout. The same log-probs as the unshared forward, up to rounding; fewer tokens by the
    prompt's length per pair. A batch that is not laid out that way, or a model without a
    decoder + LM head that takes 4D masks, keeps the compact head's path. Returns whether installed."""
    import torch

    from tempering.scoring import forward_rows
    from tempering.train.models import causal_lm_parts

    inner = getattr(model, "module", model)
    if hasattr(inner, "peft_config"):
        inner = inner.get_base_model()
    if inner in _SHARED:
        return True
    parts = causal_lm_parts(model)
    if parts is None:
        return False
    if getattr(inner.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    compact = inner.forward

    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        # PEFT passes these through; anything else (images, cached states, ...) keeps the plain path.
        extra = {k for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "use_cache", "return_dict")
                 and not (k in ("inputs_embeds", "output_attentions", "output_hidden_states") and not v)}
        packed = None
        if fused_lm_head and labels is not None and shift_labels is None and not args and not extra \
                and kwargs.get("input_ids") is not None and kwargs.get("attention_mask") is not None:
            packed = shared_prompt_rows(kwargs["input_ids"], kwargs["attention_mask"], labels)
        if packed is not None:
            target = labels[:, 1:]
            picked_targets = target[target != -100]
            half = len(packed)
            order = sorted(range(half), key=lambda i: -len(packed[i].tokens))
            batch = [packed[i] for i in order]
            base, offset = {}, 0
            for b, row in enumerate(batch):
                base[order[b]] = offset
                offset += len(row.heads)
            # The head's inputs in the batch's target order: chosen rows (pairs 0..B-1), then rejected.
            sel, expected = [], []
            for request in (0, 1):
                for i, row in enumerate(packed):
                    for _, slots, answer in (r for r in row.requests if r[0] == request):
                        sel.extend(base[i] + k for k in slots)
                        expected.extend(answer)
            if expected != picked_targets.tolist():
                packed = None  # the labels are not the answers the rows hold: score unshared
        if packed is None:
            if fused_lm_head:
                SHARED_PROMPT_BATCHES["unshared"] += 1
            return compact(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                           num_items_in_batch=num_items_in_batch, **kwargs)
        SHARED_PROMPT_BATCHES["shared"] += 1
        device = kwargs["input_ids"].device
        # The packed forward that scores benchmarks, here with gradients (it sets neither no_grad
        # nor autocast): the heads' hidden states and logits, in the batch's row order.
        _, logits = forward_rows(inner, parts, batch, device=device, pad_id=0)
        logits = logits.float().index_select(0, torch.tensor(sel, device=device, dtype=torch.long))
        return fused_head_output(logits, labels, output_cls, num_items_in_batch)

    inner.forward = forward
    _SHARED.add(inner)
    return True


class TemperingDPOTrainer(TemperingTrainerMixin, DPOTrainer):
    """``DPOTrainer`` stopping on a non-finite loss before the optimizer step.

    Options (keywords): ``stage``, ``checkpoints`` and ``callbacks`` (see
    :class:`~tempering.train.loop.TemperingTrainerMixin`); ``max_prompt_length``: prompts are cut
    to their last ``max_prompt_length`` tokens right after TRL tokenizes them;
    ``ref_cache_key``: TRL's reference-log-prob precompute is replaced by a content-addressed
    cache under this key (see :func:`reference_cache_key`; None: computed, not cached);
    ``compact_head``: :func:`~tempering.train.losses.install_compact_lm_head` on the policy
    before the reference precompute and on both models after construction; ``shared_prompts``
    (with ``compact_head``): :func:`install_shared_prompt_forward` on top of it, each pair's
    prompt run once."""

    def __init__(self, *args, max_prompt_length: int, ref_cache_key: str | None = None,
                 compact_head: bool = False, shared_prompts: bool = False, **kwargs):
        # Set before DPOTrainer.__init__, which prepares the datasets and precomputes the reference.
        self.max_prompt_length = max_prompt_length
        self.ref_cache_key = ref_cache_key
        self.compact_head = compact_head
        self.shared_prompts = shared_prompts
        self.reference_caches: dict[str, ReferenceCache] = {}
        super().__init__(*args, **kwargs)
        if compact_head:
            self._install_heads(self.model)
            if self.ref_model is not None:
                self._install_heads(self.ref_model)

    def _install_heads(self, model) -> None:
        install_compact_lm_head(model, FusedCausalLMOutput)
        if self.shared_prompts:
            install_shared_prompt_forward(model, FusedCausalLMOutput)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        keep = self.max_prompt_length

        # TRL 1.16 has no max_prompt_length: keep the end of long prompts (the latest turns
        # and the generation prompt), then the collator cuts prompt+completion at max_length.
        def _cut(ex):
            prompt = ex["prompt_ids"][-keep:]
            return {"prompt_ids": prompt,
                    "length": len(prompt) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))}

        return dataset.map(_cut)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.compact_head:
            self._install_heads(self.model)
        key = self.ref_cache_key
        if key and name != "train":  # the held-out split has its own reference set
            key = content_id({"key": key, "split": name}, 32)
        dataset, self.reference_caches[name] = attach_reference_logps(self, dataset, key, batch_size)
        return dataset

    def facts(self) -> TrainFacts:
        """The session's timing, and the last reference set computed or read (the held-out one
        when there is one: TRL precomputes it after the training set)."""
        last = list(self.reference_caches.values())[-1] if self.reference_caches else None
        return TrainFacts(timing=self.guard.timing(), ref_logps_cache=asdict(last) if last else None)


def build_dpo_trainer(model, tokenizer, dataset, args, *, adapter, max_prompt_length: int, stage: str,
                      checkpoints: str, live_dir: str | None, tracking, resume_step: int | None = None,
                      ref_cache_key: str | None = None, eval_dataset=None, cfg=None,
                      compact_head: bool | None = None, shared_prompts: bool = True) -> TemperingDPOTrainer:
    """A :class:`TemperingDPOTrainer` for the dpo stage. The reference is the model as passed (the
    SFT result): with LoRA the ``model`` gets a fresh adapter and the reference is the same
    network with the adapter disabled (no second copy); with ``full`` it is the untouched model.
    ``eval_dataset`` (held-out pairs) gets an eval loss at every checkpoint, and
    ``cfg.early_stopping_patience`` stops on it.

    With ``args.precompute_ref_log_probs`` the reference log-probs are computed once before
    training and cached under ``ref_cache_key`` (see :func:`attach_reference_logps`): no
    reference forward during training, and none at all on a later run with the same key. Without
    it LoRA runs the reference forward every step, and ``full`` keeps a frozen copy.
    ``compact_head``: :func:`~tempering.train.losses.install_compact_lm_head` (None = off CUDA
    only, the default; False = TRL's own fused head, for the speed ablation in
    ``bench/bench_train.py``). ``shared_prompts`` (with the compact head): each pair's prompt runs
    once in the policy's forward (:func:`install_shared_prompt_forward`; False for the ablation)."""
    import torch

    callbacks = stage_callbacks(live_dir, tracking, resume_step, cfg)
    config = peft_config(adapter)
    ref_model = None
    if config is None and not args.precompute_ref_log_probs:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    torch.manual_seed(args.seed)
    compact = not str(args.device).startswith("cuda") if compact_head is None else bool(compact_head)
    # (TRL's kernel is compact with Triton, i.e. on GPUs)
    return TemperingDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, peft_config=config, callbacks=callbacks, stage=stage,
        checkpoints=checkpoints, max_prompt_length=max_prompt_length, ref_cache_key=ref_cache_key,
        compact_head=compact, shared_prompts=compact and shared_prompts)
