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
                          resolve_model_dir, write_json, write_meta, write_text)

TASK_PREFIX = "tempering_"
# Bumped when the task definitions below change meaning (invalidates cached base results).
TASK_VERSION = 1
# Perplexity and KL look at the last this-many tokens of a text (the answer and what precedes
# it): long passages (BoolQ) would otherwise dominate the signals' cost.
SIGNAL_TOKENS = 256


# ----------------------------------------------------------------------------- the bundle


def _open_lines(path: Path) -> list[str]:
    import gzip

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read().splitlines()
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TemperingError(f"{path}: cannot read benchmark file ({type(exc).__name__}: {exc})") from None


def _json_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(_open_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TemperingError(f"{path}: row {n}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise TemperingError(f"{path}: row {n}: expected a JSON object")
        rows.append(row)
    return rows


def load_items(spec: BenchmarkSpec) -> list[dict]:
    """A benchmark file in any supported layout -> ``{id, question, prompt, choices, answer}`` rows.

    ``question`` is the chat form (a user turn); ``prompt`` the plain-completion form, as lm-eval
    writes it for the standard benchmarks (``Question: ...\nAnswer:``; HellaSwag's context alone).
    """
    path = Path(spec.path)
    if not path.is_file():
        raise TemperingError(f"{path}: benchmark file not found (evaluate.benchmarks: {spec.name})")
    raw = _json_rows(path)
    if spec.format == "piqa":
        labels = [ln.strip() for ln in _open_lines(Path(spec.labels)) if ln.strip()]
        if len(labels) != len(raw):
            raise TemperingError(f"{spec.labels}: {len(labels)} labels for {len(raw)} rows of {path}")
    items = []
    for n, row in enumerate(raw, 1):
        try:
            if spec.format == "tempering":
                question, choices, answer = row["question"], row["choices"], row["answer"]
                prompt = f"Question: {question}\nAnswer:"
            elif spec.format == "llmfoundry":
                query, choices, answer = row["query"], row["choices"], row["gold"]
                question = query[len("Question: "):] if query.startswith("Question: ") else query
                prompt = f"{query}\nAnswer:"
            elif spec.format == "hellaswag":
                question = prompt = row["query"]
                choices, answer = row["endings"], row["label"]
            else:  # piqa
                question, choices = row["goal"], [row["sol1"], row["sol2"]]
                answer = int(labels[n - 1])
                prompt = f"Question: {question}\nAnswer:"
        except KeyError as exc:
            raise TemperingError(f"{path}: row {n}: {exc.args[0]}: missing field (format {spec.format})") from None
        except ValueError:
            raise TemperingError(f"{spec.labels}: row {n}: label: expected 0 or 1") from None
        if not isinstance(question, str) or not question.strip():
            raise TemperingError(f"{path}: row {n}: question: expected a non-empty string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TemperingError(f"{path}: row {n}: choices: expected a list of at least 2 non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise TemperingError(f"{path}: row {n}: answer: expected an index into choices (0-{len(choices) - 1})")
        items.append({"id": str(row.get("id", row.get("ind", n - 1))), "question": question, "prompt": prompt,
                      "choices": choices, "answer": answer})
    if not items:
        raise TemperingError(f"{path}: benchmark {spec.name} is empty")
    return items


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


def bundle(cfg: EvaluateParams) -> dict:
    """Every benchmark, normalized and hashed, with its task definition; one hash over all of it.

    Local files are normalized into ``<cache_dir>/data/<hash>.jsonl`` (content-addressed, cut to
    the benchmark's limit); hub tasks are recorded by name and lm-eval version.
    """
    from importlib.metadata import version

    if not cfg.benchmarks:
        raise TemperingError("evaluate.benchmarks: no benchmarks configured")
    names = [b.name for b in cfg.benchmarks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TemperingError(f"evaluate.benchmarks: duplicate names {dupes}")
    items, specs, skipped = {}, {}, {}
    for spec in cfg.benchmarks:
        limit = spec.limit or cfg.limit
        if spec.task:
            items[spec.name] = {"role": spec.role, "chat": spec.chat, "task": spec.task, "limit": limit,
                                "lm_eval": version("lm-eval")}
            specs[spec.name] = spec
            continue
        if spec.optional and not Path(spec.path).exists():
            skipped[spec.name] = f"{spec.path}: not on this machine (optional)"
            continue
        rows = load_items(spec)
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
                            "items_hash": digest, "task": portable, "data_file": str(data_file)}
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


def multiple_choice(model, tok, info: dict, cfg: EvaluateParams) -> dict:
    """lm-eval on a loaded model: {name: {acc, acc_norm, n, samples: [per-item rows]}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tempering import env

    class _HFLM(HFLM):
        # lm-eval passes disable=False to its progress bars explicitly, overriding TQDM_DISABLE:
        # quiet them ourselves under CI, keep them for people.
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or env.is_ci())

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    import torch

    amp = _amp_dtype(cfg)
    lm = _HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, device=_device(),
               max_length=cfg.max_length, mixed_precision_dtype=amp,
               softmax_dtype=torch.float32 if amp is not None else None)
    specs: dict[str, BenchmarkSpec] = info["specs"]
    out: dict[str, dict] = {}
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
                samples = sorted(results["samples"].get(task, []), key=lambda s: s["doc_id"])
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
    """Greedy chat answers to benchmark questions; ``match`` = the first choice named is right."""
    import torch

    gcfg = cfg.generation
    out = {}
    if not gcfg.n:
        return out
    for name in gcfg.benchmarks:
        meta = info["benchmarks"].get(name)
        if meta is None or "data_file" not in meta:
            continue
        rows = read_jsonl(meta["data_file"])[: gcfg.n]
        results = []
        for row in rows:
            enc = tok.apply_chat_template([{"role": "user", "content": row["question"]}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with _autocast(cfg):
                gen = model.generate(**enc, max_new_tokens=gcfg.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            named = _first_named(text, row["choices"])
            results.append({"id": row["id"], "question": row["question"], "answer": text,
                            "expected": row["choices"][row["answer"]], "match": float(named == row["answer"])})
        if results:
            out[name] = {"match": sum(r["match"] for r in results) / len(results), "n": len(results),
                         "samples": results}
    return out


def _texts(info: dict, role: str | None, chat: bool, n: int) -> dict[str, list]:
    """Question + right answer of the first ``n`` items of each (local) benchmark."""
    out = {}
    for name, meta in info["benchmarks"].items():
        if "data_file" not in meta or (role and meta["role"] != role):
            continue
        rows = read_jsonl(meta["data_file"])[:n]
        if chat:
            out[name] = [[{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["choices"][r["answer"]]}] for r in rows]
        else:
            out[name] = [f"{r['prompt']} {r['choices'][r['answer']]}" for r in rows]
    return out


def perplexity(model, tok, info: dict, cfg: EvaluateParams) -> dict:
    """Perplexity of "prompt + right answer" (plain text) on each local benchmark."""
    import math

    import torch

    out = {}
    if not cfg.signals.n_texts:
        return out
    for name, texts in _texts(info, None, False, cfg.signals.n_texts).items():
        nll, count = 0.0, 0
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, -SIGNAL_TOKENS:]
            ids = ids.to(model.device)
            if ids.shape[1] < 2:
                continue
            with _autocast(cfg):
                logits = model(ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
        if count:
            out[name] = {"perplexity": math.exp(nll / count), "tokens": count}
    return out


def mean_kl(cand, base, tok, info: dict, cfg: EvaluateParams) -> dict:
    """Mean per-token KL(candidate || base) over chat-formatted general items."""
    import torch

    out = {}
    if not cfg.signals.n_texts:
        return out
    for name, convs in _texts(info, "general", True, cfg.signals.n_texts).items():
        total, count = 0.0, 0
        for conv in convs:
            ids = tok.apply_chat_template(conv, return_tensors="pt", return_dict=True)["input_ids"]
            ids = ids[:, -SIGNAL_TOKENS:].to(cand.device)
            with _autocast(cfg):
                lp = torch.log_softmax(cand(ids).logits[0].float(), -1)
                lq = torch.log_softmax(base(ids).logits[0].float(), -1)
            total += (lp.exp() * (lp - lq)).sum(-1).sum().item()
            count += ids.shape[1]
        if count:
            out[name] = {"kl": total / count, "tokens": count}
    return out


def score_all(model, tok, info: dict, cfg: EvaluateParams) -> dict:
    return {"mc": multiple_choice(model, tok, info, cfg), "generation": generations(model, tok, info, cfg),
            "perplexity": perplexity(model, tok, info, cfg)}


def cached_scores(model_dir: Path, cfg: EvaluateParams, info: dict, model_hash: str) -> tuple[dict, str]:
    """Scores of a model that does not change (base, production), cached by content."""
    from importlib.metadata import version

    key = content_id({"model": model_hash, "lm_eval": version("lm-eval"), "bundle": info["hash"],
                      "max_length": cfg.max_length, "generation": cfg.generation.model_dump(),
                      "signals": cfg.signals.model_dump(), "task_version": TASK_VERSION,
                      "amp": str(_amp_dtype(cfg))}, 32)
    path = Path(cfg.cache_dir) / f"{key}.json"
    if path.exists():
        with contextlib.suppress(TemperingError, KeyError, TypeError):
            cached = read_json(path)
            if set(cached["scores"]["mc"]) == set(info["specs"]):
                return cached["scores"], "hit"
    model, tok = load_model(model_dir)
    scores = score_all(model, tok, info, cfg)
    del model
    write_json(path, {"model_hash": model_hash, "bundle_hash": info["hash"], "scores": scores})
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
    from tempering import backend

    started = time.time()
    cfg = params.evaluate
    backend.setup_torch()
    info = bundle(cfg)
    cand_dir, base_dir = resolve_model_dir(model), resolve_model_dir(base)
    for label, folder in (("--model", cand_dir), ("--base", base_dir)):
        if not (folder / "config.json").exists():
            raise TemperingError(f"{folder}: model folder not found ({label}; run the earlier stages)")

    models: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    cand_hash = hash_path(cand_dir)
    cand_model, tok = load_model(cand_dir)
    scores["candidate"] = score_all(cand_model, tok, info, cfg)
    models["candidate"] = {"path": str(model), "hash": cand_hash}
    base_hash = hash_path(base_dir)
    scores["base"], hit = cached_scores(base_dir, cfg, info, base_hash)
    models["base"] = {"path": str(base), "hash": base_hash, "cache": hit}
    prod_dir = production_model(registry, registry_name, alias)
    if prod_dir is not None:
        prod_hash = hash_path(prod_dir)
        scores["production"], hit = cached_scores(prod_dir, cfg, info, prod_hash)
        models["production"] = {"path": str(prod_dir), "hash": prod_hash, "cache": hit}
    kl = {}
    if cfg.signals.n_texts and any(b["role"] == "general" and "data_file" in b for b in info["benchmarks"].values()):
        base_model, _ = load_model(base_dir)
        kl = mean_kl(cand_model, base_model, tok, info, cfg)
        del base_model
    del cand_model

    benchmarks = {}
    for name, spec in info["specs"].items():
        entry = {"role": spec.role, "chat": spec.chat, "n": scores["candidate"]["mc"][name]["n"],
                 "source": spec.task or spec.path, "format": None if spec.task else spec.format,
                 "items_hash": info["benchmarks"][name].get("items_hash")}
        for who in scores:
            entry[who] = {k: scores[who]["mc"][name][k] for k in ("acc", "acc_norm")}
            ppl = scores[who]["perplexity"].get(name)
            if ppl:
                entry[who]["perplexity"] = ppl["perplexity"]
        entry["delta"] = {k: entry["candidate"][k] - entry["base"][k] for k in ("acc", "acc_norm")}
        if "production" in scores:
            entry["delta_vs_production"] = {k: entry["candidate"][k] - entry["production"][k]
                                            for k in ("acc", "acc_norm")}
        if name in kl:
            entry["kl_vs_base"] = kl[name]["kl"]
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
        write_json(tmp / "bundle.json", {k: v for k, v in info.items() if k != "specs"})
    result = {"bundle_hash": info["hash"], "limit": cfg.limit, "models": models, "benchmarks": benchmarks,
              "generations": gens, "skipped": info["skipped"], "wall_time_s": round(time.time() - started, 2)}
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
