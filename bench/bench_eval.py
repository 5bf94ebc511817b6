"""Evaluation speed: lm-eval's ``hf`` backend vs tempering's scorer, on the same requests, in one run.

    .venv/bin/python bench/bench_eval.py --model models/base \
        [--hellaswag 200] [--arc-easy 100] [--arc-challenge 100] [--boolq 100] [--piqa 0] \
        [--repeats 2] [--per-set] [--no-reference] [--parity-only] [--attention auto|eager|sdpa] \
        [--dump requests.jsonl] [--json bench/results-eval.json]
    .venv/bin/python bench/bench_eval.py --from-dump requests.jsonl[.gz] [--json FILE]   # no model

The requests are exactly those the ``evaluate`` stage sends: the shipped benchmarks as
``params.yaml`` lists them (files in ``benchmarks/``; only the item counts changed) go through ``tempering.scorecard.bundle`` and lm-eval's ``simple_evaluate`` with the
pipeline's own task definitions (plain prompts, zero-shot), recorded once by a stand-in model,
then replayed through both arms' ``loglikelihood`` (tokenization included, as lm-eval calls it):

(a) hf: ``tempering.scorecard.scoring_lm`` with ``evaluate.backend: hf``: lm-eval's HFLM around the
    loaded model, ``batch_size`` from params.yaml (16), bf16 autocast where the CPU has it,
    float32 log-softmax;
(b) tempering: the same with ``evaluate.backend: tempering`` (tempering/scoring.py), the
    ``batch_tokens`` and ``rescore_tolerance`` from params.yaml (bf16 near-ties re-scored in
    float32: the count, share and seconds of the re-scored requests are reported).

Both wrap the same loaded model (float32 weights, as evaluate loads them). After one untimed
warm-up call each, the arms alternate ``--repeats`` times (hf, tempering, hf, ...); the best
repeat of each arm is reported beside every repeat's time. ``--per-set`` also times each
benchmark's requests alone (one call per arm, alternating).

What is counted:
- requests/s: loglikelihood requests (one per choice) / seconds of the ``loglikelihood`` call;
- tokens/s: the workload in tokens, the same number for both arms: per request, the tokens
  lm-eval's hf backend runs through the model for it (context + continuation - 1, after its
  left truncation), divided by the arm's seconds. Their ratio equals the requests/s ratio;
- executed tokens: what each arm really ran through the decoder, padding included (hf: batch x
  width of every forward, counted at ``_model_call``; tempering: its packed rows), and the
  positions that went through the LM head (hf: all of them; tempering: continuation positions);
- MFU: executed matmul FLOPs / seconds / peak, with executed FLOPs = 2 x (decoder linear
  weights) x executed tokens + 2 x (LM head weights) x head positions (attention scores not
  counted), and the peak a bf16 (fp32 with --precision fp32) 2048^3 matmul measured in this run,
  best of ``--peak-repeats``, after the model is loaded and before either arm runs. It says how
  busy each arm keeps the cores; the speed-up also comes from work not done.
Machine load (os.getloadavg) is recorded at the start, after each repeat and at the end: the CPU
is shared; compare arms within a run.

Parity (``parity``): tempering's first timed results against hf's (bf16 against bf16, the speed
arm), and, unless ``--no-reference``, against two untimed extra passes: (c) hf in float32 (no
autocast: the reference numerics, ``parity_fp32``) and (d) tempering in bf16 without re-scoring
(``rescore_tolerance`` 0), whose errors against (c) are the measurement behind the tolerance:
``bf16_error`` (per request, quantiles), ``bf16_pair_error`` (per pair of choices of one item,
the ``rescore_tolerance`` the near-tie rule needs so that their two errors cannot flip their
order, in its unit of nats per sqrt(continuation tokens), under ``nats`` in plain nats; also per
benchmark) and ``tolerance_sweep`` (per candidate tolerance, the share of requests the rule
would re-score, the float32 tokens that costs, the pairs of choices its bounds cover, and the
decisions that would then match (c); re-scored requests take (c)'s values, which tempering's
float32 matches within 1e-3; ``flat_tolerance_sweep``: the same for the old rule, one bound in
nats for every choice). ``--dump`` writes the per-request results behind them, and
``--from-dump`` replays this analysis from such a file without a model. An item's decisions are lm-eval's ``acc`` (argmax of the
log-likelihoods) and ``acc_norm`` (argmax per character of the choice). ``--parity-only`` skips
the matmul peak, the warm-up and the timing (each arm runs once; the seconds it reports are one
cold call, not a speed figure).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TQDM_DISABLE", "1")
from tempering import env  # noqa: E402

env.setup()  # offline, no telemetry (the same defaults every stage uses)

# The shipped benchmarks, as params.yaml's evaluate.benchmarks names them (files, formats).
SETS = ("hellaswag", "arc_easy", "arc_challenge", "boolq", "piqa")
# rescore_tolerance values the sweep replays (nats per sqrt(continuation tokens)).
SWEEP = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.13, 0.15)
# The rule before 2026-12-06, replayed for comparison: these nats for every choice alike.
FLAT_SWEEP = (0.1, 0.15, 0.3)


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
    """Best GFLOP/s of an n^3 matmul over ``repeats`` runs (after one warm-up)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def record_requests(info: dict) -> list:
    """The loglikelihood requests lm-eval builds for the bundle's tasks (pipeline definitions)."""
    from lm_eval.api.model import LM

    from tempering.scorecard import run_lm_eval

    class Recorder(LM):
        def __init__(self):
            super().__init__()
            self.requests = []

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.requests += requests
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    rec = Recorder()
    for _ in run_lm_eval(rec, info):
        pass
    return rec.requests


