"""Stage ``export``: merge SFT and DPO into one standalone model, and prove the merge is faithful.

    python -m tasks.export --base models/cpt --sft models/sft --dpo models/dpo --origin models/base \
        --data data/clean --out models/export --metrics metrics/export.json

The base (pointer followed) is loaded in float32, the SFT adapter merged, then the DPO adapter
merged; the result is saved in ``export.dtype`` (safetensors) with the tokenizer and its chat
template, a ``model_card.md`` (base source, data hashes, each stage's params and train metrics)
and a ``meta.json`` carrying the lineage (the inputs' own ``meta.json``).

Check (the merge bug of LLaMA-Factory #5232 is a silent one): before the output is renamed into
place, the saved folder is reloaded and its greedy generations (chat template) on
``export.check_prompts`` prompts are compared with those of the adapter model (base + merged SFT +
DPO adapter, as trained). Prompts are the first user turns of ``--data``/sft.jsonl when given,
otherwise a few fixed ones. The match rate and token agreement go to ``--metrics``; the stage
fails, leaving no output, when the agreement is below ``export.min_agreement``.

Interpolation rescue (``export.interpolation``, on by default; :mod:`tempering.interpolate`):
after the merge, ``merged = origin + alpha * (merged - origin)`` is scored for every alpha of the
grid on the dev split (``evaluate.dev``: dev domain questions, dev drift texts; never the gate's
items), with ``--origin`` (the base model the gate measures forgetting from) as the reference.
The alpha with the largest dev domain gain whose dev drift is within the gate's limits is the
one saved; the curve, the choice and its reason go to ``--metrics`` ``interpolation``, the model
card and the report. With an alpha below 1 the merge is first checked as trained (alpha 1 against
the adapter model, ``merge_check``), then the saved folder against the interpolated model.

When DPO passed the SFT model through (``dpo.enabled: false``, or no preference rows: ``--dpo``
holds a ``pointer.json`` to ``--sft``), the model is base + SFT: the SFT adapter is the live one
the merged export is checked against, and the model card says why DPO did not train.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tempering import TemperingError
from tempering.cli import stage_main
from tempering.config import Params
from tempering.io import (POINTER_FILE, atomic_path, hash_path, read_json, read_jsonl, resolve_model_dir,
                          write_json, write_meta)
from tempering.records import ExportRecord, validated

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = (
    "export",
    # the dev split and how it is scored (as evaluate scores); the gate's limits the sweep keeps to
    "evaluate",
    "gate.max_kl",
    "gate.max_perplexity_ratio",
    "gate.confidence",
    "gate.bootstrap_iters",
    "gate.seed",
    "gate.metric",
)

FIXED_PROMPTS = (
    "What is the capital of France?",
    "Name three colours.",
    "What is 12 plus 7?",
    "Write one sentence about the sea.",
    "Who wrote the Moonlight Sonata?",
)


def check_prompts(data: str | None, n: int) -> list[list[dict]]:
    """Conversations to generate from: the turns before the first assistant reply of ``n`` SFT
    rows spread evenly over ``data``/sft.jsonl (first row included), topped up with fixed prompts."""
    prompts: list[list[dict]] = []
    if data and n:
        path = Path(data) / "sft.jsonl"
        rows = read_jsonl(path) if path.exists() else []
        picked = sorted({int(i * len(rows) / n) for i in range(n)}) if rows else []
        for row in (rows[i] for i in picked):
            if len(prompts) >= n:
                break
            msgs = row.get("messages") or []
            first = next((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), None)
            if first:
                prompts.append([{"role": m["role"], "content": m["content"]} for m in msgs[:first]])
    for text in FIXED_PROMPTS:
        if len(prompts) >= n:
            break
        prompts.append([{"role": "user", "content": text}])
    return prompts[:n]


def greedy(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[list[int]]:
    import torch

    outs = []
    model.eval()
    for messages in prompts:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        outs.append(gen[0, enc["input_ids"].shape[1]:].tolist())
    return outs


def next_token_logits(model, tokenizer, prompts: list[list[dict]]) -> list:
    """Float32 logits of the first generated position for each prompt (a finer check than text)."""
    import torch

    out = []
    for messages in prompts:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out.append(model(**{k: v.to(model.device) for k, v in enc.items()}).logits[0, -1].float().cpu())
    return out


def agreement(a: list[int], b: list[int]) -> float:
    """Share of the longer output covered by the common prefix (1.0 = identical)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    prefix = 0
    for x, y in zip(a, b):
        if x != y:
            break
        prefix += 1
    return prefix / longest


