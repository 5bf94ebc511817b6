"""Scoring a model on the benchmark bundle: the library under ``tasks.evaluate`` and the export sweep.

Owns what a score means, for every stage that scores:

- :func:`bundle`: each benchmark of ``evaluate.benchmarks`` (or any list of specs) normalized,
  cut to its planned size (:func:`planned_limits`, ``limit: power`` from the gate's own rule) and
  hashed, with the local lm-eval YAML task (:func:`task_config`) that scores it;
- :func:`multiple_choice`: lm-eval on a loaded model, with ``evaluate.backend`` computing the
  log-likelihoods (:func:`scoring_lm`: tempering/scoring.py's shared-context scorer or lm-eval's
  HFLM), per-item rows for the gate's paired statistics;
- :func:`generations`: greedy chat answers scored by the first choice they name;
- :func:`drift_records` / :func:`drift_summary`: per-text KL(candidate || base) over the full
  vocabulary and both models' log-likelihood on the drift texts;
- :func:`load_model` and the autocast policy (``evaluate.precision``), the same for every model of
  a run so paired deltas stay fair.

``tasks.evaluate`` (the stage: caching, the three models, the samples folder) and
``tasks.export`` (the interpolation sweep on the dev split, :mod:`tempering.interpolate`) both
score through here, so a dev-split number and a gate number mean the same thing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import yaml

from tempering import TemperingError
from tempering.benchmarks import drift_sources as benchmarks_drift_sources
from tempering.benchmarks import load_items
from tempering.config import BenchmarkSpec, EvaluateParams, GateParams
from tempering.io import content_id, hash_path, read_jsonl, write_text

TASK_PREFIX = "tempering_"
# Bumped when the task definitions below change meaning (invalidates cached base results).
# 2: lm-eval's own prompts for the shipped sets (BoolQ without "Passage: ", HellaSwag's
#    preprocess, ARC's padded duplicate choices dropped).
TASK_VERSION = 2
# Bumped when the scoring code changes what a score means (part of every cache key).
# 3: the head's normaliser by an in-place float32 logsumexp; batched greedy generations.
# 4: tempering re-scores bf16 near-ties in float32 (evaluate.rescore_tolerance).
# 5: the near-tie bound grows with sqrt(continuation tokens) (rescore_tolerance is per one token).
SCORING_VERSION = 5


# ----------------------------------------------------------------------------- the bundle


def task_config(spec: BenchmarkSpec, data_file: str | Path) -> dict:
    """The lm-eval task definition for one local benchmark (normalized JSON lines, multiple choice)."""
    return {
        "task": TASK_PREFIX + spec.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Chat: the bare question is the user turn and the choice starts the assistant's reply
        # (lm-eval drops the delimiter under a chat template). Plain: lm-eval's own prompt.
        "doc_to_text": "{{question}}" if spec.chat else "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": TASK_VERSION},
    }


def planned_limits(cfg: EvaluateParams, gate: GateParams | None) -> dict[str, int | None]:
    """Each benchmark's item count: its ``limit``, or for ``limit: power`` the count the gate
    needs to certify its forgetting budget (the gate's own rule, :mod:`tempering.stats`), capped by
    ``evaluate.limit``."""
    from tempering import stats

    gate = gate or GateParams()
    general = sum(1 for s in cfg.benchmarks if s.role == "general")
    drift = sum(x is not None for x in (gate.max_kl, gate.max_perplexity_ratio)) if cfg.drift.path else 0
    out: dict[str, int | None] = {}
    for spec in cfg.benchmarks:
        limit = spec.limit
        if limit == "power":
            budget = gate.max_forgetting.get(spec.name, gate.max_forgetting.get("default"))
            if budget is None:
                raise TemperingError(f"evaluate.benchmarks: {spec.name}: limit power needs a forgetting budget "
                                     f"(gate.max_forgetting.{spec.name} or default)")
            alpha = stats.planning_alpha(gate.confidence, gate.multiplicity, general + drift)
            limit = stats.required_items(budget, gate.planning_discordance, alpha, gate.power)
        if cfg.limit:
            limit = min(limit, cfg.limit) if limit else cfg.limit
        out[spec.name] = limit
    return out


def bundle(cfg: EvaluateParams, gate: GateParams | None = None) -> dict:
    """Every benchmark, normalized and hashed, with its task definition; one hash over all of it.

    Local files are normalized into ``<cache_dir>/data/<hash>.jsonl`` (content-addressed, cut to
    the benchmark's limit: :func:`planned_limits`); hub tasks are recorded by name and lm-eval
    version. Items a drift text was made from (``evaluate.drift`` or ``evaluate.dev.drift``) are
    never scored.
    """
    from importlib.metadata import version

    limits = planned_limits(cfg, gate)
    drift_sources = benchmarks_drift_sources(cfg)

    if not cfg.benchmarks:
        raise TemperingError("evaluate.benchmarks: no benchmarks configured")
    names = [b.name for b in cfg.benchmarks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TemperingError(f"evaluate.benchmarks: duplicate names {dupes}")
    items, specs, skipped = {}, {}, {}
    for spec in cfg.benchmarks:
        limit = limits[spec.name]
        if spec.task:
            items[spec.name] = {"role": spec.role, "chat": spec.chat, "task": spec.task, "limit": limit,
                                "lm_eval": version("lm-eval")}
            specs[spec.name] = spec
            continue
        if spec.optional and not Path(spec.path).exists():
            skipped[spec.name] = f"{spec.path}: not on this machine (optional)"
            continue
        rows = load_items(spec)
        rows = [r for r in rows if f"{spec.name}:{r['id']}" not in drift_sources]
        kept = rows[:limit] if limit else rows
        blob = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in kept)
        digest = content_id(blob, 32)
        data_file = Path(cfg.cache_dir).resolve() / "data" / f"{digest}.jsonl"
        if not data_file.exists():
            write_text(data_file, blob)
        config = task_config(spec, data_file)
        portable = dict(config, dataset_kwargs={"data_files": {"test": f"{digest}.jsonl"}})
        items[spec.name] = {"role": spec.role, "chat": spec.chat, "path": spec.path, "format": spec.format,
                            "rows": len(rows), "n": len(kept), "data_sha256": hash_path(spec.path),
                            "items_hash": digest, "task": portable, "data_file": str(data_file),
                            "planned_n": limit}
        specs[spec.name] = spec
    if not specs:
        raise TemperingError("evaluate.benchmarks: every benchmark was skipped (" + "; ".join(skipped.values()) + ")")
    hashed = {k: {kk: vv for kk, vv in v.items() if kk != "data_file"} for k, v in items.items()}
    return {"hash": content_id({"items": hashed, "task_version": TASK_VERSION}, 32), "benchmarks": items,
            "skipped": skipped, "specs": specs}


# ----------------------------------------------------------------------------- scoring


def load_model(model_dir: Path, attention: str = "auto"):
    """(model, tokenizer) in float32 on the scoring device, with ``evaluate.attention``'s kernel
    (:func:`tempering.train.models.load_for_inference`)."""
    from tempering.train.models import load_for_inference

    return load_for_inference(model_dir, _device(), attention)


def attention_kernel(cfg: EvaluateParams) -> str:
    """The attention kernel ``evaluate.attention`` gives a scored model here (in the score caches'
    keys: kernels round differently)."""
    from tempering.train.models import attention_implementation

    return attention_implementation(cfg.attention, _device(), training=False) or "default"


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _amp_dtype(cfg: EvaluateParams):
    """bf16 autocast where the hardware computes bf16 natively (AVX512-BF16 CPUs, bf16 GPUs),
    else None (float32). Every model of a run is scored the same way, so paired deltas stay fair."""
    import torch

    from tempering.train.precision import choose_precision

    if cfg.precision == "fp32":
        return None
    return torch.bfloat16 if choose_precision("auto").bf16 else None


@contextlib.contextmanager
def _autocast(cfg: EvaluateParams):
    import torch

    dtype = _amp_dtype(cfg)
    with torch.no_grad(), torch.autocast(device_type=_device(), dtype=dtype or torch.float32,
                                         enabled=dtype is not None):
        yield


def scoring_lm(model, tok, cfg: EvaluateParams):
    """The lm-eval model that scores a loaded model: ``evaluate.backend`` tempering (lm-eval's
    HFLM with tempering/scoring.py's shared-context scorer) or hf (lm-eval's own HFLM). Both:
    same autocast dtype (``_amp_dtype``), float32 log-softmax, progress bars quiet under CI."""
    import torch

    from tempering import env

    amp = _amp_dtype(cfg)
    common = dict(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, device=_device(),
                  max_length=cfg.max_length, mixed_precision_dtype=amp,
                  softmax_dtype=torch.float32 if amp is not None else None)
    if cfg.backend == "tempering":
        from tempering.scoring import TemperingLM

        return TemperingLM(**common, batch_tokens=cfg.batch_tokens, rescore_tolerance=cfg.rescore_tolerance)
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        # lm-eval passes disable=False to its progress bars explicitly, overriding TQDM_DISABLE:
        # quiet them ourselves under CI, keep them for people.
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or env.is_ci())

    return _HFLM(**common)


def run_lm_eval(lm, info: dict):
    """``lm_eval.simple_evaluate`` over every benchmark of the bundle with the lm-eval model ``lm``:
    yields (spec, the task's aggregate results, its logged samples sorted by doc_id)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    specs: dict[str, BenchmarkSpec] = info["specs"]
    with tempfile.TemporaryDirectory(prefix="tempering-tasks-") as tasks_dir:
        local = [s for s in specs.values() if s.task is None]
        hub = [s for s in specs.values() if s.task is not None]
        for spec in local:
            data_file = info["benchmarks"][spec.name]["data_file"]
            (Path(tasks_dir) / f"{spec.name}.yaml").write_text(yaml.safe_dump(task_config(spec, data_file)))
        manager = TaskManager(include_path=tasks_dir, include_defaults=bool(hub))
        groups = [([s for s in local if s.chat == chat], chat, None) for chat in (True, False)]
        groups += [([s], s.chat, info["benchmarks"][s.name]["limit"]) for s in hub]
        for group, chat, limit in groups:
            if not group:
                continue
            names = {(s.task or TASK_PREFIX + s.name): s for s in group}
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(names), task_manager=manager, limit=limit, log_samples=True,
                apply_chat_template=chat, bootstrap_iters=0, num_fewshot=0 if not hub else None,
                random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                verbosity="ERROR")
            for task, spec in names.items():
                res = results["results"].get(task)
                if res is None or "acc,none" not in res:
                    raise TemperingError(f"evaluate.benchmarks: {spec.name}: lm-eval task {task} "
                                         "reported no acc (a group of tasks? name one task)")
                yield spec, res, sorted(results["samples"].get(task, []), key=lambda s: s["doc_id"])


def multiple_choice(model, tok, info: dict, cfg: EvaluateParams, stats: dict | None = None) -> dict:
    """lm-eval on a loaded model: {name: {acc, acc_norm, n, samples: [per-item rows]}}.

    lm-eval builds the requests, computes acc/acc_norm and logs every item; ``scoring_lm`` picks
    who computes the log-likelihoods (``evaluate.backend``). ``stats``, when given, receives what
    the tempering scorer did (:class:`tempering.scoring.Stats`: requests, forwards, tokens, the
    near-ties re-scored in float32 and their seconds)."""
    lm = scoring_lm(model, tok, cfg)
    out: dict[str, dict] = {}
    for spec, res, samples in run_lm_eval(lm, info):
        rows = [{"doc_id": s["doc_id"], "id": (s.get("doc") or {}).get("id"), "target": s.get("target"),
                 "acc": float(s["acc"]), "acc_norm": float(s.get("acc_norm", s["acc"]))} for s in samples]
        out[spec.name] = {"acc": float(res["acc,none"]),
                          "acc_norm": float(res.get("acc_norm,none", res["acc,none"])),
                          "n": len(rows), "samples": rows}
    if stats is not None and hasattr(lm, "stats"):
        stats.update({k: round(v, 2) if isinstance(v, float) else v for k, v in lm.stats.as_dict().items()})
    del lm
    return out


def _first_named(text: str, choices: list[str]) -> int | None:
    """Index of the choice the text names first (whole words, case-insensitive), or None."""
    import re

    best, where = None, None
    for i, choice in enumerate(choices):
        m = re.search(r"(?<!\w)" + re.escape(choice.strip().lower()) + r"(?!\w)", text.lower())
        if m and (where is None or m.start() < where or (m.start() == where and len(choice) > len(choices[best]))):
            best, where = i, m.start()
    return best


def generations(model, tok, info: dict, cfg: EvaluateParams) -> dict:
    """Greedy chat answers to benchmark questions; ``match`` = the first choice named is right.

    All of a benchmark's questions go through one left-padded ``generate`` call (greedy decoding
    of a left-padded batch gives each row the tokens it gets alone, up to float rounding)."""
    gcfg = cfg.generation
    out = {}
    if not gcfg.n:
        return out
    for name in gcfg.benchmarks:
        meta = info["benchmarks"].get(name)
        if meta is None or "data_file" not in meta:
            continue
        rows = read_jsonl(meta["data_file"])[: gcfg.n]
        if not rows:
            continue
        texts = [tok.apply_chat_template([{"role": "user", "content": row["question"]}], add_generation_prompt=True,
                                         tokenize=False) for row in rows]
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with _autocast(cfg):
            gen = model.generate(**enc, max_new_tokens=gcfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        results = []
        for row, ids in zip(rows, gen[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            named = _first_named(text, row["choices"])
            results.append({"id": row["id"], "question": row["question"], "answer": text,
                            "expected": row["choices"][row["answer"]], "match": float(named == row["answer"])})
        out[name] = {"match": sum(r["match"] for r in results) / len(results), "n": len(results),
                     "samples": results}
    return out


def _drift_ids(tok, row: dict, max_tokens: int) -> list[int]:
    if row["kind"] == "chat":
        ids = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(row["text"], add_special_tokens=False)["input_ids"]
    return list(ids)[-max_tokens:]


def _drift_batches(tok, rows: list[dict], cfg: EvaluateParams):
    """(encoded rows, [(row indices, ids, mask)]): padded batches sorted by length, the same for
    every model, so per-batch results of two models line up."""
    import torch

    dcfg = cfg.drift
    encoded = [(row, _drift_ids(tok, row, dcfg.max_tokens)) for row in rows]
    encoded = [(row, ids) for row, ids in encoded if len(ids) >= 2]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for start in range(0, len(order), dcfg.batch_size):
        idx = order[start:start + dcfg.batch_size]
        width = max(len(encoded[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            seq = encoded[i][1]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        out.append((idx, ids, mask))
    return encoded, out


def _drift_logprobs(model, ids, mask, cfg: EvaluateParams):
    """Float32 log-probs over the full vocabulary at every predicting position, [B, T-1, V]."""
    import torch

    ids, mask = ids.to(model.device), mask.to(model.device)
    with _autocast(cfg):
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)


def base_logprobs(base, tok, rows: list[dict], cfg: EvaluateParams) -> list:
    """The base model's drift log-probs, once, for :func:`drift_records` to compare several
    candidates against (the export sweep): one float32 [B, T-1, V] tensor per batch. Memory:
    tokens x vocabulary x 4 bytes (64 texts of ~70 tokens, 49k vocabulary: ~0.9 GB)."""
    _, batches_ = _drift_batches(tok, rows, cfg)
    return [_drift_logprobs(base, ids, mask, cfg).cpu() for _, ids, mask in batches_]


def drift_records(cand, base, tok, rows: list[dict], cfg: EvaluateParams) -> list[dict]:
    """Per text: tokens predicted, summed KL(candidate || base) over the full vocabulary at each
    of them, and each model's summed negative log-likelihood. The gate bootstraps over texts.

    Both models read the same padded batches (sorted by length, ``drift.batch_size`` at a time)
    in one pass each. ``base`` is a model, or :func:`base_logprobs` of the same rows."""
    encoded, batches_ = _drift_batches(tok, rows, cfg)
    cached = base if isinstance(base, list) else None
    if cached is not None and len(cached) != len(batches_):
        raise TemperingError("drift_records: the cached base log-probs are for other texts")
    out: dict[int, dict] = {}
    for b, (idx, ids, mask) in enumerate(batches_):
        lp = _drift_logprobs(cand, ids, mask, cfg)
        lq = cached[b].to(lp.device) if cached is not None else _drift_logprobs(base, ids, mask, cfg)
        target = ids[:, 1:].to(lp.device)
        valid = mask[:, 1:].bool().to(lp.device)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        nll_c = -lp.gather(-1, target[..., None])[..., 0]
        nll_b = -lq.gather(-1, target[..., None])[..., 0]
        for r, i in enumerate(idx):
            v = valid[r]
            row = encoded[i][0]
            out[i] = {"id": row.get("id", str(i)), "kind": row["kind"], "tokens": int(v.sum()),
                      "kl": float(kl[r][v].sum()), "nll_candidate": float(nll_c[r][v].sum()),
                      "nll_base": float(nll_b[r][v].sum())}
        del lp, lq, kl
    return [out[i] for i in range(len(encoded))]


def drift_summary(records: list[dict]) -> dict:
    """Point values for the metrics file and the report (the gate computes the intervals)."""
    import math

    out: dict = {"texts": len(records)}
    for kind in ("all", "text", "chat"):
        rows = [r for r in records if kind == "all" or r["kind"] == kind]
        tokens = sum(r["tokens"] for r in rows)
        if not tokens:
            continue
        key = "" if kind == "all" else f"_{kind}"
        out[f"kl{key}"] = sum(r["kl"] for r in rows) / tokens
        out[f"perplexity_candidate{key}"] = math.exp(sum(r["nll_candidate"] for r in rows) / tokens)
        out[f"perplexity_base{key}"] = math.exp(sum(r["nll_base"] for r in rows) / tokens)
        out[f"perplexity_ratio{key}"] = out[f"perplexity_candidate{key}"] / out[f"perplexity_base{key}"]
        out[f"tokens{key}"] = tokens
    return out


# ----------------------------------------------------------------------------- held-out SFT rows
# (dedup.sft_heldout; the per-row file and its summary: tempering/sft_heldout.py)


def _heldout_encode(tok, row: dict, max_length: int) -> tuple[list[int], list[int]]:
    from tempering.train.data import tokenize_conversation

    enc = tokenize_conversation(tok, row["messages"], max_length=max_length)
    return enc["input_ids"], enc["labels"]


def heldout_encoded(tok, rows: list[dict], max_length: int) -> list[tuple[dict, list[int], list[int]]]:
    """(row, ids, labels) for every row with at least one answer token left after truncation."""
    out = []
    for row in rows:
        try:
            ids, labels = _heldout_encode(tok, row, max_length)
        except ValueError as exc:
            raise TemperingError(f"held-out SFT row {row.get('id')}: field messages: {exc}") from None
        if any(x != -100 for x in labels[1:]):
            out.append((row, ids, labels))
    return out


def heldout_nll(model, tok, rows: list[dict], *, max_length: int, batch_size: int, cfg: EvaluateParams) -> list[dict]:
    """Per row: answer tokens scored and their summed negative log-likelihood under ``model``
    (float32 log-softmax at the answer positions only). Rows with no answer token left after
    ``max_length`` are skipped (the record's ``skipped`` says how many). Autocast as every other
    score of the run (``evaluate.precision``)."""
    import torch

    enc = heldout_encoded(tok, rows, max_length)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][1]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: dict[int, dict] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(enc[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            _, seq, lab = enc[i]
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(seq)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with _autocast(cfg):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        sel = target != -100
        lp = torch.log_softmax(logits[sel].float(), -1)
        nll = -lp.gather(-1, target[sel][:, None])[:, 0]
        rows_of = sel.nonzero()[:, 0]
        sums = torch.zeros(len(idx), dtype=torch.float64, device=nll.device).index_add_(0, rows_of, nll.double())
        counts = sel.sum(-1)
        for r, i in enumerate(idx):
            row = enc[i][0]
            out[i] = {"id": row.get("id", str(i)), "source": row.get("source"), "tokens": int(counts[r]),
                      "nll": float(sums[r])}
        del logits, lp
    return [out[i] for i in range(len(enc))]


def heldout_generations(model, tok, rows: list[dict], *, n: int, max_new_tokens: int, cfg: EvaluateParams) -> list[dict]:
    """Greedy answers to the first ``n`` held-out prompts (the conversation up to its last
    assistant turn), beside the reference answer: for the report, not for the gate."""
    out = []
    for row in rows[:n]:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        prompt_ids = tok.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
        import torch

        ids = torch.tensor([list(prompt_ids)], device=next(model.parameters()).device)
        with _autocast(cfg):
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        prompt = next((m["content"] for m in reversed(messages[:last]) if m.get("role") == "user"), "")
        out.append({"id": row.get("id"), "prompt": prompt, "reference": messages[last]["content"],
                    "answer": tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()})
    return out


def score_all(model, tok, info: dict, cfg: EvaluateParams) -> dict:
    return {"mc": multiple_choice(model, tok, info, cfg), "generation": generations(model, tok, info, cfg)}
