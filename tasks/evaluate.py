"""Stage ``evaluate``: lm-eval benchmarks of the exported model, the base and the production model,
and the drift texts the gate's label-free checks read.

    python -m tasks.evaluate --model models/export --base models/base --registry registry \
        --champion eval/champion.json --dpo models/dpo --heldout data/clean/sft_heldout.jsonl \
        --samples eval/samples --metrics metrics/evaluate.json

Each benchmark of ``evaluate.benchmarks`` becomes a local lm-eval YAML task (``dataset_path:
json``, ``output_type: multiple_choice``, acc and acc_norm) run by ``lm_eval.simple_evaluate``,
fully offline; ``evaluate.backend`` picks the lm-eval model that computes the log-likelihoods
(``tempering``: tempering/scoring.py, one pass per shared context; ``hf``: lm-eval's HFLM). ``chat: true`` benchmarks go through the model's chat template (the question as a
user turn, each choice scored as the start of the assistant's reply: how the model was tuned).
The task files written are part of the bundle hash, with the data files, so a result always says
exactly what it measured. ``limit: power`` benchmarks get as many items as the gate needs to
certify their forgetting budget (:func:`tempering.scorecard.planned_limits`).

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

The held-out SFT rows (``--heldout``, the dedup stage's ``sft_heldout.jsonl``: rows held out as
the domain check when no domain benchmark is configured, ``dedup.sft_heldout``) are scored by
candidate and base through the candidate's tokenizer and chat template: per row, the summed
negative log-likelihood of the reference answer tokens (``--samples/sft_heldout.jsonl``, for the
gate's ``heldout_nll`` check), plus a few greedy answers of each model for the report
(``evaluate.sft_heldout``). An empty or absent file: the record's ``sft_heldout`` says so.

Writes ``--metrics`` (per benchmark: role, n, each model's acc/acc_norm and the candidate's delta;
the configured list; drift point values; a DVC metric) and ``--samples/<model>/<benchmark>.jsonl``
(per-item correctness, for the gate's paired statistics), both atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from tempering import TemperingError
from tempering.benchmarks import drift_texts
from tempering.cli import stage_main
from tempering.config import EvaluateParams, Params
from tempering.io import (POINTER_FILE, atomic_path, content_id, dump_jsonl, hash_path, read_json, read_jsonl,
                          resolve_model_dir, write_json, write_meta)
from tempering.records import EvaluateRecord, validated
# The scoring library (tempering/scorecard.py) owns the scoring names: import them from there.
from tempering.scorecard import (SCORING_VERSION, TASK_VERSION, _amp_dtype, _device, attention_kernel, bundle,
                                 drift_records, drift_summary, generations, load_model, multiple_choice)

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


# ----------------------------------------------------------------------------- caching


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
            "attention": attention_kernel(cfg),
            "batch_tokens": getattr(cfg, "batch_tokens", None),
            "rescore_tolerance": getattr(cfg, "rescore_tolerance", None),
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


def cached_scores(model_dir: Path, cfg: EvaluateParams, info: dict, model_hash: str,
                  work: dict | None = None) -> tuple[dict, str, dict]:
    """Scores of a model, cached per benchmark: (scores, "hit" | "partial" | "miss", key).

    Each benchmark's results are cached under :func:`scoring_key` with that benchmark's own
    definition in place of the bundle hash, so a change to one benchmark re-scores only it; the
    greedy generations under the generation benchmarks' definitions. Every model is cached, the
    candidate too: re-running evaluate after a promotion costs no scoring. ``key`` (with the
    bundle hash) is what the registry stores beside a promoted model's results. ``work``, when
    given, receives where the time went: loading, benchmark scoring (with the scorer's counts) and
    the greedy generations, in seconds."""
    key = scoring_key(cfg, info, model_hash)
    hashed = {name: {k: v for k, v in meta.items() if k != "data_file"} for name, meta in info["benchmarks"].items()}

    def bench_key(name: str) -> dict:
        return dict(key, bundle=None, benchmark={"name": name, **hashed[name]})

    gen_key = dict(key, bundle=None, benchmark={n: hashed.get(n) for n in cfg.generation.benchmarks})
    mc = {name: _read_cached(_cache_file(cfg, bench_key(name)), bench_key(name)) for name in info["specs"]}
    gens = _read_cached(_cache_file(cfg, gen_key, "generation"), gen_key)
    missing = [name for name, v in mc.items() if v is None]
    work = {} if work is None else work
    if missing or gens is None:
        t = time.perf_counter()
        model, tok = load_model(model_dir, cfg.attention)
        work["load_s"] = round(time.perf_counter() - t, 2)
        if missing:
            t, scorer = time.perf_counter(), {}
            sub = dict(info, specs={n: info["specs"][n] for n in missing})
            for name, value in multiple_choice(model, tok, sub, cfg, stats=scorer).items():
                mc[name] = value
                write_json(_cache_file(cfg, bench_key(name)), {"key": bench_key(name), "value": value})
            work.update(benchmarks_s=round(time.perf_counter() - t, 2), scorer=scorer)
        if gens is None:
            t = time.perf_counter()
            gens = generations(model, tok, info, cfg)
            write_json(_cache_file(cfg, gen_key, "generation"), {"key": gen_key, "value": gens})
            work["generations_s"] = round(time.perf_counter() - t, 2)
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
    cand, tok = load_model(cand_dir, cfg.attention)
    base, _ = load_model(base_dir, cfg.attention)
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
HELDOUT_FILE = "sft_heldout.jsonl"   # per-row held-out SFT scores (tempering.sft_heldout.FILE)


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
    from tempering import preference
    from tempering.train.precision import Precision

    # the dpo stage's kernel (kernels round differently); sets from before it was recorded: auto
    model, tok = load_model(cand_dir, str(scoring.get("attention", "auto")))
    precision = Precision(str(scoring["precision"]), _device(), "as the dpo stage scored the held-out pairs")
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


# ----------------------------------------------------------------------------- held-out SFT rows


def cached_heldout(cand_dir: Path, base_dir: Path, path: str | None, cfg: EvaluateParams,
                   key: dict) -> tuple[list[dict] | None, dict, str]:
    """(per-row records or None, the record's ``sft_heldout`` summary, cache state) of the
    held-out SFT rows at ``path``, scored by candidate and base; cached by both models' scoring
    keys, the rows and ``evaluate.sft_heldout``."""
    from tempering import scorecard, sft_heldout

    if path is None:
        return None, {"rows": 0, "reason": "no --heldout file given"}, "off"
    if not Path(path).is_file():
        return None, {"rows": 0, "reason": f"{path}: not found (the dedup stage writes it)"}, "off"
    rows = read_jsonl(path)
    if not rows:
        return None, {"rows": 0, "reason": f"{path}: empty (dedup.sft_heldout held nothing out: a domain "
                                           "benchmark is configured, or it is disabled)"}, "off"
    hcfg = cfg.sft_heldout
    key = dict(key, rows=content_id(rows, 32), heldout=hcfg.model_dump(mode="json"),
               heldout_version=sft_heldout.SCORING_VERSION)
    cache = _cache_file(cfg, key, "heldout")
    value = _read_cached(cache, key)
    hit = "hit"
    if value is None:
        hit = "miss"
        cand, tok = load_model(cand_dir, cfg.attention)
        base, _ = load_model(base_dir, cfg.attention)
        models = (("candidate", cand), ("base", base))
        scored = {who: scorecard.heldout_nll(m, tok, rows, max_length=hcfg.max_length, batch_size=hcfg.batch_size,
                                             cfg=cfg) for who, m in models}
        gens = {who: scorecard.heldout_generations(m, tok, rows, n=hcfg.examples, max_new_tokens=hcfg.max_new_tokens,
                                                   cfg=cfg) for who, m in models}
        del cand, base
        value = {"records": sft_heldout.pair_records(scored["candidate"], scored["base"]),
                 "examples": [dict(c, base_answer=b["answer"]) for c, b in zip(gens["candidate"], gens["base"])]}
        write_json(cache, {"key": key, "value": value})
    summary = dict(sft_heldout.summary(value["records"], len(rows)), file=sft_heldout.FILE, source=str(path),
                   examples=value["examples"], cache=hit)
    if not value["records"]:
        summary["reason"] = f"{path}: no row has an answer token within evaluate.sft_heldout.max_length"
    return value["records"], summary, hit


# ----------------------------------------------------------------------------- the stage


def run(params: Params, model: str, base: str, samples: str, metrics: str, registry: str | None = None,
        registry_name: str = "tempering-model", alias: str = "production", champion: str | None = None,
        dpo: str | None = None, heldout: str | None = None) -> dict:
    from tempering.train.precision import setup_torch

    started = time.time()
    cfg = params.evaluate
    setup_torch()
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
    work: dict[str, dict] = {"candidate": {}, "base": {}, "production": {}}
    scores["candidate"], hit, cand_key = cached_scores(cand_dir, cfg, info, cand_hash, work["candidate"])
    timings["candidate"] = round(time.time() - t0, 2)
    models["candidate"] = {"path": str(model), "hash": cand_hash, "cache": hit, "score_key": cand_key}
    base_hash = hash_path(base_dir)
    t0 = time.time()
    scores["base"], hit, base_key = cached_scores(base_dir, cfg, info, base_hash, work["base"])
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
            scores["production"], hit, _ = cached_scores(prod_dir, cfg, info, prod_hash, work["production"])
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
    t0 = time.time()
    held_rows, held_summary, _ = cached_heldout(cand_dir, base_dir, heldout, cfg,
                                                {"candidate": cand_key, "base": base_key})
    timings["sft_heldout"] = round(time.time() - t0, 2)

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
        if held_rows is not None:
            with open(tmp / HELDOUT_FILE, "w", encoding="utf-8") as fh:
                dump_jsonl(held_rows, fh)
        write_json(tmp / "bundle.json", {k: v for k, v in info.items() if k != "specs"})
    configured = [{"name": s.name, "role": s.role, "required": s.required} for s in cfg.benchmarks]
    result = {"bundle_hash": info["hash"], "limit": cfg.limit, "models": models, "benchmarks": benchmarks,
              "configured": configured, "skipped": info["skipped"], "generations": gens,
              "drift": dict(drift_summary(drift), cache=drift_hit) if drift else {"texts": 0, "cache": drift_hit},
              "alignment": alignment_summary(align_source, align_rows, align_hit),
              "sft_heldout": held_summary,
              "timings_s": timings, "work": {who: w for who, w in work.items() if w},
              "wall_time_s": round(time.time() - started, 2)}
    write_meta(samples, stage="evaluate", params=cfg, started=started,
               inputs={"candidate": cand_hash, "base": base_hash, "bundle": info["hash"],
                       **({"heldout": hash_path(align_source["path"])} if "path" in align_source else {}),
                       **({"sft_heldout": hash_path(heldout)} if held_rows is not None else {})})
    write_json(metrics, validated(EvaluateRecord, result, metrics))
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
    parser.add_argument("--heldout", default=None,
                        help="held-out SFT rows (data/clean/sft_heldout.jsonl): the domain check without a domain "
                             "benchmark")


def main(argv=None) -> int:
    return stage_main("evaluate", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
