"""Stage ``evaluate``: lm-eval benchmarks of the exported model, the base and the production model,
and the drift texts the gate's label-free checks read.

    python -m tasks.evaluate --model models/export --base models/base --registry registry \
        --champion eval/champion.json --dpo models/dpo --samples eval/samples --metrics metrics/evaluate.json

Each benchmark of ``evaluate.benchmarks`` becomes a local lm-eval YAML task (``dataset_path:
json``, ``output_type: multiple_choice``, acc and acc_norm) run by ``lm_eval.simple_evaluate``,
fully offline; ``evaluate.backend`` picks the lm-eval model that computes the log-likelihoods
(``tempering``: tempering/scoring.py, one pass per shared context; ``hf``: lm-eval's HFLM). ``chat: true`` benchmarks go through the model's chat template (the question as a
user turn, each choice scored as the start of the assistant's reply: how the model was tuned).
The task files written are part of the bundle hash, with the data files, so a result always says
exactly what it measured. ``limit: power`` benchmarks get as many items as the gate needs to
certify their forgetting budget (:func:`planned_limits`).

Three models are scored on the same items: the candidate (``--model``), the base (``--base``) and
the current production model (champion / challenger), named by ``--champion`` (the ``champion``
stage's file; a promotion or rollback changes it, so DVC re-runs this stage). Every model's scores
are cached in ``evaluate.cache_dir`` by :func:`scoring_key` (model hash, bundle, scoring code and
library versions, precision, batch size, max length, backend): an unchanged base is scored once,
and production is never re-scored: its per-item results are stored with its registry version
when it is promoted, and reused while they were scored the way this run scores.

The drift texts (``evaluate.drift``) are read by candidate and base together: per text, the
summed KL(candidate || base) and each model's negative log-likelihood (``--samples/drift.jsonl``).

The held-out preference pairs (``--dpo``, the dpo stage's ``heldout.jsonl``: whole prompts DPO
never trained on, with the base's, SFT model's and DPO policy's log-probs) are scored with the
candidate by :func:`tempering.preference.completion_logps`, tokenized, truncated and autocast as
the dpo stage scored them (its ``meta.json`` ``heldout.scoring``); per pair, the candidate's
margin beside the SFT model's goes to ``--samples/alignment.jsonl`` for the gate's ``alignment``
check, and the record's ``alignment`` says how many pairs, or why there are none (DPO did not
train: not applicable; it trained but held nothing out: a problem the gate refuses on).

Writes ``--metrics`` (per benchmark: role, n, each model's acc/acc_norm and the candidate's delta;
the configured list; drift point values; a DVC metric) and ``--samples/<model>/<benchmark>.jsonl``
(per-item correctness, for the gate's paired statistics), both atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path

import yaml

from tempering import TemperingError
from tempering.benchmarks import drift_texts, hellaswag_preprocess, load_items  # noqa: F401 (re-exported)
from tempering.cli import stage_main
from tempering.config import BenchmarkSpec, EvaluateParams, GateParams, Params
from tempering.io import (POINTER_FILE, atomic_path, content_id, dump_jsonl, hash_path, read_json, read_jsonl,
                          resolve_model_dir, write_json, write_meta, write_text)

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = (
    "evaluate",
    "gate.max_forgetting",
    "gate.confidence",
    "gate.power",
    "gate.planning_discordance",
    "gate.multiplicity",
    "gate.max_kl",
    "gate.max_perplexity_ratio",
)

TASK_PREFIX = "tempering_"
# Bumped when the task definitions below change meaning (invalidates cached base results).
# 2: lm-eval's own prompts for the shipped sets (BoolQ without "Passage: ", HellaSwag's
#    preprocess, ARC's padded duplicate choices dropped).
TASK_VERSION = 2
# Bumped when the scoring code changes what a score means (part of every cache key).
# 3: the head's normaliser by an in-place float32 logsumexp; batched greedy generations.
SCORING_VERSION = 3


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
    version. Items a drift text was made from (``evaluate.drift``) are never scored.
    """
    from importlib.metadata import version

    limits = planned_limits(cfg, gate)
    drift_sources = ({str(r.get("source")) for r in drift_texts(cfg)}
                     if cfg.drift.path and Path(cfg.drift.path).is_file() else set())

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


