"""Stage ``evaluate``: lm-eval benchmarks of the exported model, the base and the production model.

    python -m tasks.evaluate --model models/export --base models/base \
        --registry registry --samples eval/samples --metrics metrics/evaluate.json

Each benchmark of ``evaluate.benchmarks`` becomes a local lm-eval YAML task (``dataset_path:
json``, ``output_type: multiple_choice``, acc and acc_norm) run by ``lm_eval.simple_evaluate``
with model ``hf`` (an ``HFLM`` around the loaded model), fully offline. ``chat: true`` benchmarks
go through the model's chat template (the question as a user turn, each choice scored as the
start of the assistant's reply: how the model was tuned). The task files written are part of the
bundle hash, with the data files, so a result always says exactly what it measured.

Three models are scored on the same items: the candidate (``--model``), the base (``--base``) and,
when ``--registry`` holds a ``production`` alias, the current production model (champion /
challenger). Base and production results are cached in ``evaluate.cache_dir`` keyed by (model
hash, lm-eval version, bundle hash, limit): the weekly refresh does not score them again.

Writes ``--metrics`` (per benchmark: role, n, each model's acc/acc_norm and the candidate's delta,
a DVC metric) and ``--samples/<model>/<benchmark>.jsonl`` (per-item correctness, for the gate's
paired statistics), both atomically.
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
from tempering.cli import stage_main
from tempering.config import BenchmarkSpec, EvaluateParams, Params
from tempering.io import (atomic_path, content_id, dump_jsonl, hash_path, read_json, read_jsonl,
                          resolve_model_dir, write_json, write_meta)

TASK_PREFIX = "tempering_"
# Bumped when the task definitions below change meaning (invalidates cached base results).
TASK_VERSION = 1


# ----------------------------------------------------------------------------- the bundle


def check_benchmark_file(spec: BenchmarkSpec) -> int:
    """Validate a benchmark JSONL (``{question, choices, answer}``); returns its row count."""
    path = Path(spec.path)
    if not path.is_file():
        raise TemperingError(f"{path}: benchmark file not found (evaluate.benchmarks: {spec.name})")
    rows = read_jsonl(path)
    if not rows:
        raise TemperingError(f"{path}: benchmark {spec.name} is empty")
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise TemperingError(f"{path}: row {n}: question: expected a non-empty string")
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TemperingError(f"{path}: row {n}: choices: expected a list of at least 2 non-empty strings")
        answer = row.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise TemperingError(f"{path}: row {n}: answer: expected an index into choices (0-{len(choices) - 1})")
    return len(rows)


def task_config(spec: BenchmarkSpec) -> dict:
    """The lm-eval task definition for one benchmark (a local JSON dataset, multiple choice)."""
    return {
        "task": TASK_PREFIX + spec.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(spec.path).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Chat: the bare question is the user turn and the choice starts the assistant's reply.
        # Plain: the classic "Question: ...\nAnswer: <choice>" completion.
        "doc_to_text": "{{question}}" if spec.chat else "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": TASK_VERSION},
    }


def bundle(cfg: EvaluateParams) -> dict:
    """Every benchmark with its data hash and task definition, plus one hash over all of it."""
    if not cfg.benchmarks:
        raise TemperingError("evaluate.benchmarks: no benchmarks configured")
    names = [b.name for b in cfg.benchmarks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TemperingError(f"evaluate.benchmarks: duplicate names {dupes}")
    items = {}
    for spec in cfg.benchmarks:
        n = check_benchmark_file(spec)
        config = task_config(spec)
        portable = dict(config, dataset_kwargs={"data_files": {"test": Path(spec.path).name}})
        items[spec.name] = {"role": spec.role, "chat": spec.chat, "path": spec.path, "rows": n,
                            "n": min(n, cfg.limit) if cfg.limit else n,
                            "data_sha256": hash_path(spec.path), "task": portable}
    return {"hash": content_id({"items": items, "limit": cfg.limit}, 32), "benchmarks": items}


# ----------------------------------------------------------------------------- scoring


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from tempering import backend

    tok = backend.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, tok


def score_model(model_dir: Path, cfg: EvaluateParams, specs: list[BenchmarkSpec]) -> dict:
    """lm-eval on ``model_dir`` for ``specs``: {name: {acc, acc_norm, n, samples: [...]}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tempering import backend

    backend.setup_torch()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    model, tok = _load(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, device="cpu"
              if not _cuda() else "cuda", max_length=cfg.max_length)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tempering-tasks-") as tasks_dir:
        for spec in specs:
            (Path(tasks_dir) / f"{spec.name}.yaml").write_text(yaml.safe_dump(task_config(spec)))
        manager = TaskManager(include_path=tasks_dir, include_defaults=False)
        for chat in (True, False):
            group = [s for s in specs if s.chat == chat]
            if not group:
                continue
            results = lm_eval.simple_evaluate(
                model=lm, tasks=[TASK_PREFIX + s.name for s in group], task_manager=manager,
                limit=cfg.limit, log_samples=True, apply_chat_template=chat, bootstrap_iters=0,
                num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                fewshot_random_seed=0, verbosity="ERROR")
            for spec in group:
                task = TASK_PREFIX + spec.name
                res = results["results"][task]
                samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
                rows = [{"doc_id": s["doc_id"], "id": s["doc"].get("id"), "target": s["target"],
                         "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"])} for s in samples]
                out[spec.name] = {"acc": float(res["acc,none"]), "acc_norm": float(res["acc_norm,none"]),
                                  "n": len(rows), "samples": rows}
    del lm, model
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cached_scores(model_dir: Path, cfg: EvaluateParams, specs: list[BenchmarkSpec], bundle_hash: str,
                  model_hash: str) -> tuple[dict, str]:
    """Scores of a model that does not change (base, production), cached by content."""
    from importlib.metadata import version

    key = content_id({"model": model_hash, "lm_eval": version("lm-eval"), "bundle": bundle_hash,
                      "limit": cfg.limit, "max_length": cfg.max_length, "task_version": TASK_VERSION}, 32)
    path = Path(cfg.cache_dir) / f"{key}.json"
    if path.exists():
        with contextlib.suppress(TemperingError, KeyError, TypeError):
            cached = read_json(path)
            if set(cached["scores"]) == {s.name for s in specs}:
                return cached["scores"], "hit"
    scores = score_model(model_dir, cfg, specs)
    write_json(path, {"model_hash": model_hash, "bundle_hash": bundle_hash, "scores": scores})
    return scores, "miss"


