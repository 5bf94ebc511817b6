"""The streaming runner of ``validate``: rows through the filters, into kept and quarantine sinks.

Owns the one pass over every ``validate.sources`` entry (:func:`run_checks`): each raw row is
normalized (:mod:`tempering.formats`), then goes through the content filters of its kind, PII
redaction (:mod:`tempering.pii`) and, when built with a tokenizer, the token filters
(:mod:`tempering.filters`). The runner counts per source and reason, hands kept rows and quarantine
rows to a sink (:class:`FileSink`: JSONL files through :func:`tempering.io.jsonl_line`;
:class:`ListSink`: lists, for tests and small callers) and keeps the first
:data:`EXAMPLES_PER_REASON` messages per reason for the report. Aggregates are bounded
(:class:`~tempering.filters.ValueCounts`), so memory does not grow with the number of rows;
the dataset-level limits are judged by :func:`tempering.expectations.dataset_suite` at the end.

Quarantine rows keep the order the stage has always written: ingest rejects, then content
failures per kind (sft, preference, text), then SFT token, then preference token failures; each
phase is spilled to its own temporary file and the phases are concatenated at the end.
"""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict
from pathlib import Path

from tempering import TemperingError
from tempering.filters import KINDS, FilterGroup, ValueCounts, content_filters, row_chars
from tempering.formats import Rejected, iter_source
from tempering.io import jsonl_line
from tempering.pii import redact_row

EXAMPLES_PER_REASON = 3
TOKEN_BATCH = 256  # rows waiting for the token filters at most
PHASES = ("ingest", "content:sft", "content:preference", "content:text", "tokens:sft", "tokens:preference")


class ListSink:
    """Kept rows per kind and quarantine rows per phase, in memory (tests, small inputs)."""

    def __init__(self) -> None:
        self.kept: dict[str, list[dict]] = {k: [] for k in KINDS}
        self._quarantine: dict[str, list[dict]] = {p: [] for p in PHASES}

    def keep(self, kind: str, row: dict) -> None:
        self.kept[kind].append(row)

    def quarantine(self, phase: str, q: dict) -> None:
        self._quarantine[phase].append(q)

    def quarantined(self) -> list[dict]:
        return [q for p in PHASES for q in self._quarantine[p]]


