"""Stage ``gate``: promote or not, with a reason for every threshold.

    python -m tasks.gate --evaluation metrics/evaluate.json --samples eval/samples \
        --report reports/gate.md --metrics metrics/gate.json

:func:`decide` is a pure function over the evaluation record (and the per-item results, when
given) that returns a :class:`Verdict`: passed or not, and one :class:`Check` per threshold with
its value, delta, interval and verdict. The thresholds (``gate`` in ``params.yaml``):

- **gain**, every ``domain`` benchmark: the candidate must beat the base by ``min_domain_gain``.
  With an interval test it fails when the whole interval lies below ``min_domain_gain`` (the data
  say the gain is too small) or, for a positive minimum, when the interval reaches 0 (the
  candidate is not *measurably* better than the base).
- **forgetting**, every ``general`` benchmark: the drop from the base may be at most its
  ``max_forgetting`` budget. With an interval test it fails only when the whole interval of the
  drop lies above the budget, so noise alone never rejects a model: the same model scored twice
  passes every forgetting and champion check.
- **kl** / **perplexity**, every ``general`` benchmark, when ``max_kl`` / ``max_perplexity_ratio``
  are set: label-free forgetting signals (point values; the evaluate stage measures them).
- **champion**, every ``domain`` benchmark, when ``min_gain_vs_production`` is set and a
  production model was scored: the candidate must not fall short of production by more than the
  interval allows.

Deltas are paired (the same items for both models): ``test: bootstrap`` resamples items
(``bootstrap_iters`` times, seeded); ``test: mcnemar`` uses the normal interval of a paired
difference of proportions built from the discordant pairs (McNemar's statistic, with its exact
p-value); ``test: none`` judges the point estimates. ``confidence`` sets the two-sided level.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tempering import TemperingError
from tempering.cli import stage_main
from tempering.config import GateParams, Params
from tempering.io import read_json, read_jsonl, write_json, write_text

EPS = 1e-9


@dataclass(frozen=True)
class Check:
    benchmark: str
    kind: str            # gain | forgetting | champion
    threshold: float     # min gain (gain, champion) or max drop (forgetting)
    candidate: float
    reference: float     # the base's (gain, forgetting) or production's (champion) score
    delta: float         # candidate - reference
    ci: tuple[float, float] | None
    n: int
    passed: bool
    reason: str
    p_value: float | None = None


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: tuple[Check, ...]
    test: str
    confidence: float
    metric: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def reasons(self) -> list[str]:
        """Every failed threshold (and structural problem), one line each."""
        return list(self.notes) + [c.reason for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "test": self.test,
                "confidence": self.confidence, "metric": self.metric,
                "checks": [dict(asdict(c), ci=list(c.ci) if c.ci else None) for c in self.checks],
                "n_checks": len(self.checks), "n_failed": sum(not c.passed for c in self.checks)}


# ----------------------------------------------------------------------------- statistics


def paired(cand: list[dict], ref: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """Per-item scores of two models on the items both were scored on (matched by ``doc_id``)."""
    ref_by_id = {r["doc_id"]: float(r[metric]) for r in ref}
    xs, ys = [], []
    for row in cand:
        if row["doc_id"] in ref_by_id:
            xs.append(float(row[metric]))
            ys.append(ref_by_id[row["doc_id"]])
    return xs, ys


def bootstrap_ci(diffs: list[float], confidence: float, iters: int, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean paired difference, resampling items."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return (float("nan"), float("nan"))
    if np.all(d == d[0]):
        return (float(d[0]), float(d[0]))
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    chunk = max(1, 2_000_000 // d.size)  # bounded memory for large benchmarks
    for start in range(0, iters, chunk):
        k = min(chunk, iters - start)
        means[start:start + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def mcnemar_ci(xs: list[float], ys: list[float], confidence: float) -> tuple[tuple[float, float], float]:
    """Normal interval of the paired difference of proportions, and McNemar's exact p-value."""
    n = len(xs)
    if n == 0:
        return (float("nan"), float("nan")), float("nan")
    b = sum(1 for x, y in zip(xs, ys) if x > 0.5 >= y)  # candidate right, reference wrong
    c = sum(1 for x, y in zip(xs, ys) if y > 0.5 >= x)  # candidate wrong, reference right
    delta = (b - c) / n
    var = max(0.0, ((b + c) - (b - c) ** 2 / n) / n ** 2)
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    half = z * math.sqrt(var)
    k, m = min(b, c), b + c
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    return (delta - half, delta + half), p


def _interval(xs, ys, cfg: GateParams, salt: int) -> tuple[tuple[float, float] | None, float | None]:
    if cfg.test == "none" or not xs:
        return None, None
    if cfg.test == "mcnemar":
        return mcnemar_ci(xs, ys, cfg.confidence)
    diffs = [x - y for x, y in zip(xs, ys)]
    return bootstrap_ci(diffs, cfg.confidence, cfg.bootstrap_iters, cfg.seed + salt), None