def dpo_passed_through(dpo: Path, sft: Path) -> bool:
    """Whether ``dpo`` is a pass-through of ``sft`` (a pointer written by the dpo stage)."""
    if not (dpo / POINTER_FILE).exists():
        return False
    target = resolve_model_dir(dpo)
    if target.resolve() != sft.resolve():
        raise TemperingError(f"{dpo}: passes through {read_json(dpo / POINTER_FILE)['model']!r}, which is not "
                             f"the SFT model {sft} (re-run the dpo stage)")
    return True


def _adapter_model(base_dir: Path, sft: Path, dpo: Path):
    """The model as trained: base + merged SFT, with the DPO adapter live (not merged). When DPO
    passed the SFT model through, base with the SFT adapter live."""
    from tempering.train.models import is_adapter_dir, live_adapter, load_merged, merge_adapter

    if dpo_passed_through(dpo, sft):
        model = load_merged(base_dir, [])
        peft_type = str(read_json(sft / "adapter_config.json").get("peft_type", "")) \
            if is_adapter_dir(sft) else ""
        if peft_type and peft_type not in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
            return live_adapter(model, sft)
        # full SFT (the saved model is the policy); prefix/prompt adapters get merge_adapter's refusal
        return merge_adapter(model, sft)
    model = load_merged(base_dir, [sft])
    if is_adapter_dir(dpo):
        return live_adapter(model, dpo)
    return merge_adapter(model, dpo)  # full DPO: the saved model is the policy


def _merged(adapter_model):
    """Fold the live adapter into the weights (float32)."""
    return adapter_model.merge_and_unload() if hasattr(adapter_model, "merge_and_unload") else adapter_model


def _lineage(meta: dict) -> dict:
    keep = ("stage", "params", "inputs", "git_sha", "finished_at", "source", "n_params", "enabled", "pointer",
            "train", "base_model", "fingerprint", "trained", "note")
    return {k: meta[k] for k in keep if k in meta}


def model_card(lineage: dict, check: dict, cfg, interp: dict | None = None) -> str:
    base = lineage.get("base_model", {})
    lines = ["# Model card", "",
             "Produced by the tempering pipeline: base model -> optional continued pre-training -> "
             "SFT -> DPO, adapters merged into a standalone model.", "",
             "## Base model", "",
             f"- source: `{base.get('source', 'unknown')}`"]
    if base.get("n_params"):
        lines.append(f"- parameters: {base['n_params']:,}")
    lines.append("")
    lines += ["## Data", ""]
    for stage in ("cpt", "sft", "dpo"):
        inputs = lineage.get(stage, {}).get("inputs", {})
        if "data" in inputs:
            lines.append(f"- {stage}: sha256 `{inputs['data']}`")
    lines += ["", "## Training stages", ""]
    for stage in ("cpt", "sft", "dpo"):
        meta = lineage.get(stage)
        if not meta:
            continue
        train = meta.get("train") or {}
        lines.append(f"### {stage}")
        lines.append("")
        if stage == "cpt" and meta.get("enabled") is False:
            lines += ["Disabled: the base model passed through.", ""]
            continue
        if stage == "dpo" and meta.get("trained") is False:
            lines += [f"Not trained: {meta.get('note') or 'the SFT model passed through'}.", ""]
            continue
        for key in ("steps", "train_loss_first", "train_loss_last", "tokens_seen", "tokens_per_s",
                    "rewards_accuracies_last", "rewards_margins_last", "precision"):
            if train.get(key) is not None:
                lines.append(f"- {key}: {train[key]}")
        lines += ["", "Params:", "", "```json", json.dumps(meta.get("params", {}), indent=2), "```", ""]
    if interp:
        lines += ["## Interpolation towards the base", "",
                  f"`merged = base + alpha * (tuned - base)`, alpha kept: **{interp['chosen']:g}**. {interp['reason']}.", "",
                  "| alpha | dev domain gain | dev KL (upper) | dev perplexity ratio (upper) |", "|---|---|---|---|"]
        for p in interp["points"]:
            d = p.get("drift") or {}
            gain = "n/a" if p.get("domain_gain") is None else f"{p['domain_gain']:+.3f}"
            kl = f"{d['kl']:.3f} ({d['kl_upper']:.3f})" if d else "n/a"
            ppl = f"{d['perplexity_ratio']:.3f} ({d['perplexity_ratio_upper']:.3f})" if d else "n/a"
            lines.append(f"| {p['alpha']:g} | {gain} | {kl} | {ppl} |")
        lines.append("")
    lines += ["## Export check", "",
              f"- dtype: {cfg.dtype}",
              f"- greedy outputs identical to the adapter model: {check['matches']}/{check['prompts']}",
              f"- mean token agreement: {check['token_agreement']:.3f} (minimum {cfg.min_agreement})",
              f"- largest next-token logit difference: {check.get('max_logit_diff')}", "",
              "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForCausalLM.from_pretrained(PATH)",
              "```", ""]
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _interpolate(params: Params, merged, tokenizer, origin: str, prompts, reference) -> tuple[dict, dict | None]:
    """The dev sweep on ``merged`` (float32, as trained): leaves it at the kept alpha. Returns
    (the sweep record, the alpha-1 merge check when the kept alpha is below 1, else None)."""
    from tempering import interpolate, scorecard
    from tempering.train.data import load_tokenizer
    from tempering.train.models import load_merged, use_attention

    cfg = params.export
    origin_dir = resolve_model_dir(origin)
    if not (origin_dir / "config.json").exists():
        raise TemperingError(f"{origin}: origin model folder not found (--origin: the base model forgetting is "
                             "measured from)")
    # Check the merge as trained before the weights move: the saved-folder check below then
    # compares against the interpolated model.
    as_trained = greedy(merged, tokenizer, prompts, cfg.check_max_new_tokens)
    scores = [agreement(a, b) for a, b in zip(reference, as_trained)]
    merge_check = {"prompts": len(prompts), "matches": sum(a == b for a, b in zip(reference, as_trained)),
                   "token_agreement": (sum(scores) / len(scores)) if scores else 1.0}
    base_model = load_merged(origin_dir, [])
    base_model.eval()
    for model in (merged, base_model):  # scored as evaluate scores (the kernel is not saved)
        use_attention(model, params.evaluate.attention, scorecard._device(), training=False)
    record = interpolate.sweep(merged, tokenizer, base_model, load_tokenizer(origin_dir), cfg.interpolation,
                               params.evaluate, params.gate, log=_log)
    record["origin"] = str(origin)
    record["origin_hash"] = hash_path(origin_dir)
    del base_model
    return record, (merge_check if record["chosen"] != 1.0 else None)