def load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from tempering import backend

    tok = backend.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(_device())
    model.eval()
    return model, tok


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _amp_dtype(cfg: EvaluateParams):
    """bf16 autocast where the hardware computes bf16 natively (AVX512-BF16 CPUs, bf16 GPUs),
    else None (float32). Every model of a run is scored the same way, so paired deltas stay fair."""
    import torch

    from tempering import backend

    if cfg.precision == "fp32":
        return None
    return torch.bfloat16 if backend.choose_precision("auto").bf16 else None


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

        return TemperingLM(**common, batch_tokens=cfg.batch_tokens)
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


def multiple_choice(model, tok, info: dict, cfg: EvaluateParams) -> dict:
    """lm-eval on a loaded model: {name: {acc, acc_norm, n, samples: [per-item rows]}}.

    lm-eval builds the requests, computes acc/acc_norm and logs every item; ``scoring_lm`` picks
    who computes the log-likelihoods (``evaluate.backend``)."""
    lm = scoring_lm(model, tok, cfg)
    out: dict[str, dict] = {}
    for spec, res, samples in run_lm_eval(lm, info):
        rows = [{"doc_id": s["doc_id"], "id": (s.get("doc") or {}).get("id"), "target": s.get("target"),
                 "acc": float(s["acc"]), "acc_norm": float(s.get("acc_norm", s["acc"]))} for s in samples]
        out[spec.name] = {"acc": float(res["acc,none"]),
                          "acc_norm": float(res.get("acc_norm,none", res["acc,none"])),
                          "n": len(rows), "samples": rows}
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