# ----------------------------------------------------------------------------- the decision


def _fmt_ci(ci) -> str:
    return "" if ci is None else f", {ci[0]:+.3f} to {ci[1]:+.3f}"


def _judge(kind: str, name: str, threshold: float, cand: float, ref: float, delta: float, ci, n: int,
           level: str, p_value: float | None) -> Check:
    lo, hi = ci if ci is not None else (delta, delta)
    where = f"{name}: {kind}"
    scores = f"candidate {cand:.3f} vs {'production' if kind == 'champion' else 'base'} {ref:.3f}"
    shown = f"delta {delta:+.3f}{_fmt_ci(ci)} at {level}" if ci is not None else f"delta {delta:+.3f}"
    if kind == "forgetting":
        passed = -hi <= threshold + EPS
        why = (f"{where}: drop {-delta:.3f} is within the budget {threshold:.3f} ({scores}; {shown})" if passed else
               f"{where}: dropped {-delta:.3f}, over the budget {threshold:.3f}"
               + (f" even at the interval's best ({-hi:.3f})" if ci is not None else "") + f" ({scores}; {shown})")
    elif kind == "gain":
        below = hi < threshold - EPS
        not_better = ci is not None and threshold > 0 and lo <= 0
        passed = not below and not not_better
        if passed:
            why = f"{where}: gained {delta:+.3f}, at least {threshold:.3f} ({scores}; {shown})"
        elif below:
            why = (f"{where}: gained {delta:+.3f}, less than the required {threshold:.3f}"
                   + (" across the whole interval" if ci is not None else "") + f" ({scores}; {shown})")
        else:
            why = (f"{where}: gain {delta:+.3f} is not measurably above 0 (the interval reaches {lo:+.3f}; "
                   f"{scores}; {shown})")
    else:  # champion
        passed = hi >= threshold - EPS
        why = (f"{where}: {delta:+.3f} vs production, required {threshold:+.3f} ({scores}; {shown})" if passed else
               f"{where}: {delta:+.3f} vs production, short of the required {threshold:+.3f}"
               + (" across the whole interval" if ci is not None else "") + f" ({scores}; {shown})")
    return Check(benchmark=name, kind=kind, threshold=threshold, candidate=cand, reference=ref, delta=delta,
                 ci=ci, n=n, passed=passed, reason=why, p_value=p_value)


def _signal_checks(name: str, b: dict, cfg: GateParams) -> list[Check]:
    """Label-free forgetting thresholds (point values): KL from the base, perplexity ratio."""
    out = []
    n = int(b.get("n") or 0)
    if cfg.max_kl is not None and b.get("kl_vs_base") is not None:
        kl = float(b["kl_vs_base"])
        ok = kl <= cfg.max_kl + EPS
        out.append(Check(benchmark=name, kind="kl", threshold=cfg.max_kl, candidate=kl, reference=0.0, delta=kl,
                         ci=None, n=n, passed=ok,
                         reason=f"{name}: kl: mean per-token KL from the base {kl:.4f} "
                                f"{'within' if ok else 'over'} the limit {cfg.max_kl:.4f}"))
    ppl_c = (b.get("candidate") or {}).get("perplexity")
    ppl_b = (b.get("base") or {}).get("perplexity")
    if cfg.max_perplexity_ratio is not None and ppl_c and ppl_b:
        ratio = float(ppl_c) / float(ppl_b)
        ok = ratio <= cfg.max_perplexity_ratio + EPS
        out.append(Check(benchmark=name, kind="perplexity", threshold=cfg.max_perplexity_ratio, candidate=float(ppl_c),
                         reference=float(ppl_b), delta=ratio, ci=None, n=n, passed=ok,
                         reason=f"{name}: perplexity: candidate {ppl_c:.2f} vs base {ppl_b:.2f} is x{ratio:.2f}, "
                                f"{'within' if ok else 'over'} the limit x{cfg.max_perplexity_ratio:.2f}"))
    return out