def encoded(lm, req) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one request, as lm-eval's loglikelihood encodes it."""
    context, continuation = req.args
    if context:
        return lm._encode_pair(context, continuation)
    # lm-eval's empty-context rule: the prefix token is the context
    return [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)


def request_tokens(lm, requests: list) -> int:
    """Tokens lm-eval's hf backend runs through the model for these requests (the workload)."""
    total = 0
    for req in requests:
        ctx, cont = encoded(lm, req)
        total += min(len(ctx) + len(cont), lm.max_length + 1) - 1
    return total


def build_arms(model, tok, cfg_hf, cfg_tl) -> dict:
    from tempering.scorecard import scoring_lm

    hf = scoring_lm(model, tok, cfg_hf)
    counter = {"executed": 0}
    plain_call = hf._model_call

    def counted(inps, *args, **kwargs):  # batch x width of every forward hf runs
        counter["executed"] += int(inps.numel())
        return plain_call(inps, *args, **kwargs)

    hf._model_call = counted
    hf.bench_counter = counter
    return {"hf": hf, "tempering": scoring_lm(model, tok, cfg_tl)}


def executed(arm: str, lm) -> tuple[int, int]:
    """(decoder tokens, LM-head positions) run so far by this arm."""
    if arm == "hf":
        return lm.bench_counter["executed"], lm.bench_counter["executed"]
    return lm.stats.padded_tokens, lm.stats.head_positions


RESCORE_KEYS = ("rescored_groups", "rescored_requests", "rescore_seconds")


def timed(arm: str, lm, requests: list) -> dict:
    import gc

    gc.collect()
    tokens0, heads0 = executed(arm, lm)
    stats0 = lm.stats.as_dict() if hasattr(lm, "stats") else {}
    t = time.perf_counter()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    seconds = time.perf_counter() - t
    tokens1, heads1 = executed(arm, lm)
    run = {"seconds": seconds, "executed_tokens": tokens1 - tokens0, "head_positions": heads1 - heads0,
           "results": out}
    if stats0:  # tempering: what its float32 re-scoring of near-ties did in this call
        run.update({k: lm.stats.as_dict()[k] - stats0[k] for k in RESCORE_KEYS})
    return run


def choice_text(req) -> str:
    """The choice lm-eval's acc_norm divides by: the doc's choice (the continuation without the
    target delimiter)."""
    choices = (req.doc or {}).get("choices")
    return choices[req.idx] if choices else req.args[1][1:]


def argmax(values: list) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first best, as numpy's argmax


