"""Stage ``gate``: promote or not, with a reason for every check. The burden of proof is on the
candidate.

    python -m tasks.gate --evaluation metrics/evaluate.json --samples eval/samples \
        --report reports/gate.md --metrics metrics/gate.json

:func:`decide` is a pure function over the evaluation record and the per-item results that
returns a :class:`Verdict`: passed or not, and one :class:`Check` per threshold. A check passes
only when the data *certify* it (one-sided tests in :mod:`tempering.stats`, ``gate`` in
``params.yaml``):

- **gain**, every ``domain`` benchmark: the lower end of the paired interval of
  (candidate - base) is at least ``min_domain_gain``.
- **forgetting**, every ``general`` benchmark: non-inferiority, the lower end of the interval of
  (candidate - base) is at least ``-budget`` (``max_forgetting``), and the benchmark has enough
  items to certify that budget at ``power`` (else it is refused as underpowered, in one line:
  ``arc_challenge: 100 items can certify drops of 0.11 or more; budget 0.05``).
- **kl** / **perplexity**, on the fixed general text set (``evaluate.drift``): the upper end of
  the interval (bootstrap over texts) of the mean per-token KL(candidate || base) is at most
  ``max_kl``; of the perplexity ratio, at most ``max_perplexity_ratio``.
- **heldout_nll**, on the held-out SFT rows (``dedup.sft_heldout``: rows SFT never trained on, the
  domain check when no domain benchmark is configured), when ``min_heldout_nll_gain`` is set: the
  lower end of the paired interval of the per-row mean answer NLL, base minus candidate, in nats
  per token, is at least ``min_heldout_nll_gain``; fewer than ``min_heldout_rows`` rows cannot
  certify it. It is in the gain family.
- **champion**, every benchmark, when a production model was scored: non-inferior to production
  within ``production_margin`` (the lower end of (candidate - production) at least ``-margin``).
- **alignment**, on the dpo stage's held-out preference pairs (whole prompts never trained on),
  when ``alignment_margin`` is set: the exported candidate's preference accuracy is non-inferior
  to the SFT model's (the lower end of (candidate - SFT), paired by pair, a tie counting half, at
  least ``-margin``), and the pairs are enough to certify that margin at ``power`` (else refused as
  underpowered). When DPO did not train (disabled, no preference rows) the candidate makes no
  alignment claim: the check is listed as not applicable, with the reason.

Each family (forgetting + drift; gain; champion; alignment) is corrected for multiplicity (``holm`` by
default, or ``bh``). Missing, skipped, empty, NaN or unpaired evidence fails its check with a
reason; a benchmark marked ``required: false`` that was not scored is listed as not checked.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tempering import TemperingError, stats
from tempering.cli import stage_main
from tempering.config import GateParams, Params
from tempering.io import read_json, read_jsonl, write_json, write_text
from tempering.records import EvaluateRecord, GateRecord, validated

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ("gate",)

EPS = 1e-12
DRIFT_FILE = "drift.jsonl"
ALIGNMENT_FILE = "alignment.jsonl"   # evaluate's per-pair held-out preference results
ALIGNMENT_NAME = "heldout_pairs"     # the alignment check's "benchmark" in reports

# Which family a check belongs to (multiplicity is controlled within each).
FAMILY = {"forgetting": "no-forgetting", "kl": "no-forgetting", "perplexity": "no-forgetting",
          "gain": "gain", "heldout_nll": "gain", "champion": "champion", "alignment": "alignment"}
HELDOUT_FILE = "sft_heldout.jsonl"   # evaluate's per-row held-out SFT results
HELDOUT_NAME = "sft_heldout"         # the heldout_nll check's "benchmark" in reports


@dataclass(frozen=True)
class Check:
    benchmark: str
    kind: str                  # gain | heldout_nll | forgetting | kl | perplexity | champion | alignment
    threshold: float           # min gain, budget / margin (as a positive drop), or upper limit
    candidate: float | None
    reference: float | None    # the base's (gain, forgetting, drift), production's (champion), SFT's (alignment)
    delta: float | None        # candidate - reference (accuracy), or the drift statistic
    ci: tuple[float, float] | None
    n: int
    passed: bool
    reason: str
    p_value: float | None = None
    p_adjusted: float | None = None
    discordance: float | None = None   # observed share of discordant items
    mde: float | None = None           # smallest drop n items certify (planning discordance)
    mde_observed: float | None = None  # same at the observed discordance
    powered: bool | None = None        # n can certify the margin (non-inferiority checks)
    family: str = ""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: tuple[Check, ...]
    test: str
    confidence: float
    metric: str
    multiplicity: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    not_checked: tuple[str, ...] = field(default_factory=tuple)
    certifies: tuple[str, ...] = field(default_factory=tuple)

    @property
    def reasons(self) -> list[str]:
        """Every failed check (and structural problem), one line each."""
        return list(self.notes) + [c.reason for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "test": self.test,
                "confidence": self.confidence, "metric": self.metric, "multiplicity": self.multiplicity,
                "checks": [dict(asdict(c), ci=list(c.ci) if c.ci else None) for c in self.checks],
                "not_checked": list(self.not_checked), "certifies": list(self.certifies),
                "n_checks": len(self.checks), "n_failed": sum(not c.passed for c in self.checks)}


# ----------------------------------------------------------------------------- evidence


def paired(cand: list[dict], ref: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """Per-item scores of two models on the items both were scored on (matched by ``doc_id``)."""
    ref_by_id = {r["doc_id"]: float(r[metric]) for r in ref}
    xs, ys = [], []
    for row in cand:
        if row["doc_id"] in ref_by_id:
            xs.append(float(row[metric]))
            ys.append(ref_by_id[row["doc_id"]])
    return xs, ys


def _evidence(name: str, who: str, cand_rows, ref_rows, metric: str, n_expected: int | None):
    """Paired per-item scores, or the one-line reason they cannot be used."""
    if cand_rows is None or ref_rows is None:
        missing = "candidate" if cand_rows is None else who
        return None, f"per-item results of the {missing} are missing"
    if not cand_rows or not ref_rows:
        return None, f"no scored items ({'candidate' if not cand_rows else who} results are empty)"
    for label, rows in (("candidate", cand_rows), (who, ref_rows)):
        ids = [r.get("doc_id") for r in rows]
        if None in ids or len(set(ids)) != len(ids):
            return None, f"the {label}'s item ids are missing or repeated"
        for r in rows:
            try:
                v = float(r[metric])
            except (KeyError, TypeError, ValueError):
                return None, f"item {r.get('doc_id')} of the {label} has no {metric}"
            if not math.isfinite(v):
                return None, f"item {r.get('doc_id')} of the {label} scored {v} ({metric} is not finite)"
    c_ids, r_ids = {r["doc_id"] for r in cand_rows}, {r["doc_id"] for r in ref_rows}
    if c_ids != r_ids:
        return None, (f"item ids do not pair: {len(c_ids - r_ids)} candidate items have no {who} result, "
                      f"{len(r_ids - c_ids)} {who} items have no candidate result")
    if n_expected is not None and n_expected != len(c_ids):
        return None, f"the record says n={n_expected} but {len(c_ids)} items were scored"
    return paired(cand_rows, ref_rows, metric), None


def _family_sizes(configured: list[dict], cfg: GateParams, has_production: bool, drift_on: int) -> dict[str, int]:
    """Checks per family, as configured (what evaluate planned its item counts for)."""
    general = sum(1 for b in configured if b.get("role") == "general")
    domain = sum(1 for b in configured if b.get("role") == "domain")
    return {"no-forgetting": max(1, general + drift_on), "gain": max(1, domain),
            "champion": max(1, len(configured) if has_production else 1)}


def planning_alpha(cfg: GateParams, family_size: int) -> float:
    return stats.planning_alpha(cfg.confidence, cfg.multiplicity, family_size)


def required_items(cfg: GateParams, budget: float, family_size: int) -> int:
    """Items a general benchmark needs to certify ``budget`` (evaluate's ``limit: power``)."""
    return stats.required_items(budget, cfg.planning_discordance, planning_alpha(cfg, family_size), cfg.power)


# ----------------------------------------------------------------------------- the decision


@dataclass
class _Pending:
    """A check whose pass/fail waits for the family's multiplicity correction."""

    benchmark: str
    kind: str
    threshold: float
    candidate: float | None = None
    reference: float | None = None
    delta: float | None = None
    ci: tuple[float, float] | None = None
    n: int = 0
    p_value: float | None = None
    discordance: float | None = None
    mde: float | None = None
    mde_observed: float | None = None
    powered: bool | None = None
    problem: str | None = None     # evidence unusable: fails with this reason


def _accuracy_check(name, kind, who, threshold, b, samples, cfg, salt, fam_size) -> _Pending:
    pend = _Pending(name, kind, threshold, n=int(b.get("n") or 0))
    xs_ys, problem = _evidence(name, who, (samples.get("candidate") or {}).get(name),
                               (samples.get(who) or {}).get(name), cfg.metric, b.get("n"))
    if problem:
        pend.problem = problem
        return pend
    return _paired_test(pend, *xs_ys, cfg, salt, fam_size)


def _paired_test(pend: _Pending, xs: list[float], ys: list[float], cfg, salt, fam_size) -> _Pending:
    """The paired one-sided test of (candidate - reference) against the check's bound, with the
    power figures; non-inferiority checks that must be certifiable by design get ``powered``."""
    kind, threshold = pend.kind, pend.threshold
    n = len(xs)
    pend.n = n
    pend.candidate, pend.reference = sum(xs) / n, sum(ys) / n
    pend.delta = pend.candidate - pend.reference
    pend.discordance = stats.discordance(xs, ys)
    bound = threshold if kind == "gain" else -threshold
    diffs = [x - y for x, y in zip(xs, ys)]
    res = stats.mean_lower_test(diffs, bound, method="bootstrap" if cfg.test == "bootstrap" else "normal",
                                confidence=cfg.confidence, iters=cfg.bootstrap_iters, seed=cfg.seed + salt)
    pend.ci, pend.p_value = res.ci, res.p_value
    alpha = planning_alpha(cfg, fam_size)
    pend.mde = stats.min_detectable(n, cfg.planning_discordance, alpha, cfg.power)
    pend.mde_observed = stats.min_detectable(n, pend.discordance, alpha, cfg.power)
    if kind in ("forgetting", "alignment"):
        # A forgetting budget (an alignment margin) must be certifiable by design: n too small for
        # it is a refusal. A champion check is judged by its interval alone (reported with its
        # mde): on a small set it certifies only when candidate and production rarely disagree.
        pend.powered = pend.mde <= threshold + EPS
    return pend


def _alignment_check(info, rows: list[dict] | None, cfg: GateParams, salt: int) -> tuple[_Pending | None, str | None]:
    """(the alignment check, or None; a "Not checked" line, or None). ``info`` is the evaluation
    record's ``alignment``; ``rows`` evaluate's per-pair results (candidate and SFT margins)."""
    name = ALIGNMENT_NAME
    if isinstance(info, dict) and info.get("applicable") is False:
        return None, (f"{name} (alignment): not applicable: {info.get('reason') or 'DPO did not train'}; "
                      "the candidate makes no alignment claim")
    if cfg.alignment_margin is None:
        if isinstance(info, dict) and info.get("pairs"):
            return None, (f"{name} (alignment): {info['pairs']} held-out preference pairs measured, not checked "
                          "(gate.alignment_margin is null)")
        return None, None
    pend = _Pending(name, "alignment", cfg.alignment_margin)
    if not isinstance(info, dict):
        pend.problem = ("the evaluation record has no held-out preference evidence (evaluate ran before the "
                        "alignment check existed?)")
        return pend, None
    pend.n = int(info.get("pairs") or 0)
    if info.get("problem"):
        pend.problem = str(info["problem"])
        return pend, None
    if rows is None:
        pend.problem = f"the per-pair results (eval/samples/{ALIGNMENT_FILE}) are missing"
        return pend, None
    if not rows:
        pend.problem = f"no held-out pairs were scored (eval/samples/{ALIGNMENT_FILE} is empty)"
        return pend, None
    ids = [r.get("id") for r in rows]
    if None in ids or len(set(ids)) != len(ids):
        pend.problem = "the held-out pairs' ids are missing or repeated"
        return pend, None
    xs, ys = [], []
    for r in rows:
        try:
            m_c, m_s = float(r["candidate_margin"]), float(r["sft_margin"])
        except (KeyError, TypeError, ValueError) as exc:
            field_name = exc.args[0] if isinstance(exc, KeyError) else "a margin"
            pend.problem = f"held-out pair {r.get('id')} has no usable {field_name}"
            return pend, None
        if not (math.isfinite(m_c) and math.isfinite(m_s)):
            pend.problem = f"held-out pair {r.get('id')}: a margin is not finite ({m_c}, {m_s})"
            return pend, None
        if r.get("tokens_match") is False:
            pend.problem = (f"held-out pair {r.get('id')}: the candidate's tokens differ from those the SFT "
                            "margin was scored on, so the margins do not pair")
            return pend, None
        xs.append(stats.preference_accuracy(m_c))
        ys.append(stats.preference_accuracy(m_s))
    if pend.n != len(rows):
        pend.problem = f"the record says {pend.n} held-out pairs but {len(rows)} were scored"
        return pend, None
    return _paired_test(pend, xs, ys, cfg, salt, 1), None


def _heldout_check(info, rows: list[dict] | None, cfg: GateParams, salt: int) -> tuple[_Pending | None, str | None]:
    """(the heldout_nll check, or None; a "Not checked" line, or None). ``info`` is the evaluation
    record's ``sft_heldout``; ``rows`` evaluate's per-row results. No rows held out: no check (the
    domain check is then a domain benchmark, or missing: :func:`decide` says so)."""
    name = HELDOUT_NAME
    held = int(info.get("held_out") or info.get("rows") or 0) if isinstance(info, dict) else 0
    if not held and not rows:
        return None, None
    if cfg.min_heldout_nll_gain is None:
        return None, f"{name} (heldout_nll): {held} held-out SFT rows measured, not checked (gate.min_heldout_nll_gain is null)"
    pend = _Pending(name, "heldout_nll", cfg.min_heldout_nll_gain, n=int(info.get("rows") or 0))
    if rows is None:
        pend.problem = f"the per-row results (eval/samples/{HELDOUT_FILE}) are missing"
        return pend, None
    ids = [r.get("id") for r in rows]
    if None in ids or len(set(ids)) != len(ids):
        pend.problem = "the held-out rows' ids are missing or repeated"
        return pend, None
    diffs, cand, base = [], [], []
    for r in rows:
        try:
            t, c, b = float(r["tokens"]), float(r["nll_candidate"]), float(r["nll_base"])
        except (KeyError, TypeError, ValueError) as exc:
            pend.problem = f"held-out row {r.get('id')} has no usable {exc.args[0] if isinstance(exc, KeyError) else 'score'}"
            return pend, None
        if not (math.isfinite(t) and math.isfinite(c) and math.isfinite(b)) or t <= 0:
            pend.problem = f"held-out row {r.get('id')} is NaN, infinite or has no answer tokens"
            return pend, None
        cand.append(c / t)
        base.append(b / t)
        diffs.append((b - c) / t)
    pend.n = len(rows)
    if isinstance(info, dict) and info.get("rows") is not None and int(info["rows"]) != len(rows):
        pend.problem = f"the record says {info['rows']} held-out rows but {len(rows)} were scored"
        return pend, None
    if len(rows) < cfg.min_heldout_rows:
        pend.problem = (f"{len(rows)} held-out SFT rows cannot certify a gain (gate.min_heldout_rows "
                        f"{cfg.min_heldout_rows}; raise dedup.sft_heldout.share or bring more rows)")
        return pend, None
    pend.candidate, pend.reference = sum(cand) / len(cand), sum(base) / len(base)
    pend.delta = pend.reference - pend.candidate
    res = stats.mean_lower_test(diffs, cfg.min_heldout_nll_gain, method="bootstrap" if cfg.test == "bootstrap"
                                else "normal", confidence=cfg.confidence, iters=cfg.bootstrap_iters, seed=cfg.seed + salt)
    pend.ci, pend.p_value = res.ci, res.p_value
    return pend, None


def _drift_checks(rows: list[dict] | None, cfg: GateParams, salt: int) -> list[_Pending]:
    out = []
    wanted = [("kl", cfg.max_kl), ("perplexity", cfg.max_perplexity_ratio)]
    for j, (kind, limit) in enumerate(wanted):
        if limit is None:
            continue
        pend = _Pending("drift", kind, limit)
        if rows is None:
            pend.problem = "the per-text drift records (eval/samples/drift.jsonl) are missing"
            out.append(pend)
            continue
        pend.n = len(rows)
        try:  # a record with any unusable field is corrupt: both drift checks refuse it
            values = [[float(r[k]) for k in ("tokens", "kl", "nll_candidate", "nll_base")] for r in rows]
        except (KeyError, TypeError, ValueError) as exc:
            pend.problem = f"a drift record lacks {exc.args[0] if exc.args else 'a field'}"
            out.append(pend)
            continue
        tokens = [v[0] for v in values]
        num = [v[1] for v in values] if kind == "kl" else [v[2] - v[3] for v in values]
        if not all(math.isfinite(x) for v in values for x in v) or any(t <= 0 for t in tokens):
            bad = next(r.get("id") for r, v in zip(rows, values)
                       if not all(math.isfinite(x) for x in v) or v[0] <= 0)
            pend.problem = f"drift record {bad} is NaN, infinite or has no tokens"
        elif len(rows) < cfg.min_drift_texts:
            pend.problem = f"{len(rows)} drift texts cannot certify a limit (gate.min_drift_texts {cfg.min_drift_texts})"
        if pend.problem:
            out.append(pend)
            continue
        log_limit = limit if kind == "kl" else math.log(limit)
        res = stats.ratio_upper_test(num, tokens, log_limit, confidence=cfg.confidence,
                                     iters=cfg.bootstrap_iters, seed=cfg.seed + salt + j)
        if kind == "kl":
            pend.delta, pend.ci = res.estimate, res.ci
        else:
            pend.delta, pend.ci = math.exp(res.estimate), (math.exp(res.ci[0]), math.exp(res.ci[1]))
            pend.candidate = math.exp(sum(float(r["nll_candidate"]) for r in rows) / sum(tokens))
            pend.reference = math.exp(sum(float(r["nll_base"]) for r in rows) / sum(tokens))
        pend.p_value = res.p_value
        out.append(pend)
    return out


def _fmt_ci(ci) -> str:
    return "" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _reason(p: _Pending, passed: bool, adj: float | None, alpha: float, cfg: GateParams) -> str:
    where = f"{p.benchmark}: {p.kind}"
    if p.problem:
        return f"{where}: not certified: {p.problem}"
    test = f"p {p.p_value:.2g}" + (f", {cfg.multiplicity}-adjusted {adj:.2g}" if cfg.multiplicity != "none" else "")
    test += f" vs {alpha:.3g}"
    if p.kind in ("kl", "perplexity"):
        unit = "nats/token" if p.kind == "kl" else "x"
        what = "mean per-token KL(candidate || base)" if p.kind == "kl" else "perplexity ratio candidate/base"
        lo, hi = p.ci
        if passed:
            return f"{where}: {what} {p.delta:.3f} {unit}, interval up to {hi:.3f}, within the limit {p.threshold:.3f} ({test})"
        if hi <= p.threshold:
            return (f"{where}: {what} {p.delta:.3f} {unit}, interval up to {hi:.3f} is within the limit "
                    f"{p.threshold:.3f} on its own, but not after {cfg.multiplicity} correction: cannot certify it ({test})")
        return (f"{where}: {what} {p.delta:.3f} {unit}, interval up to {hi:.3f}: cannot certify the limit "
                f"{p.threshold:.3f} ({test})")
    lo = p.ci[0]
    if p.kind in ("gain", "heldout_nll"):  # superiority: the lower end must reach the threshold
        if p.kind == "heldout_nll":
            verb = "lowered by"
            scores = (f"answer NLL base {p.reference:.3f} -> candidate {p.candidate:.3f} nats/token, n {p.n} rows "
                      "never trained on")
        else:
            verb, scores = "gained", f"candidate {p.candidate:.3f} vs base {p.reference:.3f}, n {p.n}"
        if passed:
            return f"{where}: {verb} {p.delta:+.3f}, lower end {lo:+.3f} >= {p.threshold:.3f} ({scores}; {test})"
        if lo >= p.threshold:
            return (f"{where}: {verb} {p.delta:+.3f}, lower end {lo:+.3f} clears {p.threshold:.3f} on its own, but "
                    f"not after {cfg.multiplicity} correction: not certified ({scores}; {test})")
        return (f"{where}: {verb} {p.delta:+.3f}, lower end {lo:+.3f} < the required {p.threshold:.3f}: "
                f"not certified ({scores}; {test})")
    ref = {"champion": "production", "alignment": "SFT"}.get(p.kind, "base")
    scores = f"candidate {p.candidate:.3f} vs {ref} {p.reference:.3f}, n {p.n}"
    margin = f"{'budget' if p.kind == 'forgetting' else 'margin'} {p.threshold:.3f}"
    if p.powered is False:
        units = "held-out pairs" if p.kind == "alignment" else "items"
        return (f"{p.benchmark}: {p.n} {units} can certify drops of {p.mde:.2f} or more; {margin} "
                f"({p.kind}: underpowered at power {cfg.power:.0%}, discordance {cfg.planning_discordance:.2f} assumed; "
                f"{scores})")
    if passed:
        return (f"{where}: certified non-inferior: delta {p.delta:+.3f}, lower end {lo:+.3f} >= -{p.threshold:.3f} "
                f"({scores}; {test})")
    if lo >= -p.threshold:  # the interval alone clears the margin; the family's correction does not
        return (f"{where}: not certified after {cfg.multiplicity} correction: delta {p.delta:+.3f}, lower end "
                f"{lo:+.3f} clears -{p.threshold:.3f} on its own, but not at the family's adjusted level, so a "
                f"drop beyond the {margin} is not ruled out ({scores}; {test})")
    return (f"{where}: not certified: delta {p.delta:+.3f}, lower end {lo:+.3f} < -{p.threshold:.3f}, so a drop "
            f"beyond the {margin} is not ruled out ({scores}; {test})")


def decide(evaluation: dict, samples: dict | None, cfg: GateParams) -> Verdict:
    """The gate: one check per threshold; passed only when every check is certified.

    ``evaluation`` is ``metrics/evaluate.json``; ``samples`` is ``{model: {benchmark: [rows]}}``
    plus ``{"drift": [rows]}`` (:func:`load_samples`).
    """
    samples = samples or {}
    notes: list[str] = []
    not_checked: list[str] = []
    benchmarks = evaluation.get("benchmarks") or {}
    skipped = evaluation.get("skipped") or {}
    configured = evaluation.get("configured") or [
        {"name": n, "role": b.get("role"), "required": True} for n, b in benchmarks.items()]
    has_production = "production" in (evaluation.get("models") or {}) or any("production" in b for b in benchmarks.values())
    drift_on = sum(x is not None for x in (cfg.max_kl, cfg.max_perplexity_ratio))
    sizes = _family_sizes(configured, cfg, has_production and cfg.production_margin is not None, drift_on)
    pending: list[_Pending] = []

    for spec in configured:
        name, role = spec["name"], spec.get("role")
        if name in benchmarks:
            continue
        why = skipped.get(name, "not in the evaluation record")
        if spec.get("required", True) is False:
            not_checked.append(f"{name} ({role}): not scored and not required: {why}")
            continue
        kind = "gain" if role == "domain" else "forgetting"
        threshold = cfg.min_domain_gain if role == "domain" else cfg.max_forgetting.get(
            name, cfg.max_forgetting.get("default", 0.0))
        pending.append(_Pending(name, kind, threshold, problem=f"configured but not scored ({why})"))
    heldout, line = _heldout_check(evaluation.get("sft_heldout"), samples.get("sft_heldout"), cfg, salt=15485863)
    if line:
        not_checked.append(line)
    if not any(s.get("role") == "domain" for s in configured) and heldout is None:
        notes.append("no domain benchmark is configured and no SFT rows were held out (dedup.sft_heldout): "
                     "nothing shows the candidate is better")
    if not any(s.get("role") == "general" for s in configured):
        notes.append("no general benchmark is configured: at least one forgetting check is required")

    for i, (name, b) in enumerate(sorted(benchmarks.items())):
        role = b.get("role")
        if role == "domain":
            pending.append(_accuracy_check(name, "gain", "base", cfg.min_domain_gain, b, samples, cfg, 1000 * i,
                                           sizes["gain"]))
        elif role == "general":
            budget = cfg.max_forgetting.get(name, cfg.max_forgetting.get("default"))
            if budget is None:
                notes.append(f"{name}: no forgetting budget (set gate.max_forgetting.{name} or default)")
            else:
                pending.append(_accuracy_check(name, "forgetting", "base", budget, b, samples, cfg, 1000 * i,
                                               sizes["no-forgetting"]))
        else:
            notes.append(f"{name}: unknown role {role!r}")
            continue
        if has_production and cfg.production_margin is not None and role in ("domain", "general"):
            pending.append(_accuracy_check(name, "champion", "production", cfg.production_margin, b, samples, cfg,
                                           1000 * i + 500, sizes["champion"]))
    if heldout is not None:
        pending.append(heldout)
    pending += _drift_checks(samples.get("drift"), cfg, salt=7919)
    alignment, line = _alignment_check(evaluation.get("alignment"), samples.get("alignment"), cfg, salt=104729)
    if alignment is not None:
        pending.append(alignment)
    if line:
        not_checked.append(line)

    # Multiplicity within each family, over the checks that produced a p-value.
    alpha = stats.one_sided_alpha(cfg.confidence)
    adjusted: dict[int, tuple[bool, float]] = {}
    for family in sorted(set(FAMILY.values())):
        members = [k for k, p in enumerate(pending) if FAMILY[p.kind] == family and p.p_value is not None]
        if not members:
            continue
        # A family's size counts the checks that should have produced evidence too (a missing
        # check must not make the others' correction laxer).
        m = max(len(members), sum(1 for p in pending if FAMILY[p.kind] == family))
        ps = [pending[k].p_value for k in members] + [1.0] * (m - len(members))
        rejected, adj = stats.adjust(ps, alpha, cfg.multiplicity)
        for k, r, a in zip(members, rejected, adj):
            adjusted[k] = (r, a)

    checks: list[Check] = []
    for k, p in enumerate(pending):
        rejected, adj = adjusted.get(k, (False, None))
        passed = p.problem is None and rejected and p.powered is not False
        checks.append(Check(benchmark=p.benchmark, kind=p.kind, threshold=p.threshold, candidate=p.candidate,
                            reference=p.reference, delta=p.delta, ci=p.ci, n=p.n, passed=passed,
                            reason=_reason(p, passed, adj, alpha, cfg), p_value=p.p_value, p_adjusted=adj,
                            discordance=p.discordance, mde=p.mde, mde_observed=p.mde_observed, powered=p.powered,
                            family=FAMILY[p.kind]))
    passed = not notes and bool(checks) and all(c.passed for c in checks)
    return Verdict(passed=passed, checks=tuple(checks), test=cfg.test, confidence=cfg.confidence, metric=cfg.metric,
                   multiplicity=cfg.multiplicity, notes=tuple(notes), not_checked=tuple(not_checked),
                   certifies=tuple(certifies(checks, evaluation, cfg)))


def certifies(checks: list[Check], evaluation: dict, cfg: GateParams) -> list[str]:
    """What this evidence can and cannot certify, in plain lines for the report."""
    out = []
    forgetting = [c for c in checks if c.kind == "forgetting" and c.mde is not None]
    if forgetting:
        out.append("Forgetting is certified per benchmark, on its items only: " + "; ".join(
            f"{c.benchmark}: {c.n} items can certify drops of {c.mde:.2f} or more (budget {c.threshold:.2f})"
            for c in forgetting) + ".")
    alignment = [c for c in checks if c.kind == "alignment" and c.mde is not None]
    if alignment:
        a = alignment[0]
        out.append(f"Alignment is certified on the {a.n} held-out preference pairs only (whole prompts DPO never "
                   f"trained on, drawn from the same preference data): they can certify drops in preference "
                   f"accuracy vs the SFT model of {a.mde:.2f} or more (margin {a.threshold:.2f}). Preference "
                   "accuracy says which given answer the candidate finds likelier, not what it generates.")
    info = evaluation.get("alignment")
    if isinstance(info, dict) and info.get("applicable") is False:
        out.append("No alignment claim is checked: DPO did not train, so the candidate claims nothing beyond what "
                   "SFT taught it about preferences.")
    held = [c for c in checks if c.kind == "heldout_nll" and c.ci]
    if held:
        h = held[0]
        out.append(f"The domain gain is certified on {h.n} held-out SFT rows only (never trained on, drawn from the "
                   "same data): the candidate finds the reference answers likelier than the base does. Likelihood "
                   "of a reference answer is not the quality of a generated one, and rows from the same sources "
                   "say nothing about other tasks of the domain.")
    drift = [c for c in checks if c.kind in ("kl", "perplexity") and c.ci]
    if drift:
        out.append(f"Drift is certified on the fixed general text set ({drift[0].n} texts): a distribution shift "
                   "that moves no benchmark's accuracy still shows there.")
    out.append(f"Each family of checks holds its error rate at {stats.one_sided_alpha(cfg.confidence):.3g} "
               f"({cfg.multiplicity}); planning assumes {cfg.planning_discordance:.0%} discordant items and "
               f"{cfg.power:.0%} power.")
    out.append("Not certified by anything here: skills no configured benchmark measures, behaviour in long "
               "generations, safety, and languages or domains outside the bundle.")
    return out


# ----------------------------------------------------------------------------- io


def load_samples(folder: str | Path) -> dict:
    """``eval/samples/<model>/<benchmark>.jsonl`` -> {model: {benchmark: rows}}; plus
    ``eval/samples/drift.jsonl`` -> {"drift": rows}, ``eval/samples/alignment.jsonl`` ->
    {"alignment": rows} and ``eval/samples/sft_heldout.jsonl`` -> {"sft_heldout": rows} when present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TemperingError(f"{folder}: per-item results not found (run the evaluate stage)")
    out: dict = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        out[sub.name] = {f.stem: read_jsonl(f) for f in sorted(sub.glob("*.jsonl"))}
    if (folder / DRIFT_FILE).is_file():
        out["drift"] = read_jsonl(folder / DRIFT_FILE)
    if (folder / ALIGNMENT_FILE).is_file():
        out["alignment"] = read_jsonl(folder / ALIGNMENT_FILE)
    if (folder / HELDOUT_FILE).is_file():
        out["sft_heldout"] = read_jsonl(folder / HELDOUT_FILE)
    return out


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def to_markdown(verdict: Verdict) -> str:
    lines = [f"# Gate: {'PASSED' if verdict.passed else 'FAILED'}", "",
             f"Metric `{verdict.metric}`; paired `{verdict.test}` tests, one-sided at "
             f"{(1 - verdict.confidence) / 2:.3g} (the lower or upper end of the {verdict.confidence:.0%} interval), "
             f"`{verdict.multiplicity}` correction within each family. A check passes only when the data certify it.",
             ""]
    if verdict.notes:
        lines += [f"- **{n}**" for n in verdict.notes] + [""]
    lines += ["| benchmark | check | threshold | candidate | reference | delta | interval | n | discordant | "
              "certifies drops of | p (adjusted) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in verdict.checks:
        lines.append(
            f"| {c.benchmark} | {c.kind} | {c.threshold:.3f} | {_num(c.candidate, '.3f')} | {_num(c.reference, '.3f')} "
            f"| {_num(c.delta, '+.3f')} | {_fmt_ci(c.ci) or '-'} | {c.n} | {_num(c.discordance, '.3f')} "
            f"| {_num(c.mde, '.3f')} | {_num(c.p_value, '.2g')} ({_num(c.p_adjusted, '.2g')}) "
            f"| {'pass' if c.passed else '**FAIL**'} |")
    lines += ["", "## Reasons", ""] + [f"- {'PASS' if c.passed else 'FAIL'}: {c.reason}" for c in verdict.checks]
    lines += [f"- FAIL: {n}" for n in verdict.notes]
    if verdict.not_checked:
        lines += ["", "## Not checked", ""] + [f"- {n}" for n in verdict.not_checked]
    lines += ["", "## What this evidence can and cannot certify", ""] + [f"- {n}" for n in verdict.certifies]
    return "\n".join(lines) + "\n"


def run(params: Params, evaluation: str, samples: str | None, report: str, metrics: str) -> dict:
    record = validated(EvaluateRecord, read_json(evaluation), evaluation)  # its shape, checked: no guessing below
    per_item = load_samples(samples) if samples else None
    verdict = decide(record, per_item, params.gate)
    result = dict(verdict.to_dict(), bundle_hash=record.get("bundle_hash"),
                  candidate=(record.get("models") or {}).get("candidate"),
                  production=(record.get("models") or {}).get("production"))
    write_text(report, to_markdown(verdict))
    write_json(metrics, validated(GateRecord, result, metrics))
    return {"passed": verdict.passed, "reasons": verdict.reasons}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evaluation", default="metrics/evaluate.json", help="the evaluate stage's record")
    parser.add_argument("--samples", default="eval/samples", help="per-item results (paired statistics)")
    parser.add_argument("--report", default="reports/gate.md")
    parser.add_argument("--metrics", default="metrics/gate.json")


def main(argv=None) -> int:
    return stage_main("gate", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
