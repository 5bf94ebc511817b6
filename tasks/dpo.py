"""Stage ``dpo``: direct preference optimisation on top of the SFT model.

    python -m tasks.dpo --base models/cpt --sft models/sft --data data/clean --out models/dpo \
        --checkpoints checkpoints/dpo --metrics metrics/dpo.json --live dvclive/dpo

The base model is loaded in float32 and the SFT adapter merged into it; a fresh LoRA goes on top.
The reference model is the same network with that LoRA disabled, i.e. exactly the SFT model, so
there is no second copy in memory. With ``dpo.precompute_ref`` (default) the reference log-probs are
computed once before training and cached under ``.cache/tempering/dpo_ref/`` keyed by (preference
data, reference model = base + SFT, tokenizer, max lengths, precision): no reference forward in
any epoch, and none at all in a later run with the same inputs (LoRA and full alike). ``beta``, ``loss_type``, ``max_length`` and
``max_prompt_length`` come from the ``dpo`` params (long prompts keep their end).

``dpo.heldout_share`` holds out whole prompts' pairs, never trained on: after training the base,
the SFT model and the DPO policy are scored on them (``metrics/dpo.json`` ``heldout``), and the
pairs with every model's log-probs go to ``--out/heldout.jsonl`` (:mod:`tempering.preference`; the
scoring settings in ``meta.json`` ``heldout``), where ``evaluate`` scores the exported candidate
on them for the gate's ``alignment`` check. No pairs held out: no file, and ``meta.json`` says why.

``dpo.eval_share`` holds out pairs for an eval loss (the DPO loss, against the same reference) at
every checkpoint, and ``dpo.early_stopping_patience`` stops on it, keeping the best checkpoint.

Checkpoints/resume as in ``tasks.sft``. Writes the DPO adapter (+ tokenizer) to ``--out``
atomically with ``meta.json``; metrics (loss, rewards/accuracies, margins, speed) to
``--metrics``; curves to ``--live``.

Optional, as cpt is: with ``dpo.enabled: false``, or with no preference rows to train on (none
given, or all quarantined), the SFT model passes through: ``--out`` gets a ``pointer.json``
(``{"model": "<sft, relative to --out>"}``) and ``meta.json``, no weights, and ``--metrics`` a
``note`` saying why (no held-out file: the candidate makes no alignment claim). Export then
merges the SFT model alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from tempering import TemperingError, preference
from tempering.cli import stage_main
from tempering.config import Params
from tempering.io import (POINTER_FILE, atomic_path, content_id, hash_path, read_jsonl, resolve_model_dir,
                          write_json, write_meta)
from tempering.records import TrainRecord, validated

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ("dpo", "tracking", "train")

NOTE_DISABLED = "dpo.enabled is false: the SFT model passed through untrained"
NOTE_NO_DATA = "no preference rows to train on ({data}): the SFT model passed through untrained"
NOTE_NO_HELDOUT = "dpo.heldout_share is {share}: no preference pairs were held out"
NOTE_ONE_PROMPT = "no preference pairs could be held out: the {pairs} pairs share too few prompts (one stays for training)"


def _policy_base(base_dir: Path, sft: Path, method: str, precision):
    """The SFT model as a plain (merged) network; for qlora, merged then re-loaded in 4-bit."""
    from tempering.train.models import check_qlora, load_merged, load_model

    if method != "qlora":
        return load_merged(base_dir, [sft])
    check_qlora(method, "dpo")  # one-line error without CUDA + bitsandbytes
    tmp = Path(tempfile.mkdtemp(prefix="tempering-dpo-merged-"))
    try:
        merged = load_merged(base_dir, [sft])
        merged.save_pretrained(tmp)
        del merged
        return load_model(tmp, method="qlora", precision=precision, section="dpo")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prompt_key(row: dict) -> str:
    prompt = row.get("prompt")
    text = " ".join(m.get("content", "") for m in prompt) if isinstance(prompt, list) else str(prompt)
    return " ".join(text.lower().split())


def heldout_split(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs). Whole prompts go one way, chosen in a seeded order until
    ``share`` of the pairs is held out, so no held-out prompt is trained on (the rows are already
    deduplicated by the dedup stage; this keeps a prompt's other pairs out of training too)."""
    import random

    if share <= 0 or not rows:
        return rows, []
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_prompt_key(row), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target, held = max(1, round(share * len(rows))), set()
    for key in keys[:-1]:  # at least one prompt stays for training
        if len(held) >= target:
            break
        held.update(groups[key])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def heldout_report(scores: dict[str, list[tuple[float, float]]], beta: float, *, seed: int) -> dict:
    """Preference accuracy (the model puts more probability on chosen than on rejected; a tie
    counts half) and mean margin per model, DPO's implicit reward against the SFT reference, and
    the paired differences with 95% bootstrap intervals over pairs."""
    from tempering import stats

    acc = stats.preference_accuracy
    margins = {k: [c - r for c, r in v] for k, v in scores.items()}
    n = len(next(iter(margins.values())))
    report = {"pairs": n,
              "accuracy": {k: round(sum(map(acc, m)) / n, 4) for k, m in margins.items()},
              "margin": {k: round(sum(m) / n, 4) for k, m in margins.items()}}
    implicit = [beta * (d - s) for d, s in zip(margins["dpo"], margins["sft"])]
    report["implicit_reward"] = {"accuracy": round(sum(map(acc, implicit)) / n, 4),
                                 "margin": round(sum(implicit) / n, 4)}
    for a, b in (("dpo", "sft"), ("sft", "base"), ("dpo", "base")):
        diffs = [acc(x) - acc(y) for x, y in zip(margins[a], margins[b])]
        try:
            t = stats.mean_lower_test(diffs, 0.0, method="bootstrap", confidence=0.95, iters=10_000, seed=seed)
            report[f"{a}_vs_{b}"] = {"accuracy_delta": round(t.estimate, 4),
                                     "ci": [round(t.ci[0], 4), round(t.ci[1], 4)],
                                     "p_no_gain": round(t.p_value, 4), "gain_certified": t.ci[0] > 0}
        except ValueError:
            report[f"{a}_vs_{b}"] = None
    return report