def decide(evaluation: dict, samples: dict | None, cfg: GateParams) -> Verdict:
    """The gate: one check per threshold; passed only when every check passes.

    ``evaluation`` is ``metrics/evaluate.json``; ``samples`` is ``{model: {benchmark: [rows]}}``
    (``load_samples``) or None to judge the aggregate scores alone.
    """
    metric = cfg.metric
    use_items = samples is not None and cfg.test != "none"
    level = f"{cfg.confidence:.0%} {cfg.test}"
    checks: list[Check] = []
    notes: list[str] = []
    benchmarks = evaluation.get("benchmarks") or {}
    if not any(b.get("role") == "domain" for b in benchmarks.values()):
        notes.append("no domain benchmark was scored: nothing shows the candidate is better")
    for i, (name, b) in enumerate(sorted(benchmarks.items())):
        role = b.get("role")
        comparisons = []
        if role == "domain":
            comparisons.append(("gain", "base", cfg.min_domain_gain))
            if cfg.min_gain_vs_production is not None and "production" in b:
                comparisons.append(("champion", "production", cfg.min_gain_vs_production))
        elif role == "general":
            budget = cfg.max_forgetting.get(name, cfg.max_forgetting.get("default"))
            if budget is None:
                notes.append(f"{name}: no forgetting budget (set gate.max_forgetting.{name} or default)")
                continue
            comparisons.append(("forgetting", "base", budget))
        else:
            notes.append(f"{name}: unknown role {role!r}")
            continue
        for j, (kind, ref_name, threshold) in enumerate(comparisons):
            try:
                cand, ref = float(b["candidate"][metric]), float(b[ref_name][metric])
            except (KeyError, TypeError):
                notes.append(f"{name}: no {metric} for the candidate and the {ref_name}")
                continue
            ci, p_value, n = None, None, int(b.get("n") or 0)
            delta = cand - ref
            if use_items:
                try:
                    xs, ys = paired(samples["candidate"][name], samples[ref_name][name], metric)
                except KeyError:
                    notes.append(f"{name}: per-item results of the candidate or the {ref_name} are missing")
                    continue
                if not xs:
                    notes.append(f"{name}: the candidate and the {ref_name} share no scored items")
                    continue
                n = len(xs)
                delta = sum(xs) / n - sum(ys) / n
                cand, ref = sum(xs) / n, sum(ys) / n
                ci, p_value = _interval(xs, ys, cfg, salt=1000 * i + j)
            checks.append(_judge(kind, name, threshold, cand, ref, delta, ci, n, level, p_value))
        if role == "general":
            checks += _signal_checks(name, b, cfg)
    passed = not notes and bool(checks) and all(c.passed for c in checks)
    return Verdict(passed=passed, checks=tuple(checks), test=cfg.test if use_items else "none",
                   confidence=cfg.confidence, metric=metric, notes=tuple(notes))


# ----------------------------------------------------------------------------- io


def load_samples(folder: str | Path) -> dict:
    """``eval/samples/<model>/<benchmark>.jsonl`` -> {model: {benchmark: rows}}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TemperingError(f"{folder}: per-item results not found (run the evaluate stage)")
    out: dict[str, dict] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        out[sub.name] = {f.stem: read_jsonl(f) for f in sorted(sub.glob("*.jsonl"))}
    return out


def to_markdown(verdict: Verdict) -> str:
    lines = [f"# Gate: {'PASSED' if verdict.passed else 'FAILED'}", "",
             f"Metric `{verdict.metric}`; deltas judged by `{verdict.test}`"
             + (f" at {verdict.confidence:.0%} confidence." if verdict.test != "none" else " (point estimates)."), ""]
    if verdict.notes:
        lines += [f"- **{n}**" for n in verdict.notes] + [""]
    lines += ["| benchmark | check | threshold | candidate | reference | delta | interval | n | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in verdict.checks:
        ci = f"[{c.ci[0]:+.3f}, {c.ci[1]:+.3f}]" if c.ci else "-"
        lines.append(f"| {c.benchmark} | {c.kind} | {c.threshold:.3f} | {c.candidate:.3f} | {c.reference:.3f} "
                     f"| {c.delta:+.3f} | {ci} | {c.n} | {'pass' if c.passed else '**FAIL**'} |")
    lines += ["", "## Reasons", ""] + [f"- {'PASS' if c.passed else 'FAIL'}: {c.reason}" for c in verdict.checks]
    lines += [f"- FAIL: {n}" for n in verdict.notes]
    return "\n".join(lines) + "\n"


def run(params: Params, evaluation: str, samples: str | None, report: str, metrics: str) -> dict:
    record = read_json(evaluation)
    per_item = load_samples(samples) if samples else None
    verdict = decide(record, per_item, params.gate)
    result = dict(verdict.to_dict(), bundle_hash=record.get("bundle_hash"),
                  candidate=(record.get("models") or {}).get("candidate"))
    write_text(report, to_markdown(verdict))
    write_json(metrics, result)
    return {"passed": verdict.passed, "reasons": verdict.reasons}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evaluation", default="metrics/evaluate.json", help="the evaluate stage's metrics")
    parser.add_argument("--samples", default="eval/samples", help="per-item results (omit for point estimates)")
    parser.add_argument("--report", default="reports/gate.md")
    parser.add_argument("--metrics", default="metrics/gate.json")


def main(argv=None) -> int:
    return stage_main("gate", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