def decisions(requests: list, results: list) -> dict:
    """{(task, doc): (acc choice, acc_norm choice)}: lm-eval's argmax of the log-likelihoods and of
    the log-likelihoods per character of the choice."""
    items: dict = {}
    for req, res in zip(requests, results):
        items.setdefault((req.task_name, req.doc_id), []).append((req.idx, res[0], len(choice_text(req))))
    out = {}
    for key, rows in items.items():
        rows.sort()
        out[key] = (argmax([r[1] for r in rows]), argmax([r[1] / max(r[2], 1) for r in rows]))
    return out


def parity(requests: list, a: list, b: list) -> dict:
    """Per-request |difference| and per-item decision agreement between two arms' results: argmax
    (acc), argmax per character (acc_norm), both (same_decision); overall and per benchmark."""
    diffs = [abs(x[0] - y[0]) for x, y in zip(a, b)]
    da, db = decisions(requests, a), decisions(requests, b)
    out = {"requests": len(diffs), "max_abs_diff": round(max(diffs), 4),
           "mean_abs_diff": round(sum(diffs) / len(diffs), 4), "items": len(da)}
    same = {"argmax": sum(da[k][0] == db[k][0] for k in da), "acc_norm": sum(da[k][1] == db[k][1] for k in da),
            "decision": sum(da[k] == db[k] for k in da)}
    for name, n in same.items():
        out[f"same_{name}"], out[f"same_{name}_share"] = n, round(n / len(da), 4)
    per: dict = {}
    for k in da:
        row = per.setdefault(k[0], {"items": 0, "same_decision": 0})
        row["items"] += 1
        row["same_decision"] += da[k] == db[k]
    out["by_set"] = per
    return out


def quantiles(values: list[float], qs=(0.5, 0.9, 0.99, 0.999)) -> dict:
    ordered = sorted(values)
    out = {f"q{q * 100:g}": round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 4) for q in qs}
    out["max"] = round(ordered[-1], 4)
    out["mean"] = round(sum(ordered) / len(ordered), 4)
    return out


def documents(requests: list) -> dict:
    """{(benchmark, document): indices of its requests}: lm-eval's items, as the scorer groups them."""
    items: dict = {}
    for i, req in enumerate(requests):
        items.setdefault((req.task_name, req.doc_id), []).append(i)
    return items


def pair_needs(requests: list, bf16: list, exact: list, tokens: list[int]) -> list[tuple[float, float]]:
    """For every pair of choices of one item: the smallest ``rescore_tolerance`` the near-tie
    rule needs for that pair's bf16 errors (e_a, e_b) never to flip its order, in the rule's unit
    and in plain nats. The rule's bound of a choice is the tolerance times r = sqrt(its
    continuation ``tokens``) (tempering.scoring.choice_tolerance); for each of its normalisations
    w = 1 / length (raw: w = 1) the pair needs |e_a w_a - e_b w_b| / (r_a w_a + r_b w_b), and the
    largest of them. In nats: the same with r = 1, one bound for every choice alike (the rule
    before 2026-12-06)."""
    from tempering.scoring import choice_lengths

    items = documents(requests)
    out = []
    for members in items.values():
        for x in members:
            for y in members:
                if x < y:
                    ex, ey = bf16[x][0] - exact[x][0], bf16[y][0] - exact[y][0]
                    rx, ry = math.sqrt(max(tokens[x], 1)), math.sqrt(max(tokens[y], 1))
                    worst, flat = abs(ex - ey) / (rx + ry), abs(ex - ey) / 2
                    for lx, ly in zip(choice_lengths(requests[x].args[1]), choice_lengths(requests[y].args[1])):
                        worst = max(worst, abs(ex / lx - ey / ly) / (rx / lx + ry / ly))
                        flat = max(flat, abs(ex / lx - ey / ly) / (1 / lx + 1 / ly))
                    out.append((worst, flat))
    return out


def pair_error(requests: list, bf16: list, exact: list, tokens: list[int]) -> dict:
    """Quantiles of :func:`pair_needs` over every pair of choices of one item (``nats``: the
    plain-nats bound)."""
    needs = pair_needs(requests, bf16, exact, tokens)
    return dict(quantiles([n[0] for n in needs]), pairs=len(needs), nats=quantiles([n[1] for n in needs]))