def drift_records(cand, base, tok, rows: list[dict], cfg: EvaluateParams) -> list[dict]:
    """Per text: tokens predicted, summed KL(candidate || base) over the full vocabulary at each
    of them, and each model's summed negative log-likelihood. The gate bootstraps over texts.

    Both models read the same padded batches (sorted by length, ``drift.batch_size`` at a time)
    in one pass each."""
    import torch

    dcfg = cfg.drift
    encoded = [(row, _drift_ids(tok, row, dcfg.max_tokens)) for row in rows]
    encoded = [(row, ids) for row, ids in encoded if len(ids) >= 2]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1]))
    out: dict[int, dict] = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(order), dcfg.batch_size):
        idx = order[start:start + dcfg.batch_size]
        width = max(len(encoded[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            seq = encoded[i][1]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        ids, mask = ids.to(cand.device), mask.to(cand.device)
        with _autocast(cfg):
            lp = torch.log_softmax(cand(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            lq = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        target = ids[:, 1:]
        valid = mask[:, 1:].bool()
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


def score_all(model, tok, info: dict, cfg: EvaluateParams) -> dict:
    return {"mc": multiple_choice(model, tok, info, cfg), "generation": generations(model, tok, info, cfg)}


def scoring_key(cfg: EvaluateParams, info: dict, model_hash: str) -> dict:
    """Everything that changes a model's scores: the model's content (weights, tokenizer and its
    chat template all live in the hashed folder), the bundle (normalized items, task definitions,
    source file hashes), the scoring code and library versions, precision, batch size, max length,
    backend and generation settings. Equal keys mean the per-item results can be reused."""
    from importlib.metadata import version

    return {"model": model_hash, "bundle": info["hash"], "task_version": TASK_VERSION,
            "scoring_version": SCORING_VERSION,
            "versions": {p: version(p) for p in ("torch", "transformers", "lm-eval")},
            "amp": str(_amp_dtype(cfg)), "precision": cfg.precision, "batch_size": cfg.batch_size,
            "max_length": cfg.max_length, "backend": getattr(cfg, "backend", "hf"),
            "batch_tokens": getattr(cfg, "batch_tokens", None),
            "generation": cfg.generation.model_dump(mode="json")}


def _cache_file(cfg: EvaluateParams, key: dict, kind: str = "scores") -> Path:
    return Path(cfg.cache_dir) / f"{kind}-{content_id(key, 32)}.json"


def _read_cached(path: Path, key: dict):
    if not path.exists():
        return None
    with contextlib.suppress(TemperingError, KeyError, TypeError):
        cached = read_json(path)
        if cached["key"] == json.loads(json.dumps(key)):
            return cached["value"]
    return None


def cached_scores(model_dir: Path, cfg: EvaluateParams, info: dict, model_hash: str) -> tuple[dict, str, dict]:
    """Scores of a model, cached per benchmark: (scores, "hit" | "partial" | "miss", key).

    Each benchmark's results are cached under :func:`scoring_key` with that benchmark's own
    definition in place of the bundle hash, so a change to one benchmark re-scores only it; the
    greedy generations under the generation benchmarks' definitions. Every model is cached, the
    candidate too: re-running evaluate after a promotion costs no scoring. ``key`` (with the
    bundle hash) is what the registry stores beside a promoted model's results."""
    key = scoring_key(cfg, info, model_hash)
    hashed = {name: {k: v for k, v in meta.items() if k != "data_file"} for name, meta in info["benchmarks"].items()}

    def bench_key(name: str) -> dict:
        return dict(key, bundle=None, benchmark={"name": name, **hashed[name]})

    gen_key = dict(key, bundle=None, benchmark={n: hashed.get(n) for n in cfg.generation.benchmarks})
    mc = {name: _read_cached(_cache_file(cfg, bench_key(name)), bench_key(name)) for name in info["specs"]}
    gens = _read_cached(_cache_file(cfg, gen_key, "generation"), gen_key)
    missing = [name for name, v in mc.items() if v is None]
    if missing or gens is None:
        model, tok = load_model(model_dir)
        if missing:
            sub = dict(info, specs={n: info["specs"][n] for n in missing})
            for name, value in multiple_choice(model, tok, sub, cfg).items():
                mc[name] = value
                write_json(_cache_file(cfg, bench_key(name)), {"key": bench_key(name), "value": value})
        if gens is None:
            gens = generations(model, tok, info, cfg)
            write_json(_cache_file(cfg, gen_key, "generation"), {"key": gen_key, "value": gens})
        del model
    status = "hit" if not missing else ("miss" if len(missing) == len(mc) else "partial")
    return {"mc": mc, "generation": gens}, status, key


def cached_drift(cand_dir: Path, base_dir: Path, cfg: EvaluateParams, key: dict) -> tuple[list[dict], str]:
    """Per-text drift records of (candidate, base), cached by both scoring keys and the text set."""
    rows = drift_texts(cfg)
    if not rows:
        return [], "off"
    key = dict(key, texts=content_id(rows, 32), drift=cfg.drift.model_dump(mode="json"))
    path = _cache_file(cfg, key, "drift")
    if path.exists():
        with contextlib.suppress(TemperingError, KeyError, TypeError):
            cached = read_json(path)
            if cached["key"] == json.loads(json.dumps(key)):
                return cached["records"], "hit"
    cand, tok = load_model(cand_dir)
    base, _ = load_model(base_dir)
    records = drift_records(cand, base, tok, rows, cfg)
    del cand, base
    write_json(path, {"key": key, "records": records})
    return records, "miss"


def production_model(registry: str | None, name: str, alias: str,
                     champion: str | None = None) -> tuple[str, Path] | None:
    """(version, model folder) of the champion: the version ``--champion`` (the champion stage's
    file) names, else the registry's ``alias`` now; None when there is none."""
    if not registry:
        return None
    from tempering.registry import Registry

    reg = Registry(registry, name)
    if champion:
        version = read_json(champion).get("version")
        if not version:
            return None
        return version, reg.model_path(version)
    if alias not in reg.aliases():
        return None
    version = reg.resolve(alias)
    return version, reg.model_path(version)


def stored_production_scores(registry: str, name: str, version: str, key: dict) -> dict | None:
    """Production's per-item results as stored with its registry version when it was promoted
    (it was the candidate then), when they were scored exactly as this run scores: else None."""
    from tempering.registry import Registry

    reg = Registry(registry, name)
    with contextlib.suppress(TemperingError, KeyError, TypeError, OSError):
        record = reg.record(version)
        stored = ((record.get("metrics") or {}).get("models") or {}).get("candidate") or {}
        if stored.get("score_key") != json.loads(json.dumps(key)):
            return None
        folder = reg.version_dir(version) / "samples" / "candidate"
        mc = {}
        for bench, entry in sorted(record["metrics"]["benchmarks"].items()):
            rows = read_jsonl(folder / f"{bench}.jsonl")
            mc[bench] = {"acc": float(entry["candidate"]["acc"]), "acc_norm": float(entry["candidate"]["acc_norm"]),
                         "n": len(rows), "samples": rows}
        gens = {f.stem[len("generation-"):]: read_json(f) for f in folder.glob("generation-*.json")}
        return {"mc": mc, "generation": gens}
    return None


# ----------------------------------------------------------------------------- alignment


ALIGNMENT_FILE = "alignment.jsonl"


def alignment_source(dpo: str | None) -> dict:
    """What the dpo stage (``--dpo``) left for the gate's alignment check.

    ``{"applicable": False, "reason"}`` when DPO did not train (a pass-through pointer: the
    candidate makes no alignment claim); ``{"applicable": True, "problem"}`` when it trained but
    left no held-out pairs, or when ``--dpo`` was not given (nothing says DPO did not train);
    else ``{"applicable": True, "path", "scoring", "pairs"}``."""
    if not dpo:
        return {"applicable": True, "problem": "evaluate was run without --dpo: no held-out preference pairs"}
    folder = Path(dpo)
    if not folder.is_dir():
        raise TemperingError(f"{folder}: DPO output not found (--dpo; run the dpo stage)")
    meta = read_json(folder / "meta.json") if (folder / "meta.json").exists() else {}
    if (folder / POINTER_FILE).exists() or meta.get("trained") is False:
        return {"applicable": False, "reason": str(meta.get("note") or "the dpo stage passed the SFT model through "
                                                                      "untrained")}
    held = meta.get("heldout") or {}
    if not held.get("file"):
        return {"applicable": True, "problem": str(held.get("reason") or f"{folder}: no held-out preference pairs "
                                                                          "(a dpo output from before the alignment check?)")}
    path = folder / held["file"]
    if not path.is_file():
        raise TemperingError(f"{path}: held-out pairs named by {folder / 'meta.json'} not found (re-run the dpo stage)")
    scoring = held.get("scoring") or {}
    for key in ("max_length", "max_prompt_length", "precision"):
        if scoring.get(key) in (None, ""):
            raise TemperingError(f"{folder / 'meta.json'}: field heldout.scoring.{key}: missing")
    return {"applicable": True, "path": path, "scoring": scoring, "pairs": int(held.get("pairs") or 0)}


def alignment_scores(cand_dir: Path, rows: list[dict], scoring: dict) -> list[dict]:
    """The candidate's log-probs on the held-out pairs, scored as the dpo stage scored the SFT
    model: :func:`tempering.preference.completion_logps` at the dpo stage's lengths and autocast
    precision; each row's token hash says whether the candidate's tokenizer encoded it alike."""
    from tempering import backend, preference

    model, tok = load_model(cand_dir)
    precision = backend.Precision(str(scoring["precision"]), _device(), "as the dpo stage scored the held-out pairs")
    lengths = {"max_length": int(scoring["max_length"]), "max_prompt_length": int(scoring["max_prompt_length"])}
    logps = preference.completion_logps(model, tok, rows, precision=precision, **lengths)
    del model
    return [{"id": row["id"], "chosen": c, "rejected": r,
             "tokens": preference.tokens_id(preference.encode_pair(tok, row, **lengths))}
            for row, (c, r) in zip(rows, logps)]


def cached_alignment(cand_dir: Path, cand_hash: str, source: dict, cfg: EvaluateParams) -> tuple[list[dict], str]:
    """:func:`alignment_scores`, cached by the candidate, the held-out file and the scoring."""
    from importlib.metadata import version

    from tempering import preference

    key = {"model": cand_hash, "pairs": hash_path(source["path"]), "scoring": source["scoring"],
           "version": preference.SCORING_VERSION, "device": _device(),
           "versions": {p: version(p) for p in ("torch", "transformers")}}
    path = _cache_file(cfg, key, "alignment")
    cached = _read_cached(path, key)
    if cached is not None:
        return cached, "hit"
    scores = alignment_scores(cand_dir, preference.read_heldout(source["path"]), source["scoring"])
    write_json(path, {"key": key, "value": scores})
    return scores, "miss"


def alignment_records(heldout: list[dict], scores: list[dict]) -> list[dict]:
    """Per pair, joined by pair id: the candidate's log-probs and margin beside the SFT model's
    (and the base's and DPO policy's) margins from the dpo stage, and whether the pair's tokens
    matched."""
    from tempering.preference import margin

    by_id = {s["id"]: s for s in scores}
    out = []
    for row in heldout:
        cand = by_id.get(row["id"])
        if cand is None:
            raise TemperingError(f"held-out pair {row['id']}: no candidate score (stale alignment cache?)")
        rec = {"id": row["id"], "source": row.get("source"),
               "candidate": {"chosen": cand["chosen"], "rejected": cand["rejected"]},
               "candidate_margin": margin(cand), "tokens_match": cand["tokens"] == row["tokens"]}
        for who, lp in row["logp"].items():
            rec[f"{who}_margin"] = margin(lp)
        out.append(rec)
    return out


def alignment_summary(source: dict, records: list[dict] | None, cache: str | None = None) -> dict:
    """The metrics record's ``alignment``: applicability, or the pairs' accuracies and margins
    (the gate computes the paired test)."""
    from tempering import stats

    if not source["applicable"]:
        return {"applicable": False, "reason": source["reason"]}
    if records is None:
        return {"applicable": True, "pairs": 0, "problem": source["problem"]}
    n = len(records)
    out: dict = {"applicable": True, "pairs": n, "file": ALIGNMENT_FILE, "scoring": source["scoring"],
                 "cache": cache, "problem": None}
    if not n:
        out["problem"] = f"{source['path']}: no held-out pairs in the file"
        return out
    whos = [w for w in ("candidate", "sft", "dpo", "base") if all(f"{w}_margin" in r for r in records)]
    out["accuracy"] = {w: sum(stats.preference_accuracy(r[f"{w}_margin"]) for r in records) / n for w in whos}
    out["margin"] = {w: sum(r[f"{w}_margin"] for r in records) / n for w in whos}
    if "dpo" in whos:  # the candidate is the exported policy: how far export moved it from DPO's
        out["max_abs_margin_vs_dpo"] = max(abs(r["candidate_margin"] - r["dpo_margin"]) for r in records)
    bad = [r["id"] for r in records if not r["tokens_match"]]
    if bad:
        out["problem"] = (f"{len(bad)} of {n} held-out pairs tokenize differently under the candidate's tokenizer "
                          f"than when the SFT margins were scored (first: {bad[0]}): the margins do not pair")
    return out


# ----------------------------------------------------------------------------- the stage


def run(params: Params, model: str, base: str, samples: str, metrics: str, registry: str | None = None,
        registry_name: str = "tempering-model", alias: str = "production", champion: str | None = None,
        dpo: str | None = None) -> dict:
    from tempering import backend

    started = time.time()
    cfg = params.evaluate
    backend.setup_torch()
    info = bundle(cfg, params.gate)
    cand_dir, base_dir = resolve_model_dir(model), resolve_model_dir(base)
    for label, folder in (("--model", cand_dir), ("--base", base_dir)):
        if not (folder / "config.json").exists():
            raise TemperingError(f"{folder}: model folder not found ({label}; run the earlier stages)")

    models: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    timings: dict[str, float] = {}
    cand_hash = hash_path(cand_dir)
    t0 = time.time()
    scores["candidate"], hit, cand_key = cached_scores(cand_dir, cfg, info, cand_hash)
    timings["candidate"] = round(time.time() - t0, 2)
    models["candidate"] = {"path": str(model), "hash": cand_hash, "cache": hit, "score_key": cand_key}
    base_hash = hash_path(base_dir)
    t0 = time.time()
    scores["base"], hit, base_key = cached_scores(base_dir, cfg, info, base_hash)
    timings["base"] = round(time.time() - t0, 2)
    models["base"] = {"path": str(base), "hash": base_hash, "cache": hit}
    prod = production_model(registry, registry_name, alias, champion)
    if prod is not None:
        version, prod_dir = prod
        prod_hash = hash_path(prod_dir)
        key = scoring_key(cfg, info, prod_hash)
        stored = stored_production_scores(registry, registry_name, version, key)
        t0 = time.time()
        if stored is not None and set(stored["mc"]) == set(info["specs"]):
            scores["production"], hit = stored, "registry"
        else:
            scores["production"], hit, _ = cached_scores(prod_dir, cfg, info, prod_hash)
        timings["production"] = round(time.time() - t0, 2)
        models["production"] = {"path": str(prod_dir), "hash": prod_hash, "version": version, "cache": hit}
    t0 = time.time()
    drift, drift_hit = cached_drift(cand_dir, base_dir, cfg, {"candidate": cand_key, "base": base_key})
    timings["drift"] = round(time.time() - t0, 2)
    t0 = time.time()
    align_source = alignment_source(dpo)
    align_rows, align_hit = None, None
    if align_source["applicable"] and "path" in align_source:
        from tempering.preference import read_heldout

        cand_align, align_hit = cached_alignment(cand_dir, cand_hash, align_source, cfg)
        align_rows = alignment_records(read_heldout(align_source["path"]), cand_align)
    timings["alignment"] = round(time.time() - t0, 2)

    benchmarks = {}
    for name, spec in info["specs"].items():
        entry = {"role": spec.role, "chat": spec.chat, "n": scores["candidate"]["mc"][name]["n"],
                 "source": spec.task or spec.path, "format": None if spec.task else spec.format,
                 "items_hash": info["benchmarks"][name].get("items_hash"),
                 "planned_n": info["benchmarks"][name].get("planned_n")}
        for who in scores:
            entry[who] = {k: scores[who]["mc"][name][k] for k in ("acc", "acc_norm")}
        entry["delta"] = {k: entry["candidate"][k] - entry["base"][k] for k in ("acc", "acc_norm")}
        if "production" in scores:
            entry["delta_vs_production"] = {k: entry["candidate"][k] - entry["production"][k]
                                            for k in ("acc", "acc_norm")}
        benchmarks[name] = entry
    gens = {}
    for name in scores["candidate"]["generation"]:
        gens[name] = {who: scores[who]["generation"][name]["match"] for who in scores
                      if name in scores[who]["generation"]}
        gens[name]["n"] = scores["candidate"]["generation"][name]["n"]
        base_by_id = {r["id"]: r["answer"] for r in scores["base"]["generation"].get(name, {}).get("samples", [])}
        gens[name]["examples"] = [dict(r, base_answer=base_by_id.get(r["id"]))
                                  for r in scores["candidate"]["generation"][name]["samples"][: cfg.generation.examples]]

    with atomic_path(samples) as tmp:
        for who, per in scores.items():
            (tmp / who).mkdir(parents=True)
            for name, res in per["mc"].items():
                with open(tmp / who / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                    dump_jsonl(res["samples"], fh)
            for name, res in per["generation"].items():
                with open(tmp / who / f"generation-{name}.json", "w", encoding="utf-8") as fh:
                    json.dump(res, fh, indent=1, ensure_ascii=False)
        if drift:
            with open(tmp / "drift.jsonl", "w", encoding="utf-8") as fh:
                dump_jsonl(drift, fh)
        if align_rows is not None:
            with open(tmp / ALIGNMENT_FILE, "w", encoding="utf-8") as fh:
                dump_jsonl(align_rows, fh)
        write_json(tmp / "bundle.json", {k: v for k, v in info.items() if k != "specs"})
    configured = [{"name": s.name, "role": s.role, "required": s.required} for s in cfg.benchmarks]
    result = {"bundle_hash": info["hash"], "limit": cfg.limit, "models": models, "benchmarks": benchmarks,
              "configured": configured, "skipped": info["skipped"], "generations": gens,
              "drift": dict(drift_summary(drift), cache=drift_hit) if drift else {"texts": 0, "cache": drift_hit},
              "alignment": alignment_summary(align_source, align_rows, align_hit),
              "timings_s": timings, "wall_time_s": round(time.time() - started, 2)}
    write_meta(samples, stage="evaluate", params=cfg, started=started,
               inputs={"candidate": cand_hash, "base": base_hash, "bundle": info["hash"],
                       **({"heldout": hash_path(align_source["path"])} if "path" in align_source else {})})
    write_json(metrics, result)
    return {name: {"role": b["role"], "base": b["base"]["acc"], "candidate": b["candidate"]["acc"],
                   **({"production": b["production"]["acc"]} if "production" in b else {})}
            for name, b in benchmarks.items()}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/export", help="exported candidate model folder")
    parser.add_argument("--base", default="models/base", help="base model folder")
    parser.add_argument("--registry", default=None,
                        help="model registry folder: also score its production model (champion)")
    parser.add_argument("--registry-name", default="tempering-model", help="model name in the registry")
    parser.add_argument("--alias", default="production", help="registry alias of the champion")
    parser.add_argument("--champion", default=None,
                        help="the champion stage's file (eval/champion.json): score the version it names")
    parser.add_argument("--samples", default="eval/samples", help="per-item results folder")
    parser.add_argument("--metrics", default="metrics/evaluate.json")
    parser.add_argument("--dpo", default=None,
                        help="the dpo stage's output (models/dpo): score the candidate on its held-out pairs")


def main(argv=None) -> int:
    return stage_main("evaluate", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