class FileSink:
    """Kept rows to ``folder/{kind}.jsonl``; quarantine rows spilled per phase under ``spill``
    and concatenated by :meth:`write_quarantine`. Use as a context manager (files closed, spill
    removed on exit)."""

    def __init__(self, folder: str | Path, spill: str | Path) -> None:
        self.folder, self.spill = Path(folder), Path(spill)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spill.mkdir(parents=True, exist_ok=True)
        self._kept = {k: open(self.folder / f"{k}.jsonl", "w", encoding="utf-8", newline="\n") for k in KINDS}
        self._phase = {p: open(self.spill / f"{i}.jsonl", "w", encoding="utf-8", newline="\n")
                       for i, p in enumerate(PHASES)}
        self.counts = Counter()

    def keep(self, kind: str, row: dict) -> None:
        self._kept[kind].write(jsonl_line(row))
        self.counts[kind] += 1

    def quarantine(self, phase: str, q: dict) -> None:
        self._phase[phase].write(jsonl_line(q))

    def close(self) -> None:
        import os

        for fh in self._kept.values():
            if not fh.closed:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        for fh in self._phase.values():
            fh.close()

    def write_quarantine(self, fh) -> None:
        """Copy the quarantine rows, phase by phase, into the open binary file ``fh``."""
        self.close()
        for i, _ in enumerate(PHASES):
            with open(self.spill / f"{i}.jsonl", "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)

    def __enter__(self) -> "FileSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        shutil.rmtree(self.spill, ignore_errors=True)


def check_sources(vp) -> None:
    if not vp.sources:
        raise TemperingError("validate.sources is empty: list at least one input file in params.yaml")
    seen = set()
    for spec in vp.sources:
        if spec.path in seen:
            raise TemperingError(f"validate.sources: {spec.path} is listed twice")
        seen.add(spec.path)


def _length_stats(v: ValueCounts, long_chars: int) -> dict:
    if not v.n:
        return {"rows": 0, "chars_p50": 0, "chars_p95": 0, "chars_max": 0, "over_long_row_chars": 0}
    return {"rows": v.n, "chars_p50": int(v.percentile(50)), "chars_p95": int(v.percentile(95)),
            "chars_max": int(v.max()), "over_long_row_chars": v.count_over(long_chars)}


def _quarantine(sink, examples: dict, phase: str, q: dict) -> None:
    sink.quarantine(phase, q)
    if len(examples[phase][q["reason"]]) < EXAMPLES_PER_REASON:
        examples[phase][q["reason"]].append(q["message"])


def run_checks(vp, sink, *, sft_tokens=None, preference_tokens=None,
               tokens_skipped: str | None = None, preference_skipped: str | None = None) -> tuple[dict, dict]:
    """Stream every source of ``vp`` (ValidateParams) through the filters into ``sink``.

    ``sft_tokens`` / ``preference_tokens``: a :class:`~tempering.filters.SFTTokenFilter` /
    :class:`~tempering.filters.PreferenceTokenFilter`, or None with the reason they are skipped.
    Returns (metrics, examples: {reason: first messages}); the dataset suite's verdicts are
    ``metrics["failed_sources"]``, ``metrics["tokens"]["failed"]`` and
    ``metrics["preference_tokens"]["failed"]`` (the caller decides to stop).
    """
    from tempering.expectations import dataset_suite

    check_sources(vp)
    content = {k: content_filters(k, vp) for k in KINDS}
    token_groups: dict[str, tuple[str, FilterGroup | object]] = {}
    if sft_tokens is not None:
        token_groups["sft"] = ("tokens:sft", sft_tokens)
    if preference_tokens is not None:
        token_groups["preference"] = ("tokens:preference", preference_tokens)
    examples: dict[str, dict[str, list[str]]] = {p: defaultdict(list) for p in PHASES}
    per_source: dict[str, dict] = {}
    lengths = {k: ValueCounts() for k in KINDS}
    pii_total: Counter = Counter()
    rows_redacted = quarantined = 0

    def drop(phase: str, file: str, index: int, original, codes: list[str], message: str, stats: dict) -> None:
        nonlocal quarantined
        _quarantine(sink, examples, phase, {"source": file, "row": index, "reason": codes[0], "reasons": codes,
                                            "message": message, "stage": "validate", "original": original})
        stats["by_reason"][codes[0]] += 1
        quarantined += 1

    def keep(kind: str, row: dict, stats: dict) -> None:
        sink.keep(kind, row)
        stats["kept"] += 1
        lengths[kind].add(row_chars(kind, row))

    # Rows for the token filters wait in a small batch (TOKEN_BATCH rows, so memory stays bounded):
    # tokenizing them in one tight loop is faster than interleaving with parsing and PII.
    pending: list[tuple] = []

    def token_pass() -> None:
        for kind, res, row, stats in pending:
            phase, group = token_groups[kind]
            reasons = group.reasons(row)
            if reasons:
                drop(phase, res.file, res.index, res.original, [r.code for r in reasons],
                     f"{res.file}:{res.index}: {reasons[0].message}", stats)
            else:
                keep(kind, row, stats)
        pending.clear()

    for spec in vp.sources:
        stats = {"kind": spec.kind, "format": spec.format, "read": 0, "kept": 0, "quarantined": 0,
                 "by_reason": Counter(), "redacted": Counter()}
        per_source[spec.path] = stats
        kind = spec.kind
        for res in iter_source(spec, chunk_chars=vp.text_chunk_chars, pairing=vp.rated_pairs.pairing,
                               pairing_seed=vp.rated_pairs.seed):
            stats["read"] += 1
            if isinstance(res, Rejected):
                q = res.quarantine("validate")
                q["reasons"] = [res.reason]
                _quarantine(sink, examples, "ingest", q)
                stats["by_reason"][res.reason] += 1
                quarantined += 1
                continue
            row = res.row
            reasons = content[kind].reasons(row)
            if reasons:
                drop(f"content:{kind}", res.file, res.index, res.original, [r.code for r in reasons],
                     f"{res.file}:{res.index}: {reasons[0].message}", stats)
                continue
            if vp.pii.enabled:
                row, counts = redact_row(kind, row, vp.pii)
                if counts:
                    rows_redacted += 1
                    pii_total.update(counts)
                    stats["redacted"].update(counts)
            if kind in token_groups:
                pending.append((kind, res, row, stats))
                if len(pending) >= TOKEN_BATCH:
                    token_pass()
                continue
            keep(kind, row, stats)
    token_pass()

    # per-source shares, then the dataset-level suite (great-expectations) on the aggregates
    for path, s in per_source.items():
        s["quarantined"] = sum(s["by_reason"].values())
        if s["kept"] + s["quarantined"] != s["read"]:  # the bookkeeping invariant
            raise AssertionError(f"{path}: kept {s['kept']} + quarantined {s['quarantined']} != read {s['read']}")
        s["reject_share"] = round(s["quarantined"] / s["read"], 4) if s["read"] else 0.0
        counted = sum(n for r, n in s["by_reason"].items() if r not in vp.reject_share_ignores)
        # The share judged against max_reject_share: ties and other ignored reasons left out.
        s["counted_reject_share"] = round(counted / s["read"], 4) if s["read"] else 0.0
        s["by_reason"] = dict(sorted(s["by_reason"].items()))
        s["redacted"] = dict(sorted(s["redacted"].items()))
    sft_on = sft_tokens is not None and sft_tokens.examples > 0
    pref_on = preference_tokens is not None and preference_tokens.examples > 0
    rates: dict[str, tuple[float | None, float]] = {}
    if sft_on:
        r, tp = sft_tokens.rates(), sft_tokens.tp
        rates["truncation_rate"] = (r["truncation_rate"], tp.max_truncation_rate)
        rates["eot_missing_rate"] = (r["eot_missing_rate"], tp.max_eot_missing_rate)
    if pref_on:
        r, ptp = preference_tokens.rates(), preference_tokens.ptp
        rates["prompt_truncation_rate"] = (r["prompt_truncation_rate"], ptp.max_prompt_truncation_rate)
        rates["answer_truncation_rate"] = (r["answer_truncation_rate"], ptp.max_answer_truncation_rate)
    failed, broken = dataset_suite({p: s["counted_reject_share"] for p, s in per_source.items()},
                                   vp.max_reject_share, rates)

    if sft_on:
        token_summary = sft_tokens.summary([b for b in broken if b in ("truncation_rate", "eot_missing_rate")])
    else:
        token_summary = {"checked": False, "skipped": tokens_skipped if sft_tokens is None else "no SFT rows"}
    if pref_on:
        pref_summary = preference_tokens.summary(
            [b for b in broken if b in ("prompt_truncation_rate", "answer_truncation_rate")])
    else:
        pref_summary = {"checked": False,
                        "skipped": preference_skipped if preference_tokens is None else "no preference rows"}

    read = sum(s["read"] for s in per_source.values())
    n_kept = sum(s["kept"] for s in per_source.values())
    by_reason = Counter()
    for s in per_source.values():
        by_reason.update(s["by_reason"])
    metrics = {
        "read": read, "kept": n_kept, "quarantined": quarantined,
        "reject_share": round(quarantined / read, 4) if read else 0.0,
        "max_reject_share": vp.max_reject_share,
        "reject_share_ignores": list(vp.reject_share_ignores),
        "by_reason": dict(sorted(by_reason.items())),
        "kinds": {k: _length_stats(lengths[k], vp.long_row_chars) for k in KINDS},
        "long_row_chars": vp.long_row_chars,
        "tokens": token_summary,
        "preference_tokens": pref_summary,
        "pii": {"enabled": vp.pii.enabled, "total": {k: pii_total.get(k, 0) for k in vp.pii.kinds},
                "rows_redacted": rows_redacted},
        "sources": per_source,
        "failed_sources": failed,
    }
    assert n_kept + quarantined == read
    merged: dict[str, list[str]] = defaultdict(list)
    for phase in PHASES:
        for reason, msgs in examples[phase].items():
            merged[reason].extend(msgs)
    return metrics, {r: m[:EXAMPLES_PER_REASON] for r, m in merged.items()}