def bf16_analysis(requests: list, raw: list, exact: list, context: list[int], tokens: list[int]) -> dict:
    """What bf16 without re-scoring (``raw``) does against float32 (``exact``): decisions, the
    error per request, the tolerance each pair of choices needs (overall and per benchmark) and
    the sweep of the near-tie rule over :data:`SWEEP` (and of the old flat rule over
    :data:`FLAT_SWEEP`)."""
    return {"parity_fp32_tempering_bf16_no_rescoring": parity(requests, exact, raw),
            "bf16_error": quantiles([abs(x[0] - y[0]) for x, y in zip(raw, exact)]),
            "bf16_pair_error": pair_error(requests, raw, exact, tokens),
            "bf16_pair_error_by_set": {
                name: pair_error(reqs, [raw[i] for i in idx], [exact[i] for i in idx], [tokens[i] for i in idx])
                for name, (reqs, idx) in split_by_set(requests).items()},
            "tolerance_sweep": tolerance_sweep(requests, raw, exact, SWEEP, context, tokens),
            "flat_tolerance_sweep": tolerance_sweep(requests, raw, exact, FLAT_SWEEP, context, tokens, scaled=False)}


def load_dump(path: str) -> tuple[list, list, list, list[int], list[int]]:
    """(requests, bf16, exact, context tokens, continuation tokens) from a ``--dump`` file; the
    requests carry what the analysis reads (benchmark, document, choice, continuation)."""
    from types import SimpleNamespace

    text = gzip.decompress(Path(path).read_bytes()).decode() if path.endswith(".gz") else Path(path).read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    requests = [SimpleNamespace(task_name=r["set"], doc_id=r["doc"], idx=r["choice"], doc={},
                                args=("", r["continuation"])) for r in rows]
    return (requests, [(r["bf16"], False) for r in rows], [(r["exact"], False) for r in rows],
            [r["context_tokens"] for r in rows], [r["continuation_tokens"] for r in rows])


def split_by_set(requests: list) -> dict:
    """{benchmark: (its requests, their indices in ``requests``)}."""
    out: dict = {}
    for i, req in enumerate(requests):
        reqs, idx = out.setdefault(req.task_name, ([], []))
        reqs.append(req)
        idx.append(i)
    return out


def dump_requests(path: str, requests: list, bf16: list, exact: list, context: list[int],
                  tokens: list[int]) -> None:
    """One JSON line per request: where it comes from, its token counts, both log-likelihoods."""
    with open(path, "w") as fh:
        for i, req in enumerate(requests):
            fh.write(json.dumps({"set": req.task_name, "doc": req.doc_id, "choice": req.idx,
                                 "continuation": req.args[1], "context_tokens": context[i],
                                 "continuation_tokens": tokens[i], "bf16": bf16[i][0],
                                 "exact": exact[i][0]}) + "\n")


def tolerance_sweep(requests: list, bf16: list, exact: list, tolerances, context: list[int],
                    tokens: list[int], scaled: bool = True) -> list[dict]:
    """Per tolerance: the requests the scorer's near-tie rule (tempering.scoring.near_tie_members
    with each request's choice_tolerance of its continuation ``tokens``, on the bf16 results,
    items = lm-eval's documents) would re-score, the tokens that costs (each re-scored item's
    ``context`` once plus its re-scored continuations, as the packed path runs them), and the
    decisions that then match the exact ones (re-scored requests take the exact values);
    ``pairs_covered``: the share of pairs of choices whose bf16 errors the bounds cover
    (:func:`pair_needs` at most the tolerance), i.e. that cannot flip however near they tie.
    ``scaled=False`` replays the rule before 2026-12-06: the tolerance in nats for every choice."""
    from tempering.scoring import choice_lengths, choice_tolerance, near_tie_members

    items = documents(requests)
    want = decisions(requests, exact)
    needs = [n[0 if scaled else 1] for n in pair_needs(requests, bf16, exact, tokens)]
    out = []
    for tol in tolerances:
        mixed = list(bf16)
        redo = cost = 0
        for members in items.values():
            lengths = [choice_lengths(requests[i].args[1]) for i in members]
            tols = [choice_tolerance(tol, tokens[i]) if scaled else tol for i in members]
            tied = [members[k] for k in near_tie_members([bf16[i][0] for i in members], lengths, tols)]
            redo += len(tied)
            cost += (context[tied[0]] + sum(tokens[i] for i in tied)) if tied else 0
            for i in tied:
                mixed[i] = exact[i]
        got = decisions(requests, mixed)
        same = sum(got[k] == want[k] for k in want)
        out.append({"tolerance": tol, "rescored_requests": redo, "rescored_share": round(redo / len(requests), 4),
                    "rescored_tokens": cost, "pairs_covered": round(sum(n <= tol for n in needs) / max(len(needs), 1), 4),
                    "same_decision": same, "same_decision_share": round(same / len(want), 4)})
    return out


