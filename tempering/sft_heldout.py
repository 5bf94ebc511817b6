"""Held-out SFT rows: the domain check for a project that brings its own data and no benchmark.

A user with their own SFT data rarely has a multiple-choice benchmark of their domain. When none
is configured (``evaluate.benchmarks`` has no ``role: domain``), the dedup stage holds out a share
of the clean SFT rows (``dedup.sft_heldout``), which SFT never trains on, and ``evaluate`` scores
the candidate and the base on them: per row, the mean negative log-likelihood of the reference
answers (every assistant turn, end-of-turn token included: the tokens SFT puts in its loss). The
gate's ``heldout_nll`` check asks the candidate to lower it, paired by row, by at least
``gate.min_heldout_nll_gain`` nats per token at the lower end of the interval.

One owner for two stages:

- :func:`split` (dedup): which rows are held out. A row's fate is a hash of ``seed`` and its
  prompt (every turn before the last assistant answer), so rows sharing a prompt go together, and
  a prompt held out once stays held out when a refresh adds rows (a split drawn by shuffling would
  move rows between the two sides). The dedup stage has already removed exact and near duplicates
  across all SFT rows, so no held-out row is a near copy of a training row. Rows of
  ``sft.replay.source`` (the replay stage's general answers) are never held out: they are not the
  user's domain.
- :func:`pair_records` / :func:`summary` (evaluate): the per-row file and its point values. The
  scoring itself is :func:`tempering.scorecard.heldout_nll` and
  :func:`tempering.scorecard.heldout_generations`, through the candidate's tokenizer and chat
  template, so the two models' rows pair token for token (kept out of this module so the dedup
  stage does not depend on the training backend).

A row of ``eval/samples/sft_heldout.jsonl``::

    {"id", "source", "tokens", "nll_candidate", "nll_base"}   # summed over the answer tokens
"""

from __future__ import annotations

import hashlib
import math

from tempering import TemperingError

FILE = "sft_heldout.jsonl"          # in data/clean and in eval/samples
NAME = "sft_heldout"                # the gate check's "benchmark" in reports
# Bumped when what a score means changes (part of evaluate's cache key).
SCORING_VERSION = 1


def prompt_key(row: dict) -> str:
    """The conversation before its last assistant turn, normalised (case, whitespace)."""
    messages = row.get("messages") or []
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    text = " ".join(f"{m.get('role')}: {m.get('content', '')}" for m in messages[:last])
    return " ".join(text.lower().split())


def _unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key): the same prompt draws the same number forever."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def active(cfg, evaluate) -> tuple[bool, str]:
    """(hold rows out?, why). ``cfg`` is ``dedup.sft_heldout``; ``evaluate`` the evaluate params."""
    if cfg.enabled is False:
        return False, "dedup.sft_heldout.enabled is false"
    domain = [b.name for b in evaluate.benchmarks if b.role == "domain"]
    if cfg.enabled == "auto" and domain:
        return False, (f"a domain benchmark is configured ({', '.join(domain)}): it is the domain check "
                       "(dedup.sft_heldout.enabled: true holds rows out as well)")
    if cfg.enabled == "auto":
        return True, "no domain benchmark is configured: held-out SFT rows are the domain check"
    return True, "dedup.sft_heldout.enabled is true"


def split(rows: list[dict], cfg, *, on: bool, reason: str, exclude_source: str | None = None
          ) -> tuple[list[dict], list[dict], dict]:
    """(rows to train on, held-out rows, the record for ``metrics/dedup.json``).

    A prompt is held out when its :func:`_unit` is below ``cfg.share``; past ``cfg.max_rows`` the
    prompts with the smallest numbers stay held out (still stable). At least one prompt always
    stays for training. Rows whose ``source`` is in ``exclude_source`` are never held out."""
    info = {"enabled": on, "reason": reason, "share_requested": cfg.share, "seed": cfg.seed,
            "rows": 0, "prompts": 0, "eligible_rows": 0}
    if not on:
        return rows, [], info
    prefix = (exclude_source.rstrip("/") + ":") if exclude_source else None
    eligible = [i for i, r in enumerate(rows) if not (prefix and str(r.get("source", "")).startswith(prefix))]
    info["eligible_rows"] = len(eligible)
    if prefix:
        info["excluded_source"] = exclude_source
    groups: dict[str, list[int]] = {}
    for i in eligible:
        groups.setdefault(prompt_key(rows[i]), []).append(i)
    if len(groups) < 2:
        info["note"] = (f"{len(eligible)} SFT rows with {len(groups)} distinct prompt(s): nothing can be held "
                        "out and still leave a prompt to train on")
        return rows, [], info
    draws = sorted((_unit(cfg.seed, k), k) for k in groups)
    chosen = [k for u, k in draws[:-1] if u < cfg.share]  # the largest draw always trains
    held: list[int] = []
    for k in chosen:
        if cfg.max_rows is not None and len(held) + len(groups[k]) > cfg.max_rows:
            info["capped_at"] = cfg.max_rows
            break
        held.extend(groups[k])
    held_set = set(held)
    train = [r for i, r in enumerate(rows) if i not in held_set]
    out = [rows[i] for i in sorted(held_set)]
    info.update(rows=len(out), prompts=len({prompt_key(r) for r in out}),
                share=round(len(out) / len(eligible), 4) if eligible else 0.0)
    if not out:
        info["note"] = (f"no prompt drew below share {cfg.share} among {len(groups)} prompts: raise "
                        "dedup.sft_heldout.share or bring more rows")
    return train, out, info


# ----------------------------------------------------------------------------- scoring


def pair_records(cand: list[dict], base: list[dict]) -> list[dict]:
    """The per-row file: candidate and base scores side by side (same rows, same tokens)."""
    by_id = {r["id"]: r for r in base}
    out = []
    for r in cand:
        b = by_id.get(r["id"])
        if b is None or b["tokens"] != r["tokens"]:
            raise TemperingError(f"held-out SFT row {r['id']}: the base was not scored on the same tokens")
        out.append({"id": r["id"], "source": r["source"], "tokens": r["tokens"], "nll_candidate": r["nll"],
                    "nll_base": b["nll"]})
    return out


def per_row_gain(rec: dict) -> float:
    """(base - candidate) mean NLL per answer token of one row: > 0 = the candidate finds the
    reference answer likelier."""
    return (float(rec["nll_base"]) - float(rec["nll_candidate"])) / float(rec["tokens"])


def summary(records: list[dict], rows_held: int) -> dict:
    """Point values for the metrics file and the report (the gate computes the interval)."""
    if not records:
        return {"rows": 0, "held_out": rows_held}
    tokens = sum(r["tokens"] for r in records)
    mean_c = sum(r["nll_candidate"] / r["tokens"] for r in records) / len(records)
    mean_b = sum(r["nll_base"] / r["tokens"] for r in records) / len(records)
    return {"rows": len(records), "held_out": rows_held, "skipped": rows_held - len(records), "tokens": tokens,
            "nll_candidate": round(mean_c, 4), "nll_base": round(mean_b, 4),
            "nll_gain": round(mean_b - mean_c, 4),
            "perplexity_candidate": round(math.exp(sum(r["nll_candidate"] for r in records) / tokens), 3),
            "perplexity_base": round(math.exp(sum(r["nll_base"] for r in records) / tokens), 3),
            "rows_improved": sum(per_row_gain(r) > 0 for r in records)}