def run(params: Params, base: str, sft: str, dpo: str, out: str, metrics: str, data: str | None = None,
        origin: str | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tempering.train.data import load_tokenizer
    from tempering.train.models import model_meta
    from tempering.train.precision import cpu_has_bf16, quiet_transformers, setup_torch

    started = time.time()
    cfg = params.export
    base_dir = resolve_model_dir(base)
    for name, path in (("base", base_dir), ("sft", Path(sft)), ("dpo", Path(dpo))):
        if not Path(path).exists():
            raise TemperingError(f"{path}: {name} input not found")
    threads = setup_torch()
    quiet_transformers()
    tok_dir = next(p for p in (Path(dpo), Path(sft), base_dir) if (p / "tokenizer_config.json").exists())
    tokenizer = load_tokenizer(tok_dir)
    prompts = check_prompts(data, cfg.check_prompts)

    adapter_model = _adapter_model(base_dir, Path(sft), Path(dpo))
    reference = greedy(adapter_model, tokenizer, prompts, cfg.check_max_new_tokens)
    reference_logits = next_token_logits(adapter_model, tokenizer, prompts)
    merged = _merged(adapter_model)
    interp, merge_check = None, None
    if cfg.interpolation.enabled:
        interp, merge_check = _interpolate(params, merged, tokenizer, origin or base, prompts, reference)
        if merge_check is not None:
            if merge_check["token_agreement"] < cfg.min_agreement:
                raise TemperingError(
                    f"{out}: the merged model (alpha 1) disagrees with the adapter model (token agreement "
                    f"{merge_check['token_agreement']:.2f} < export.min_agreement {cfg.min_agreement}); nothing written")
            # The saved folder must reproduce the interpolated model, not the adapter model.
            reference = greedy(merged, tokenizer, prompts, cfg.check_max_new_tokens)
            reference_logits = next_token_logits(merged, tokenizer, prompts)
    dtype = getattr(torch, cfg.dtype)
    merged = merged.to(dtype)
    merged.config.dtype = cfg.dtype
    merged.config.use_cache = True
    gen_cfg = merged.generation_config
    if gen_cfg.eos_token_id is None:
        gen_cfg.eos_token_id = tokenizer.eos_token_id
    if gen_cfg.pad_token_id is None:
        gen_cfg.pad_token_id = tokenizer.pad_token_id

    lineage = {"sft": _lineage(model_meta(sft)), "dpo": _lineage(model_meta(dpo))}
    outer = model_meta(base)  # models/cpt: a pointer's or a merged model's meta
    if outer.get("stage") == "cpt":
        lineage["cpt"] = _lineage(outer)
        passed_through = Path(base).resolve() != base_dir.resolve()
        lineage["base_model"] = outer.get("base_meta") or (
            _lineage(model_meta(base_dir)) if passed_through else {})
    else:
        lineage["cpt"], lineage["base_model"] = {}, _lineage(outer)

    with atomic_path(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del merged, adapter_model
        # Reload what was written, as a user would. bf16 weights are upcast to float32 for the
        # check on CPUs without native bf16 (exact; only the arithmetic differs).
        load_dtype = dtype if (torch.cuda.is_available() or cpu_has_bf16()) else torch.float32
        exported = AutoModelForCausalLM.from_pretrained(tmp, dtype=load_dtype)
        candidate = greedy(exported, load_tokenizer(tmp), prompts, cfg.check_max_new_tokens)
        scores = [agreement(a, b) for a, b in zip(reference, candidate)]
        check = {"prompts": len(prompts), "matches": sum(a == b for a, b in zip(reference, candidate)),
                 "token_agreement": (sum(scores) / len(scores)) if scores else 1.0}
        check["match_rate"] = check["matches"] / check["prompts"] if prompts else 1.0
        diffs = [(a - b).abs().max().item() for a, b in
                 zip(reference_logits, next_token_logits(exported, tokenizer, prompts))]
        check["max_logit_diff"] = round(max(diffs), 6) if diffs else 0.0
        check["reference"] = "interpolated" if merge_check is not None else "adapter"
        if merge_check is not None:
            check["merge_check"] = merge_check
        samples = [{"prompt": p[-1]["content"], "adapter": tokenizer.decode(r, skip_special_tokens=True),
                    "export": tokenizer.decode(c, skip_special_tokens=True), "agreement": round(s, 4)}
                   for p, r, c, s in zip(prompts, reference, candidate, scores)]
        if check["token_agreement"] < cfg.min_agreement:
            worst = min(samples, key=lambda s: s["agreement"])
            raise TemperingError(
                f"{out}: the merged model disagrees with the adapter model (token agreement "
                f"{check['token_agreement']:.2f} < export.min_agreement {cfg.min_agreement}; e.g. "
                f"{worst['prompt'][:60]!r}: adapter {worst['adapter'][:40]!r} vs export "
                f"{worst['export'][:40]!r}); nothing written")
        (tmp / "model_card.md").write_text(model_card(lineage, check, cfg, interp), encoding="utf-8")
    data_hashes = {k: v["inputs"]["data"] for k, v in lineage.items() if v and "data" in v.get("inputs", {})}
    n_params = sum(p.numel() for p in exported.parameters())
    write_meta(out, stage="export", params=cfg,
               inputs={"base": hash_path(base_dir), "sft": hash_path(sft), "dpo": hash_path(dpo),
                       **({"origin": interp["origin_hash"]} if interp else {})},
               started=started, extra={"lineage": lineage, "data_hashes": data_hashes, "check": check,
                                       "samples": samples, "n_params": n_params,
                                       "alpha": interp["chosen"] if interp else 1.0})
    summary = {**check, "dtype": cfg.dtype, "n_params": n_params, "threads": threads,
               "alpha": interp["chosen"] if interp else 1.0,
               "interpolation": interp if interp else {"enabled": False},
               "wall_time_s": round(time.time() - started, 2)}
    write_json(metrics, validated(ExportRecord, summary, metrics))
    return {"out": out, **summary}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="models/cpt", help="model the adapters were trained on")
    parser.add_argument("--sft", default="models/sft", help="SFT adapter folder")
    parser.add_argument("--dpo", default="models/dpo", help="DPO adapter folder")
    parser.add_argument("--data", default=None, help="folder with sft.jsonl: check prompts (optional)")
    parser.add_argument("--origin", default=None,
                        help="base model the interpolation scales towards (default: --base, pointer followed)")
    parser.add_argument("--out", default="models/export", help="standalone model folder")
    parser.add_argument("--metrics", default="metrics/export.json")


def main(argv=None) -> int:
    return stage_main("export", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