def summarize(runs: list[dict], req_count: int, work_tokens: int, flops: dict, peak_gflops: float) -> dict:
    best = min(runs, key=lambda r: r["seconds"])
    executed_flops = flops["body"] * best["executed_tokens"] + flops["head"] * best["head_positions"]
    return {"seconds": [round(r["seconds"], 2) for r in runs], "best_seconds": round(best["seconds"], 2),
            "requests_per_s": round(req_count / best["seconds"], 2),
            "tokens_per_s": round(work_tokens / best["seconds"], 1),
            "executed_tokens": best["executed_tokens"], "head_positions": best["head_positions"],
            "executed_gflops": round(executed_flops / 1e9, 1),
            "mfu": round(executed_flops / best["seconds"] / (peak_gflops * 1e9), 4) if peak_gflops else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/base", help="HF model folder (python -m tasks.base_model --out DIR)")
    for name, default in (("hellaswag", 200), ("arc_easy", 100), ("arc_challenge", 100), ("boolq", 100),
                          ("piqa", 0)):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, dest=name,
                        help=f"first N items of {name} (0 = none; default {default})")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per arm, alternating")
    ap.add_argument("--per-set", action="store_true", help="also time each benchmark alone (one call per arm)")
    ap.add_argument("--precision", choices=["auto", "fp32"], default="auto", help="evaluate.precision")
    ap.add_argument("--attention", choices=["auto", "eager", "sdpa"], default="auto",
                    help="evaluate.attention: the attention kernel both arms score with")
    ap.add_argument("--batch-size", type=int, default=None, help="hf requests per forward (default: params.yaml)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="tempering tokens per forward (default: params.yaml)")
    ap.add_argument("--peak-repeats", type=int, default=10, help="matmul repeats for the peak (best of)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the float32 hf reference and the bf16-error measurement (two untimed passes)")
    ap.add_argument("--parity-only", action="store_true",
                    help="no peak, warm-up or timing: each arm scores the requests once, parity is reported")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--dump", default=None,
                    help="with the reference: write one JSON line per request (benchmark, doc, context and "
                         "continuation tokens, bf16 without re-scoring, hf float32) for offline analysis")
    ap.add_argument("--from-dump", default=None, metavar="DUMP",
                    help="no model: the bf16-vs-float32 analysis (pair errors, tolerance sweep) of a --dump file")
    a = ap.parse_args(argv)
    if a.from_dump:
        result = dict(dump=a.from_dump, **bf16_analysis(*load_dump(a.from_dump)))
        text = json.dumps(result, indent=2)
        if a.json:
            Path(a.json).write_text(text + "\n")
        print(text if not a.json else f"wrote {a.json}")
        return 0
    if a.parity_only:
        a.repeats, a.per_set, a.peak_repeats = 1, False, 0

    import torch

    from tempering.scorecard import bundle, load_model
    from tempering.config import load_params
    from tempering.train.models import causal_lm_parts
    from tempering.train.precision import quiet_transformers, setup_torch

    load_start = os.getloadavg()
    started = time.time()
    quiet_transformers()
    threads = setup_torch()
    folder = Path(a.model)
    if not (folder / "config.json").exists():
        ap.error(f"{a.model}: no model folder (python -m tasks.base_model --out {a.model})")
    params = load_params(ROOT / "params.yaml")
    specs = {b.name: b for b in params.evaluate.benchmarks}
    benches = []
    for name in SETS:
        if getattr(a, name):
            if name not in specs:
                ap.error(f"params.yaml: evaluate.benchmarks has no {name}")
            spec = specs[name].model_dump(mode="json")
            for key in ("path", "labels"):
                if spec.get(key):
                    spec[key] = str(ROOT / spec[key])
            benches.append(dict(spec, chat=False, limit=getattr(a, name)))
    common = params.evaluate.model_dump(mode="json", by_alias=True)
    common.update(benchmarks=benches, limit=None, precision=a.precision, attention=a.attention,
                  cache_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "tempering-bench-eval"))
    if a.batch_size:
        common["batch_size"] = a.batch_size
    if a.batch_tokens:
        common["batch_tokens"] = a.batch_tokens
    from tempering.config import EvaluateParams

    cfg_hf = EvaluateParams.model_validate(dict(common, backend="hf"))
    cfg_tl = EvaluateParams.model_validate(dict(common, backend="tempering"))
    info = bundle(cfg_hf)
    requests = record_requests(info)
    model, tok = load_model(folder, a.attention)
    arms = build_arms(model, tok, cfg_hf, cfg_tl)
    work_tokens = request_tokens(arms["hf"], requests)
    decoder, head = causal_lm_parts(model)
    body = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    flops = {"body": 2 * body, "head": 2 * head.weight.numel()}
    by_set: dict[str, list] = {}
    for req in requests:
        by_set.setdefault(req.task_name, []).append(req)

    amp = "bfloat16" if arms["hf"].mixed_precision_dtype == torch.bfloat16 else "float32"
    peak_dtype = "bfloat16" if amp == "bfloat16" else "float32"
    peak = {"dtype": peak_dtype, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "gflops": round(matmul_peak(peak_dtype, repeats=a.peak_repeats), 1) if a.peak_repeats else None}
    print(f"threads {threads}, load {load_start[0]:.2f}, {peak_dtype} matmul peak {peak['gflops']} GFLOP/s; "
          f"{len(requests)} requests ({', '.join(f'{k}: {len(v)}' for k, v in by_set.items())}), "
          f"{work_tokens} workload tokens, autocast {amp}", flush=True)

    for arm, lm in arms.items():  # warm-up (untimed): first-call costs, the tempering probe
        if not a.parity_only:
            lm.loglikelihood(requests[:64], disable_tqdm=True)

    runs: dict[str, list] = {"hf": [], "tempering": []}
    loads = []
    for rep in range(a.repeats):
        for arm, lm in arms.items():
            run = timed(arm, lm, requests)
            runs[arm].append(run)
            loads.append({"repeat": rep, "arm": arm, "loadavg": [round(x, 2) for x in os.getloadavg()]})
            print(f"repeat {rep + 1} {arm:>9}: {run['seconds']:.1f} s, {len(requests) / run['seconds']:.1f} req/s "
                  f"(load {loads[-1]['loadavg'][0]})", flush=True)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                          "cuda": torch.cuda.is_available(), "loadavg_start": [round(x, 2) for x in load_start]},
              "versions": {p: __import__(p.replace("-", "_")).__version__ for p in ("torch", "transformers", "lm_eval")},
              "model": str(folder), "autocast": amp, "peak": peak,
              "attention": str(model.config._attn_implementation),
              "settings": {"hf": {"batch_size": cfg_hf.batch_size, "softmax": "float32"},
                           "tempering": {"batch_tokens": cfg_tl.batch_tokens, "softmax": "float32",
                                         "rescore_tolerance": cfg_tl.rescore_tolerance}},
              "parity_only": a.parity_only,
              "requests": len(requests), "requests_by_set": {k: len(v) for k, v in by_set.items()},
              "items": {b["name"]: b["limit"] for b in benches}, "workload_tokens": work_tokens,
              "flops_per_token": {"decoder_linear": flops["body"], "lm_head": flops["head"]},
              "loads": loads}
    for arm in arms:
        result[arm] = summarize(runs[arm], len(requests), work_tokens, flops, peak["gflops"])
    best = min(runs["tempering"], key=lambda r: r["seconds"])
    result["tempering"].update({k: round(best[k], 2) if k == "rescore_seconds" else best[k] for k in RESCORE_KEYS})
    result["tempering"]["rescored_share"] = round(best["rescored_requests"] / len(requests), 4)
    result["tempering"]["rescore_share_of_seconds"] = round(best["rescore_seconds"] / best["seconds"], 4)
    result["speedup"] = round(result["hf"]["best_seconds"] / result["tempering"]["best_seconds"], 2)
    tl_results = runs["tempering"][0]["results"]
    result["parity"] = parity(requests, runs["hf"][0]["results"], tl_results)
    print(f"hf {result['hf']['requests_per_s']} req/s, tempering {result['tempering']['requests_per_s']} req/s: "
          f"{result['speedup']}x; MFU {result['hf']['mfu']} vs {result['tempering']['mfu']}; "
          f"re-scored {result['tempering']['rescored_requests']} requests "
          f"({result['tempering']['rescored_share']:.1%}, {result['tempering']['rescore_seconds']} s)", flush=True)
    print(f"parity vs hf bf16 {result['parity']}", flush=True)

    if not a.no_reference:  # untimed: hf in float32 (the reference), tempering bf16 without re-scoring
        from tempering.scorecard import scoring_lm

        t = time.perf_counter()
        exact = scoring_lm(model, tok, cfg_hf.model_copy(update={"precision": "fp32"})).loglikelihood(
            requests, disable_tqdm=True)
        fp32_seconds = time.perf_counter() - t
        raw_lm = scoring_lm(model, tok, cfg_tl.model_copy(update={"rescore_tolerance": 0.0}))
        raw = raw_lm.loglikelihood(requests, disable_tqdm=True)
        result["reference"] = {"arm": "hf, float32 (no autocast), untimed", "seconds_one_call": round(fp32_seconds, 1)}
        result["parity_fp32"] = parity(requests, exact, tl_results)
        result["parity_fp32_hf_bf16"] = parity(requests, exact, runs["hf"][0]["results"])
        pairs = [encoded(arms["tempering"], req) for req in requests]
        context, tokens = [len(c) for c, _ in pairs], [len(t) for _, t in pairs]
        result.update(bf16_analysis(requests, raw, exact, context, tokens))
        if a.dump:
            dump_requests(a.dump, requests, raw, exact, context, tokens)
        print(f"parity vs hf fp32 {result['parity_fp32']}\nhf bf16 vs hf fp32 {result['parity_fp32_hf_bf16']}\n"
              f"tempering bf16 without re-scoring vs hf fp32 {result['parity_fp32_tempering_bf16_no_rescoring']}\n"
              f"bf16 error per request {result['bf16_error']}\n"
              f"tolerance needed per pair of choices {result['bf16_pair_error']}", flush=True)
        for row in result["tolerance_sweep"]:
            print(f"  tolerance {row['tolerance']}: re-scored {row['rescored_share']:.1%} "
                  f"({row['rescored_tokens']} tokens), "
                  f"same decision as fp32 {row['same_decision_share']:.2%}", flush=True)

    if a.per_set:
        result["per_set"] = {}
        for name, reqs in by_set.items():
            tokens = request_tokens(arms["hf"], reqs)
            per = {arm: summarize([timed(arm, lm, reqs)], len(reqs), tokens, flops, peak["gflops"])
                   for arm, lm in arms.items()}
            per["speedup"] = round(per["hf"]["best_seconds"] / per["tempering"]["best_seconds"], 2)
            per["requests"], per["workload_tokens"] = len(reqs), tokens
            result["per_set"][name] = per
            print(f"  {name}: {len(reqs)} requests, hf {per['hf']['requests_per_s']} req/s, tempering "
                  f"{per['tempering']['requests_per_s']} req/s: {per['speedup']}x", flush=True)

    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.time() - started, 1)
    print(f"wall {result['wall_s']} s, load at end {result['loadavg_end'][0]}", flush=True)
    text = json.dumps(result, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
