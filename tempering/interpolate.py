"""Weight interpolation toward the base (WiSE-FT) and the dev sweep that picks its scale.

    merged = base + alpha * (tuned - base)

Fine-tuning moves the weights along a direction that both learns the domain and forgets; scaling
the move back trades one for the other (Wortsman et al. 2022, "Robust fine-tuning of zero-shot
models"; for LoRA, alpha is the adapter scale). The export stage (``export.interpolation``) scores
every alpha of a small grid on the **dev split** (``evaluate.dev``: dev domain questions and dev
drift texts, disjoint from everything the gate reads, :func:`tempering.benchmarks.check_dev_disjoint`)
and keeps the alpha with the largest dev domain gain whose dev drift stays within the gate's
limits (:func:`choose`). The curve and the choice go to ``metrics/export.json`` ``interpolation``
and the report plots it: the learn / forget frontier of this run.

Owns: :class:`Interpolation` (the tuned and base weights, ``set(alpha)`` in place), :func:`dev_point`
(one alpha's dev scores), :func:`choose` (pure: the rule, with its reason) and :func:`sweep`.
Scoring goes through :mod:`tempering.scorecard`, exactly as ``evaluate`` scores, so a dev number
means what the gate's number means.

What the choice can and cannot certify: the dev split is a different sample of the same kind of
items, so the kept alpha is chosen without looking at the gate's items, and the gate then judges
that one model on its own items. The dev domain questions ask about the same facts as the gate's
(other wordings), so a dev gain predicts the gate's gain; it does not replace it.
"""

from __future__ import annotations

import math
import time

from tempering import TemperingError
from tempering.config import EvaluateParams, GateParams, InterpolationParams


class Interpolation:
    """``model``'s parameters become ``base + alpha * (tuned - base)`` on :meth:`set`.

    The tuned weights are copied once (float32, one model's worth of memory); the base weights
    are read from ``base_model`` (same architecture and shapes, else a clear error). Buffers are
    not interpolated (they are not trained)."""

    def __init__(self, model, base_model):
        import torch

        base = dict(base_model.named_parameters())
        self.params = dict(model.named_parameters())
        missing = sorted(set(self.params) - set(base))
        if missing:
            raise TemperingError(f"export.interpolation: the base model has no parameter {missing[0]} "
                                 "(interpolation needs the tuned model's architecture)")
        for name, p in self.params.items():
            if tuple(base[name].shape) != tuple(p.shape):
                raise TemperingError(f"export.interpolation: {name}: tuned shape {tuple(p.shape)} != base shape "
                                     f"{tuple(base[name].shape)} (a resized vocabulary cannot be interpolated)")
        with torch.no_grad():
            self.tuned = {n: p.detach().to(torch.float32).clone() for n, p in self.params.items()}
            self.base = {n: base[n].detach().to(device=p.device, dtype=torch.float32) for n, p in self.params.items()}
        self.alpha = 1.0

    def set(self, alpha: float) -> None:
        import torch

        with torch.no_grad():
            for name, p in self.params.items():
                b, t = self.base[name], self.tuned[name]
                p.copy_(t if alpha == 1.0 else torch.lerp(b, t, float(alpha)))
        self.alpha = float(alpha)

    def delta_norm(self) -> float:
        """||tuned - base|| over every parameter (how far training moved the weights)."""
        total = 0.0
        for name, t in self.tuned.items():
            total += float((t - self.base[name]).double().pow(2).sum())
        return math.sqrt(total)


def _drift_bounds(records: list[dict], gate: GateParams, seed: int) -> dict:
    from tempering import stats

    tokens = [float(r["tokens"]) for r in records]
    kl = stats.ratio_upper_test([float(r["kl"]) for r in records], tokens, gate.max_kl or 1.0,
                                confidence=gate.confidence, iters=gate.bootstrap_iters, seed=seed)
    gap = stats.ratio_upper_test([float(r["nll_candidate"]) - float(r["nll_base"]) for r in records], tokens,
                                 math.log(gate.max_perplexity_ratio or 2.0), confidence=gate.confidence,
                                 iters=gate.bootstrap_iters, seed=seed + 1)
    return {"texts": len(records), "kl": kl.estimate, "kl_upper": kl.ci[1],
            "perplexity_ratio": math.exp(gap.estimate), "perplexity_ratio_upper": math.exp(gap.ci[1])}