def _score_heldout(policy, tokenizer, heldout: list[dict], cfg, precision, base_dir: Path,
                   sft_dir: Path) -> tuple[dict, dict[str, list[tuple[float, float]]]]:
    """The held-out pairs through the DPO model, the SFT model (its reference) and the base:
    (the aggregate report, each model's per-pair log-probs)."""
    from tempering import preference
    from tempering.train.models import load_merged, use_attention

    def logps(model):
        if not hasattr(model, "peft_config"):  # a freshly loaded model: the policy's kernel
            use_attention(model, cfg.attention, precision.device, cfg.max_length)
        return preference.completion_logps(model, tokenizer, heldout, max_length=cfg.max_length,
                                           max_prompt_length=cfg.max_prompt_length, precision=precision)

    scores = {"dpo": logps(policy)}
    if hasattr(policy, "disable_adapter") and cfg.adapter.method != "full":
        with policy.disable_adapter():  # LoRA: the reference is the policy without its adapter
            scores["sft"] = logps(policy)
    else:
        scores["sft"] = logps(load_merged(base_dir, [sft_dir]))
    scores["base"] = logps(load_merged(base_dir, []))
    report = heldout_report(scores, cfg.beta, seed=cfg.seed)
    report["prompts"] = len({_prompt_key(r) for r in heldout})
    return report, scores


def _pass_through(params: Params, sft: str, out: str, checkpoints: str, metrics: str, started: float,
                  note: str, inputs: dict, live: str | None) -> dict:
    """No training: ``out`` points at the SFT model, the metrics and meta say why."""
    from tempering.train.checkpoints import fingerprint, prepare_checkpoints

    # Old checkpoints of a trained run are stale now: the fingerprint differs, so they go.
    prepare_checkpoints(checkpoints, fingerprint(params.dpo, passthrough="sft", **inputs))
    if live:  # a trained run's curves are stale too; an empty curve (header only) is what DVC plots
        shutil.rmtree(live, ignore_errors=True)
        curve = Path(live) / "plots" / "metrics" / "train" / "loss.tsv"
        curve.parent.mkdir(parents=True)
        curve.write_text("step\tloss\n", encoding="utf-8")
    target = Path(os.path.relpath(Path(sft).resolve(), Path(out).resolve())).as_posix()
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_json(tmp / POINTER_FILE, {"model": target})
    write_meta(out, stage="dpo", params=params.dpo, inputs=inputs, started=started,
               extra={"enabled": params.dpo.enabled, "trained": False, "note": note, "pointer": target,
                      "sft": str(sft)})
    summary = {"enabled": params.dpo.enabled, "trained": False, "steps": 0, "pairs": 0, "note": note,
               "pointer": target, "wall_time_s": round(time.time() - started, 2)}
    write_json(metrics, validated(TrainRecord, summary, metrics))
    return {"out": out, **summary}


