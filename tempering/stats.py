"""Paired statistics for the gate and for sizing evaluation: intervals, one-sided tests, Holm / BH,
power and the item counts a margin needs; and the Wilson interval of one proportion (the run
report's whiskers).

Everything here is about a *paired* comparison: two models scored on the same items (or texts),
so each item gives one difference ``d_i = candidate_i - reference_i`` and the noise that matters
is the spread of those differences, not of each model's accuracy. For 0/1 accuracies the variance
of a difference is driven by the *discordant* items (one model right, the other wrong): with a
share ``p_d`` of discordant items and a true difference near 0, ``var(d) ~= p_d``.

The gate asks one-sided questions, with the burden of proof on the candidate:

- non-inferiority (forgetting, champion): H0 ``delta <= -margin``; certified when H0 is rejected,
  i.e. when the lower end of the interval is at least ``-margin``;
- superiority over a minimum (domain gain): H0 ``delta <= minimum``;
- an upper limit (drift: KL, perplexity ratio): H0 ``statistic >= limit``.

A two-sided interval at ``confidence`` (0.95) has a lower end that is a one-sided test at
``alpha = (1 - confidence) / 2`` (0.025): the rule "the lower end of the 95% interval is at least
``-margin``" is exactly "reject H0 at one-sided 2.5%". Families of such tests are corrected with
Holm (family-wise error) or Benjamini-Hochberg (false discovery rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

_N = NormalDist()


def z(p: float) -> float:
    """The standard normal quantile."""
    return _N.inv_cdf(p)


def one_sided_alpha(confidence: float) -> float:
    """The one-sided level of a two-sided interval at ``confidence``."""
    return (1.0 - confidence) / 2.0


# ----------------------------------------------------------------------------- planning


def min_detectable(n: int, discordance: float, alpha: float, power: float) -> float:
    """The smallest true drop a one-sided paired test at ``alpha`` detects with ``power``, on ``n``
    items whose share of discordant pairs is ``discordance`` (normal approximation, true
    difference near 0: ``(z_{1-alpha} + z_power) * sqrt(discordance / n)``).

    Read the other way round, it is the non-inferiority margin ``n`` items can certify: a
    candidate that truly forgot nothing has ``power`` probability of being certified within a
    margin this large, and no chance within a smaller one."""
    if n <= 0:
        return math.inf
    return (z(1.0 - alpha) + z(power)) * math.sqrt(max(discordance, 0.0) / n)


def required_items(margin: float, discordance: float, alpha: float, power: float) -> int:
    """Items needed so that :func:`min_detectable` is at most ``margin``."""
    if margin <= 0:
        raise ValueError(f"margin must be > 0 (got {margin})")
    return max(1, math.ceil(((z(1.0 - alpha) + z(power)) / margin) ** 2 * max(discordance, 0.0)))


def planning_alpha(confidence: float, multiplicity: str, family_size: int) -> float:
    """The level a non-inferiority check is planned at: one-sided, Bonferroni over its family
    (Holm's first step, so the plan holds whatever the other checks do)."""
    a = one_sided_alpha(confidence)
    return a / max(1, family_size) if multiplicity != "none" else a


def preference_accuracy(margin: float) -> float:
    """One preference pair's accuracy from its margin log p(chosen) - log p(rejected): 1 when the
    model puts more probability on the chosen answer, 0 when on the rejected one, a tie half."""
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


def discordance(xs: list[float], ys: list[float]) -> float:
    """Share of items on which the two models disagree (0/1 scores; any difference counts)."""
    if not xs:
        return float("nan")
    return sum(1 for x, y in zip(xs, ys) if x != y) / len(xs)


# ----------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class OneSided:
    """A one-sided test of a paired statistic against a bound.

    ``estimate``: the observed statistic; ``ci``: the two-sided interval at the configured
    confidence (for the report); ``p_value``: of H0 (the side the candidate must disprove)."""

    estimate: float
    ci: tuple[float, float]
    p_value: float


def _bootstrap_means(diffs, iters: int, seed: int):
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    chunk = max(1, 2_000_000 // max(d.size, 1))  # bounded memory for large benchmarks
    for start in range(0, iters, chunk):
        k = min(chunk, iters - start)
        means[start:start + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    return means


def mean_lower_test(diffs: list[float], bound: float, *, method: str, confidence: float, iters: int,
                    seed: int) -> OneSided:
    """Test H0 ``mean(diffs) <= bound`` (the candidate must show the mean lies above ``bound``).

    ``method``: ``bootstrap`` (percentile bootstrap over items; p = share of resampled means at or
    below ``bound``, with the +1 correction) or ``normal`` (the paired normal interval whose
    variance is the discordant share: McNemar's setting for 0/1 scores)."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError("no finite differences to test")
    est = float(d.mean())
    a = one_sided_alpha(confidence)
    if np.all(d == d[0]):  # no spread at all: the estimate is the whole story
        return OneSided(est, (est, est), 0.0 if est > bound else 1.0)
    if method == "bootstrap":
        means = _bootstrap_means(d, iters, seed)
        lo, hi = np.quantile(means, [a, 1.0 - a])
        p = (1 + int(np.count_nonzero(means <= bound))) / (iters + 1)
        return OneSided(est, (float(lo), float(hi)), float(min(1.0, p)))
    if method == "normal":
        se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
        half = z(1.0 - a) * se
        p = 0.0 if se == 0 else 1.0 - _N.cdf((est - bound) / se)
        if se == 0 and est <= bound:
            p = 1.0
        return OneSided(est, (est - half, est + half), float(p))
    raise ValueError(f"unknown method {method!r}")


def ratio_upper_test(num: list[float], den: list[float], limit: float, *, confidence: float, iters: int,
                     seed: int) -> OneSided:
    """Test H0 ``sum(num) / sum(den) >= limit`` by a bootstrap over units (texts).

    The statistic is a ratio of sums, so tokens weight the texts as a per-token mean should. The
    candidate must show the statistic lies below ``limit``. (A perplexity ratio is tested on the
    log scale: a mean per-token log-likelihood gap against ``log(limit)``.)"""
    import numpy as np

    x = np.asarray(num, dtype=np.float64)
    w = np.asarray(den, dtype=np.float64)
    if x.size == 0 or x.size != w.size or not (np.all(np.isfinite(x)) and np.all(np.isfinite(w))) or w.sum() <= 0:
        raise ValueError("no finite per-text values to test")
    est = float(x.sum() / w.sum())
    a = one_sided_alpha(confidence)
    rng = np.random.default_rng(seed)
    stats = np.empty(iters)
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, iters, chunk):
        k = min(chunk, iters - start)
        idx = rng.integers(0, x.size, size=(k, x.size))
        stats[start:start + k] = x[idx].sum(axis=1) / w[idx].sum(axis=1)
    lo, hi = np.quantile(stats, [a, 1.0 - a])
    if np.allclose(stats, est, rtol=0.0, atol=1e-15):  # no spread: the estimate is the whole story
        return OneSided(est, (est, est), 0.0 if est < limit else 1.0)
    p = (1 + int(np.count_nonzero(stats >= limit))) / (iters + 1)
    return OneSided(est, (float(lo), float(hi)), float(min(1.0, p)))


# ----------------------------------------------------------------------------- multiplicity


def holm(p_values: list[float], alpha: float) -> tuple[list[bool], list[float]]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise error ``alpha``,
    and the Holm-adjusted p-values (monotone; compare each with ``alpha``)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return [adj <= alpha for adj in adjusted], adjusted


def benjamini_hochberg(p_values: list[float], alpha: float) -> tuple[list[bool], list[float]]:
    """Benjamini-Hochberg step-up: rejections at false discovery rate ``alpha`` and adjusted p."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, p_values[i] * m / (rank + 1))
        adjusted[i] = min(1.0, running)
    return [adj <= alpha for adj in adjusted], adjusted


def adjust(p_values: list[float], alpha: float, method: str) -> tuple[list[bool], list[float]]:
    if method == "holm":
        return holm(p_values, alpha)
    if method == "bh":
        return benjamini_hochberg(p_values, alpha)
    if method == "none":
        return [p <= alpha for p in p_values], list(p_values)
    raise ValueError(f"unknown multiplicity correction {method!r}")


# ----------------------------------------------------------------------------- one proportion

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` measured on ``n`` items (the report's whiskers
    around each model's benchmark score; unpaired, unlike everything above)."""
    if n <= 0:
        return (p, p)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / denom
    return (max(0.0, center - half), min(1.0, center + half))