def limits(gate: GateParams, headroom: float = 0.0) -> tuple[float | None, float | None]:
    """(KL limit, perplexity-ratio limit) a dev point must keep its upper interval ends within:
    the gate's, less ``headroom`` (export.interpolation.headroom) of each: of the KL limit, and of
    the perplexity ratio's excess over 1."""
    kl = gate.max_kl * (1.0 - headroom) if gate.max_kl is not None else None
    ratio = 1.0 + (gate.max_perplexity_ratio - 1.0) * (1.0 - headroom) \
        if gate.max_perplexity_ratio is not None else None
    return kl, ratio


def within_limits(drift: dict | None, gate: GateParams, headroom: float = 0.0) -> bool | None:
    """Whether a point's dev drift (upper interval ends) is within the gate's limits less
    ``headroom`` (:func:`limits`); None when there is nothing to judge (no dev drift texts, or
    no limits)."""
    if not drift or not drift.get("texts"):
        return None
    max_kl, max_ratio = limits(gate, headroom)
    checks = []
    if max_kl is not None:
        checks.append(drift["kl_upper"] <= max_kl)
    if max_ratio is not None:
        checks.append(drift["perplexity_ratio_upper"] <= max_ratio)
    return all(checks) if checks else None


def choose(points: list[dict], gate: GateParams, headroom: float = 0.0) -> tuple[float, str]:
    """(alpha, reason). The rule: among the alphas whose dev drift is within the gate's limits,
    the largest mean dev domain gain (a tie goes to the smaller alpha: the same gain for less
    drift); with no dev domain benchmark, the largest alpha within the limits. When no alpha is
    within the limits, the one with the least dev KL (the gate will refuse it, saying why); with
    no dev drift texts, the largest dev domain gain (the sweep cannot see forgetting: said so)."""
    if not points:
        raise ValueError("no sweep points")
    by_alpha = sorted(points, key=lambda p: -p["alpha"])
    judged = [(p, within_limits(p.get("drift"), gate, headroom)) for p in by_alpha]
    has_domain = all(p.get("domain_gain") is not None for p in points)

    def gain(p):
        return p["domain_gain"] if has_domain else p["alpha"]

    if all(ok is None for _, ok in judged):
        if not has_domain:
            return 1.0 if any(p["alpha"] == 1.0 for p in points) else by_alpha[0]["alpha"], \
                "no dev domain benchmark and no dev drift texts: the model as trained (nothing to choose on)"
        best = max(by_alpha, key=lambda p: (gain(p), -p["alpha"]))
        return best["alpha"], (f"alpha {best['alpha']:g}: the largest dev domain gain ({best['domain_gain']:+.3f}); "
                               "no dev drift texts, so the sweep could not see forgetting")
    ok = [p for p, fine in judged if fine]
    if ok:
        best = max(ok, key=lambda p: (gain(p), -p["alpha"]))
        d = best["drift"]
        what = (f"the largest dev domain gain ({best['domain_gain']:+.3f})" if has_domain
                else "the largest alpha (no dev domain benchmark)")
        room = f" less {headroom:.0%} headroom" if headroom else ""
        return best["alpha"], (f"alpha {best['alpha']:g}: {what} among the {len(ok)} of {len(points)} alphas whose "
                               f"dev drift is within the gate's limits{room} (KL upper {d['kl_upper']:.3f}, perplexity "
                               f"ratio upper {d['perplexity_ratio_upper']:.3f})")
    best = min(by_alpha, key=lambda p: (p["drift"]["kl_upper"], p["alpha"]))
    return best["alpha"], (f"alpha {best['alpha']:g}: no alpha keeps dev drift within the gate's limits"
                           f"{f' less {headroom:.0%} headroom' if headroom else ''}; the "
                           f"least dev KL (upper {best['drift']['kl_upper']:.3f}) was kept and the gate will judge it")