def production_model(registry: str | None, name: str, alias: str) -> Path | None:
    if not registry:
        return None
    from tempering.registry import Registry

    reg = Registry(registry, name)
    if alias not in reg.aliases():
        return None
    return reg.model_path(alias)


# ----------------------------------------------------------------------------- the stage


def run(params: Params, model: str, base: str, samples: str, metrics: str, registry: str | None = None,
        registry_name: str = "tempering-model", alias: str = "production") -> dict:
    started = time.time()
    cfg = params.evaluate
    info = bundle(cfg)
    specs = list(cfg.benchmarks)
    cand_dir, base_dir = resolve_model_dir(model), resolve_model_dir(base)
    for label, folder in (("--model", cand_dir), ("--base", base_dir)):
        if not (folder / "config.json").exists():
            raise TemperingError(f"{folder}: model folder not found ({label}; run the earlier stages)")

    models: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    cand_hash = hash_path(cand_dir)
    scores["candidate"] = score_model(cand_dir, cfg, specs)
    models["candidate"] = {"path": str(model), "hash": cand_hash}
    base_hash = hash_path(base_dir)
    scores["base"], hit = cached_scores(base_dir, cfg, specs, info["hash"], base_hash)
    models["base"] = {"path": str(base), "hash": base_hash, "cache": hit}
    prod_dir = production_model(registry, registry_name, alias)
    if prod_dir is not None:
        prod_hash = hash_path(prod_dir)
        scores["production"], hit = cached_scores(prod_dir, cfg, specs, info["hash"], prod_hash)
        models["production"] = {"path": str(prod_dir), "hash": prod_hash, "cache": hit}

    benchmarks = {}
    for spec in specs:
        entry = {"role": spec.role, "chat": spec.chat, "n": scores["candidate"][spec.name]["n"],
                 "data_sha256": info["benchmarks"][spec.name]["data_sha256"]}
        for who in scores:
            entry[who] = {k: scores[who][spec.name][k] for k in ("acc", "acc_norm")}
        entry["delta"] = {k: entry["candidate"][k] - entry["base"][k] for k in ("acc", "acc_norm")}
        if "production" in scores:
            entry["delta_vs_production"] = {k: entry["candidate"][k] - entry["production"][k]
                                            for k in ("acc", "acc_norm")}
        benchmarks[spec.name] = entry

    with atomic_path(samples) as tmp:
        for who, per_bench in scores.items():
            (tmp / who).mkdir(parents=True)
            for name, res in per_bench.items():
                with open(tmp / who / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                    dump_jsonl(res["samples"], fh)
        write_json(tmp / "bundle.json", info)
    result = {"bundle_hash": info["hash"], "limit": cfg.limit, "models": models, "benchmarks": benchmarks,
              "wall_time_s": round(time.time() - started, 2)}
    write_meta(samples, stage="evaluate", params=cfg, started=started,
               inputs={"candidate": cand_hash, "base": base_hash, "bundle": info["hash"]})
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
    parser.add_argument("--samples", default="eval/samples", help="per-item results folder")
    parser.add_argument("--metrics", default="metrics/evaluate.json")


def main(argv=None) -> int:
    return stage_main("evaluate", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