def run(params: Params, base: str, sft: str, data: str, out: str, checkpoints: str, metrics: str,
        live: str | None = None) -> dict:
    started = time.time()
    cfg = params.dpo
    data_file = Path(data) / "preference.jsonl"
    base_dir = resolve_model_dir(base)
    sft_dir = Path(sft)
    if not (base_dir / "config.json").exists():
        raise TemperingError(f"{base}: base model folder not found")
    if not sft_dir.exists():
        raise TemperingError(f"{sft}: SFT output not found (run the sft stage)")
    base_hash, sft_hash = hash_path(base_dir), hash_path(sft_dir)
    if not cfg.enabled:
        return _pass_through(params, sft, out, checkpoints, metrics, started, NOTE_DISABLED,
                             {"base": base_hash, "sft": sft_hash}, live)
    if not data_file.exists():
        raise TemperingError(f"{data_file}: not found (run the validate and dedup stages, or set "
                             "dpo.enabled: false)")
    rows = read_jsonl(data_file)
    data_hash = hash_path(data_file)
    if not rows:
        return _pass_through(params, sft, out, checkpoints, metrics, started, NOTE_NO_DATA.format(data=data_file),
                             {"base": base_hash, "sft": sft_hash, "data": data_hash}, live)

    from tempering.train.checkpoints import checkpoint_step, fingerprint, prepare_checkpoints
    from tempering.train.data import dpo_dataset, load_tokenizer, split_eval, tokenizer_hash
    from tempering.train.dpo import build_dpo_trainer, dpo_config, reference_cache_key
    from tempering.train.loop import save_trained, train
    from tempering.train.models import apply_adapter, cast_frozen, frozen_dtype, snapshot_trainable, use_attention
    from tempering.train.precision import choose_precision, quiet_transformers, setup_torch

    rows, heldout = heldout_split(rows, cfg.heldout_share, cfg.seed)
    dataset = dpo_dataset(rows, source=str(data_file))
    train_set, eval_set = split_eval(dataset, cfg.eval_share, cfg.seed)
    fp = fingerprint(cfg, stage_file=__file__, data=data_hash, base=base_hash, sft=sft_hash)
    resume = prepare_checkpoints(checkpoints, fp)

    threads = setup_torch()
    quiet_transformers()
    precision = choose_precision(cfg.precision)
    tok_dir = sft_dir if (sft_dir / "tokenizer_config.json").exists() else base_dir
    tokenizer = load_tokenizer(tok_dir)
    model = _policy_base(base_dir, sft_dir, cfg.adapter.method, precision)
    model.config.use_cache = False
    attention = use_attention(model, cfg.attention, precision.device, cfg.max_length)
    if cfg.adapter.method == "full":  # merging left the weights frozen (peft freezes the base)
        apply_adapter(model, cfg.adapter)
    else:  # the frozen SFT model in the autocast dtype (see tempering.train.models.frozen_dtype)
        model = cast_frozen(model, cfg.adapter, precision)
    args = dpo_config(cfg, params.tracking, output_dir=checkpoints,
                      precision=precision, run_name="dpo")
    # The reference is the SFT model: base + SFT adapter (and the frozen dtype they are run in).
    ref_key = reference_cache_key(
        data=data_hash, reference=content_id({"base": base_hash, "sft": sft_hash,
                                              "frozen": str(frozen_dtype(cfg.adapter.method, precision,
                                                                         cfg.adapter.frozen_dtype))}),
        tokenizer=tokenizer_hash(tok_dir), max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length, precision=precision.name, attention=attention)
    resume_step = checkpoint_step(resume)
    if eval_set is not None or heldout:  # the reference log-probs are cached per split
        ref_key = content_id({"ref": ref_key, "eval_share": cfg.eval_share, "seed": cfg.seed,
                              **({"heldout_share": cfg.heldout_share} if heldout else {})}, 32)
    trainer = build_dpo_trainer(model, tokenizer, train_set, args, adapter=cfg.adapter,
                                max_prompt_length=cfg.max_prompt_length, stage="dpo",
                                checkpoints=checkpoints, live_dir=live,
                                tracking=params.tracking, resume_step=resume_step,
                                ref_cache_key=ref_key, eval_dataset=eval_set, cfg=cfg)
    before = snapshot_trainable(trainer.model)
    summary = train(trainer, resume, before)
    # The adapter goes on base + SFT merged: both content hashes name it (see save_trained).
    save_trained(trainer, tokenizer, out, base=f"{base_hash}+{sft_hash}")
    if heldout:
        summary["heldout"], scores = _score_heldout(trainer.model, tokenizer, heldout, cfg, precision, base_dir,
                                                    sft_dir)
        # Per pair, for the gate's alignment check: evaluate scores the exported candidate on the
        # same pairs with these very settings and pairs its margins with the SFT model's.
        preference.write_heldout(out, preference.heldout_rows(heldout, scores, tokenizer, max_length=cfg.max_length,
                                                              max_prompt_length=cfg.max_prompt_length))
        heldout_meta = {"file": preference.HELDOUT_FILE, "pairs": len(heldout),
                        "prompts": summary["heldout"]["prompts"],
                        "scoring": {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                                    "precision": precision.name, "attention": attention,
                                    "tokenizer": tokenizer_hash(out),
                                    "version": preference.SCORING_VERSION}}
    else:
        heldout_meta = {"file": None, "pairs": 0, "reason": NOTE_NO_HELDOUT.format(share=cfg.heldout_share) if
                        cfg.heldout_share <= 0 else NOTE_ONE_PROMPT.format(pairs=len(rows))}

    summary.update({"enabled": True, "trained": True, "precision": precision.name, "device": precision.device,
                    "attention": attention,
                    "threads": threads, "pairs": len(dataset) + len(heldout), "train_pairs": len(train_set),
                    "heldout_pairs": len(heldout),
                    "eval_pairs": len(eval_set) if eval_set is not None else 0, "method": cfg.adapter.method,
                    "beta": cfg.beta, "loss_type": cfg.loss_type, "wall_time_s": round(time.time() - started, 2)})
    curve = summary.pop("loss_curve")
    eval_curve = summary.pop("eval_loss_curve", None)
    write_meta(out, stage="dpo", params=cfg,
               inputs={"base": base_hash, "sft": sft_hash, "data": data_hash}, started=started,
               extra={"enabled": True, "trained": True, "base_model": str(base), "sft": str(sft), "train": summary,
                      "loss_curve": curve, "eval_loss_curve": eval_curve, "fingerprint": fp,
                      "heldout": heldout_meta})
    write_json(metrics, validated(TrainRecord, summary, metrics))
    keys = ("steps", "train_loss_first", "train_loss_last", "rewards_accuracies_last",
            "rewards_margins_last", "tokens_per_s", "s_per_step", "weights_changed", "resumed_from")
    return {"out": out, **{k: summary.get(k) for k in keys}}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="models/cpt", help="model folder the SFT adapter was trained on")
    parser.add_argument("--sft", default="models/sft", help="SFT adapter (or full model) folder")
    parser.add_argument("--data", default="data/clean", help="folder holding preference.jsonl")
    parser.add_argument("--out", default="models/dpo", help="DPO adapter output folder")
    parser.add_argument("--checkpoints", default="checkpoints/dpo", help="resumable checkpoints")
    parser.add_argument("--metrics", default="metrics/dpo.json")
    parser.add_argument("--live", default=None, help="dvclive folder for curves")


def main(argv=None) -> int:
    return stage_main("dpo", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