def dev_point(alpha: float, model, tok, dev_info: dict | None, dev_cfg: EvaluateParams, base_mc: dict,
              drift_rows: list[dict], base_lp, gate: GateParams, metric: str, headroom: float = 0.0) -> dict:
    """One alpha's dev scores: each dev domain benchmark's accuracy and gain over the base, and
    the dev drift (KL from the base and the perplexity ratio, with their upper interval ends)."""
    from tempering import scorecard

    t0 = time.time()
    point: dict = {"alpha": float(alpha), "domain": {}, "domain_gain": None, "drift": None}
    if dev_info is not None:
        mc = scorecard.multiple_choice(model, tok, dev_info, dev_cfg)
        for name, res in mc.items():
            point["domain"][name] = {"acc": res[metric], "base": base_mc[name][metric],
                                     "gain": res[metric] - base_mc[name][metric], "n": res["n"]}
        point["domain_gain"] = sum(v["gain"] for v in point["domain"].values()) / len(point["domain"])
    if drift_rows:
        records = scorecard.drift_records(model, base_lp, tok, drift_rows, dev_cfg)
        point["drift"] = _drift_bounds(records, gate, seed=gate.seed)
        summary = scorecard.drift_summary(records)  # point values per kind: which texts drift
        point["drift"]["by_kind"] = {kind: {"kl": summary[f"kl_{kind}"], "perplexity_ratio": summary[f"perplexity_ratio_{kind}"]}
                                     for kind in ("text", "chat") if f"kl_{kind}" in summary}
    point["within_limits"] = within_limits(point["drift"], gate, headroom)
    point["seconds"] = round(time.time() - t0, 2)
    return point


def sweep(model, tok, base_model, base_tok, cfg: InterpolationParams, evaluate: EvaluateParams,
          gate: GateParams, log=print) -> dict:
    """Score every alpha of ``cfg.alphas`` on the dev split, set ``model`` to the kept one and
    return the record: ``{alphas, points, chosen, reason, base, dev, seconds}``."""
    from tempering import benchmarks, scorecard

    started = time.time()
    benchmarks.check_dev_disjoint(evaluate)
    dev_cfg = benchmarks.dev_view(evaluate)
    dev_info = scorecard.bundle(dev_cfg, gate) if dev_cfg.benchmarks else None
    drift_rows = benchmarks.drift_texts(dev_cfg)
    if dev_info is None and not drift_rows:
        raise TemperingError("export.interpolation: evaluate.dev has neither dev benchmarks nor dev drift texts "
                             "(nothing to choose alpha on; set export.interpolation.enabled: false)")
    metric = gate.metric
    # The base is scored with its own tokenizer (chat template) on the domain side, as evaluate
    # scores it; drift reads both models through the candidate's tokenizer, as evaluate does.
    base_mc = scorecard.multiple_choice(base_model, base_tok, dev_info, dev_cfg) if dev_info is not None else {}
    base_lp = scorecard.base_logprobs(base_model, tok, drift_rows, dev_cfg) if drift_rows else None
    interp = Interpolation(model, base_model)
    points = []
    for alpha in cfg.alphas:
        interp.set(alpha)
        point = dev_point(alpha, model, tok, dev_info, dev_cfg, base_mc, drift_rows, base_lp, gate, metric,
                          cfg.headroom)
        points.append(point)
        d = point["drift"] or {}
        log(f"export.interpolation: alpha {alpha:g}: dev domain gain "
            f"{'n/a' if point['domain_gain'] is None else format(point['domain_gain'], '+.3f')}, KL "
            f"{d.get('kl', float('nan')):.3f} (upper {d.get('kl_upper', float('nan')):.3f}), perplexity ratio "
            f"{d.get('perplexity_ratio', float('nan')):.3f} ({point['seconds']:.0f} s)")
    alpha, reason = choose(points, gate, cfg.headroom)
    interp.set(alpha)
    norm = interp.delta_norm()
    del interp, base_lp
    log(f"export.interpolation: kept {reason}")
    return {"alphas": list(cfg.alphas), "points": points, "chosen": alpha, "reason": reason,
            "headroom": cfg.headroom,
            "metric": metric, "delta_norm": round(norm, 4),
            "base": {name: {metric: v[metric], "n": v["n"]} for name, v in base_mc.items()},
            "dev": {"benchmarks": {n: {"path": b.get("path"), "n": b.get("n"), "items_hash": b.get("items_hash")}
                                   for n, b in (dev_info or {}).get("benchmarks", {}).items()},
                    "drift_path": dev_cfg.drift.path, "drift_texts": len(drift_rows)},
            "limits": {"max_kl": gate.max_kl, "max_perplexity_ratio": gate.max_perplexity_ratio,
                       "confidence": gate.confidence},
            "seconds": round(time.time() - started, 2)}
