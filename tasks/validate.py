"""Stage ``validate``: ingest every configured source, check it, keep the good rows, quarantine the rest.

    python -m tasks.validate --out data/validated --quarantine data/quarantine/validate.jsonl \\
        --report reports/data_validate.md --metrics metrics/validate.json

1. Ingest: each ``validate.sources`` entry (path, kind, format, field mapping) is read and
   normalized by :mod:`tempering.formats`. Rows that cannot be normalized (invalid JSON line,
   missing field, wrong type, ...) are rejected there.
2. Check: one great-expectations suite per kind runs over a pandas dataframe of derived per-row
   columns (ephemeral context, no files, no network). Expectations, in priority order (a row failing
   several gets the first as ``reason`` and all of them in ``reasons``):

   ==========================  =====================================================================
   ``unknown_role``            every role is in ``allowed_roles``
   ``bad_role_order``          optional leading system turn, then user/assistant alternating, starting
                               with user and ending with assistant (a preference prompt ends with user)
   ``empty_field``             no message content, chosen, rejected or text is empty
   ``chosen_equals_rejected``  the two answers of a preference pair differ
   ``control_chars``           no control characters besides ``\\n`` and ``\\t`` (nor U+FFFD)
   ``too_short``               every message/answer has at least ``min_chars`` characters; a text row
                               ``min_text_chars``
   ``too_long``                nothing longer than ``max_chars``
   ==========================  =====================================================================

3. Write: kept rows to ``--out/{sft,preference,text}.jsonl`` (+ ``meta.json``), rejected rows to
   ``--quarantine`` (``{source, row, reason, reasons, message, stage, original}``), a markdown data
   report and ``--metrics`` (totals, per-source counts, reject shares). kept + quarantined = read
   for every source (asserted).
4. Fail with a one-line error when any source's reject share exceeds ``max_reject_share``, after
   the quarantine, report and metrics are written (so the evidence is kept) but before ``--out``
   is, so later stages never train on a broken export.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter, defaultdict

from tempering import TemperingError
from tempering.cli import stage_main
from tempering.config import Params, ValidateParams
from tempering.formats import Accepted, Rejected, iter_source
from tempering.io import atomic_path, dump_jsonl, write_json, write_meta, write_text

KINDS = ("sft", "preference", "text")
# Priority order: the first failing check names the row's reason.
CHECKS = ("unknown_role", "bad_role_order", "empty_field", "chosen_equals_rejected", "control_chars",
          "too_short", "too_long")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")
STANDARD_ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- derived columns


def _fields(kind: str, row: dict) -> list[tuple[str, str]]:
    """(field path, text) of every content field of an internal row."""
    if kind == "sft":
        return [(f"messages[{i}].content ({m['role']})", m["content"]) for i, m in enumerate(row["messages"])]
    if kind == "preference":
        return ([(f"prompt[{i}].content ({m['role']})", m["content"]) for i, m in enumerate(row["prompt"])]
                + [("chosen", row["chosen"]), ("rejected", row["rejected"])])
    return [("text", row["text"])]


def _roles(kind: str, row: dict) -> list[str]:
    if kind == "sft":
        return [m["role"] for m in row["messages"]]
    if kind == "preference":
        return [m["role"] for m in row["prompt"]]
    return []


def derive(kind: str, row: dict, vp: ValidateParams) -> dict:
    """The per-row columns the expectations run on."""
    fields = _fields(kind, row)
    lengths = [len(text) for _, text in fields]
    roles = _roles(kind, row)
    out = {
        "n_empty": sum(1 for _, text in fields if not text.strip()),
        "n_control": sum(len(CONTROL.findall(text)) for _, text in fields),
        "min_len": min(lengths) if lengths else 0,
        "max_len": max(lengths) if lengths else 0,
    }
    if kind != "text":
        out["roles"] = ",".join(roles)
        # Role order is defined over the standard roles; other allowed roles (e.g. tool) are skipped.
        out["order"] = ",".join(r for r in roles if r in STANDARD_ROLES)
    if kind == "preference":
        out["same_answers"] = row["chosen"].strip() == row["rejected"].strip()
    return out


def _role_regex(roles: tuple[str, ...]) -> str:
    alt = "|".join(re.escape(r) for r in roles) or "(?!)"
    return rf"^(?:{alt})(?:,(?:{alt}))*$"


ORDER_REGEX = {
    "sft": r"^(?:system,)?user,assistant(?:,user,assistant)*$",
    "preference": r"^(?:system,)?user(?:,assistant,user)*$",
}


def build_suite(kind: str, vp: ValidateParams):
    """The great-expectations suite for one kind; each expectation's ``meta.reason`` names the check."""
    import great_expectations as gx

    E = gx.expectations
    min_len = vp.min_text_chars if kind == "text" else vp.min_chars
    exps = []
    if kind != "text":
        exps.append(E.ExpectColumnValuesToMatchRegex(column="roles", regex=_role_regex(vp.allowed_roles),
                                                     meta={"reason": "unknown_role"}))
        exps.append(E.ExpectColumnValuesToMatchRegex(column="order", regex=ORDER_REGEX[kind],
                                                     meta={"reason": "bad_role_order"}))
    exps.append(E.ExpectColumnValuesToBeBetween(column="n_empty", min_value=0, max_value=0,
                                                meta={"reason": "empty_field"}))
    if kind == "preference":
        exps.append(E.ExpectColumnValuesToBeInSet(column="same_answers", value_set=[False],
                                                  meta={"reason": "chosen_equals_rejected"}))
    exps.append(E.ExpectColumnValuesToBeBetween(column="n_control", min_value=0, max_value=0,
                                                meta={"reason": "control_chars"}))
    exps.append(E.ExpectColumnValuesToBeBetween(column="min_len", min_value=min_len,
                                                meta={"reason": "too_short"}))
    exps.append(E.ExpectColumnValuesToBeBetween(column="max_len", max_value=vp.max_chars,
                                                meta={"reason": "too_long"}))
    suite = gx.ExpectationSuite(name=f"tempering_{kind}")
    for exp in exps:
        suite.add_expectation(exp)
    return suite


def run_expectations(kind: str, rows: list[dict], vp: ValidateParams) -> dict[int, list[str]]:
    """Run the kind's suite over ``rows``; return {row position: [failed reasons, priority order]}."""
    if not rows:
        return {}
    import logging

    import great_expectations as gx
    import pandas as pd

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    df = pd.DataFrame([derive(kind, row, vp) for row in rows])
    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas(f"tempering_{kind}").add_dataframe_asset(kind)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(build_suite(kind, vp), result_format={"result_format": "COMPLETE"})
    failed: dict[int, set[str]] = defaultdict(set)
    for res in result.results:
        reason = res.expectation_config.meta["reason"]
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise TemperingError(f"validate: expectation {reason} on {kind} rows failed to run: "
                                 f"{res.exception_info.get('exception_message')}")
        for idx in res.result.get("unexpected_index_list") or []:
            failed[int(idx)].add(reason)
    return {i: [c for c in CHECKS if c in reasons] for i, reasons in failed.items()}


def explain(reason: str, kind: str, row: dict, vp: ValidateParams) -> str:
    """A one-line message naming the offending field for one failed check."""
    fields = _fields(kind, row)
    roles = _roles(kind, row)
    if reason == "unknown_role":
        i, role = next((i, r) for i, r in enumerate(roles) if r not in vp.allowed_roles)
        where = "messages" if kind == "sft" else "prompt"
        return f"{where}[{i}].role {role!r} is not one of {', '.join(vp.allowed_roles)}"
    if reason == "bad_role_order":
        where = "messages" if kind == "sft" else "prompt"
        seq = [(i, r) for i, r in enumerate(roles) if r in STANDARD_ROLES]
        last = "user" if kind == "preference" else "assistant"
        for pos, (i, r) in enumerate(seq):
            if r == "system" and pos > 0:
                return f"{where}[{i}]: a system turn after the first turn"
            if pos > 0 and r == seq[pos - 1][1]:
                return f"{where}[{i}]: two consecutive {r} turns"
            start = 1 if seq[0][1] == "system" else 0
            if pos == start and r != "user":
                return f"{where}[{i}]: the conversation must start with a user turn (got {r})"
        if not seq or seq[-1][1] == "system":
            return f"{where}: no user turn"
        return f"{where}[{seq[-1][0]}]: must end with {'a user' if last == 'user' else 'an assistant'} turn " \
               f"(got {seq[-1][1]})"
    if reason == "empty_field":
        name = next(name for name, text in fields if not text.strip())
        return f"field {name} is empty"
    if reason == "chosen_equals_rejected":
        return "fields chosen and rejected are identical"
    if reason == "control_chars":
        name, text = next((n, t) for n, t in fields if CONTROL.search(t))
        ch = CONTROL.search(text).group()
        return f"field {name} contains control character U+{ord(ch):04X} at offset {text.index(ch)}"
    if reason == "too_short":
        limit = vp.min_text_chars if kind == "text" else vp.min_chars
        name, text = min(fields, key=lambda f: len(f[1]))
        return f"field {name} is too short ({len(text)} < {limit} characters)"
    if reason == "too_long":
        name, text = max(fields, key=lambda f: len(f[1]))
        return f"field {name} is too long ({len(text)} > {vp.max_chars} characters)"
    return reason


# ----------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_report(metrics: dict, examples: dict[str, list[str]]) -> str:
    lines = ["# Data validation report", "",
             f"Read **{metrics['read']}** rows from {len(metrics['sources'])} source(s): kept **{metrics['kept']}**, "
             f"quarantined **{metrics['quarantined']}** ({_pct(metrics['reject_share'])}). "
             f"Limit per source: {_pct(metrics['max_reject_share'])}.", ""]
    if metrics["failed_sources"]:
        lines += [f"**FAILED**: reject share above the limit in {', '.join(metrics['failed_sources'])}.", ""]
    lines += ["## Per source", "", "| source | kind | format | read | kept | dropped | reject share | reasons |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for path, s in metrics["sources"].items():
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(s["by_reason"].items(), key=lambda kv: -kv[1])) or "-"
        flag = " **(over limit)**" if path in metrics["failed_sources"] else ""
        lines.append(f"| `{path}` | {s['kind']} | {s['format']} | {s['read']} | {s['kept']} | {s['quarantined']} | "
                     f"{_pct(s['reject_share'])}{flag} | {reasons} |")
    lines += ["", "## Kept rows per kind", "", "| kind | rows | median chars | p95 chars | max chars | "
              f"over {metrics['long_row_chars']} chars |", "|---|---:|---:|---:|---:|---:|"]
    for kind, k in metrics["kinds"].items():
        over = "- (packed)" if kind == "text" else k["over_long_row_chars"]
        lines.append(f"| {kind} | {k['rows']} | {k['chars_p50']} | {k['chars_p95']} | {k['chars_max']} | {over} |")
    lines += ["", f"SFT and preference rows over {metrics['long_row_chars']} characters (`validate.long_row_chars`) "
              "are likely to exceed a 256-token training `max_length` (about 4 characters per token) and be "
              "truncated; text rows are packed into blocks, so their length does not matter.", ""]
    if metrics["by_reason"]:
        lines += ["## Reasons", "", "| reason | rows |", "|---|---:|"]
        lines += [f"| {r} | {n} |" for r, n in sorted(metrics["by_reason"].items(), key=lambda kv: -kv[1])]
        lines += ["", "## Examples (first 3 per reason)", ""]
        for reason, msgs in sorted(examples.items()):
            lines.append(f"- **{reason}**")
            lines += [f"  - {m}" for m in msgs[:3]]
        lines.append("")
    return "\n".join(lines) + "\n"


def _length_stats(rows: list[dict], kind: str, long_chars: int) -> dict:
    import numpy as np

    sizes = [sum(len(t) for _, t in _fields(kind, r)) for r in rows]
    if not sizes:
        return {"rows": 0, "chars_p50": 0, "chars_p95": 0, "chars_max": 0, "over_long_row_chars": 0}
    arr = np.asarray(sizes)
    return {"rows": len(sizes), "chars_p50": int(np.percentile(arr, 50)), "chars_p95": int(np.percentile(arr, 95)),
            "chars_max": int(arr.max()), "over_long_row_chars": int((arr > long_chars).sum())}


# ----------------------------------------------------------------------------- stage


def validate_sources(vp: ValidateParams) -> tuple[dict[str, list[dict]], list[dict], dict, dict]:
    """Ingest and check every source: (kept rows per kind, quarantine rows, metrics, examples)."""
    if not vp.sources:
        raise TemperingError("validate.sources is empty: list at least one input file in params.yaml")
    seen = set()
    for spec in vp.sources:
        if spec.path in seen:
            raise TemperingError(f"validate.sources: {spec.path} is listed twice")
        seen.add(spec.path)

    accepted: dict[str, list[Accepted]] = {k: [] for k in KINDS}
    quarantine: list[dict] = []
    per_source: dict[str, dict] = {}
    for spec in vp.sources:
        stats = {"kind": spec.kind, "format": spec.format, "read": 0, "kept": 0, "quarantined": 0,
                 "by_reason": Counter()}
        per_source[spec.path] = stats
        for res in iter_source(spec, chunk_chars=vp.text_chunk_chars):
            stats["read"] += 1
            if isinstance(res, Rejected):
                q = res.quarantine("validate")
                q["reasons"] = [res.reason]
                quarantine.append(q)
                stats["by_reason"][res.reason] += 1
            else:
                accepted[spec.kind].append((spec.path, res))

    kept: dict[str, list[dict]] = {k: [] for k in KINDS}
    examples: dict[str, list[str]] = defaultdict(list)
    for q in quarantine:
        examples[q["reason"]].append(q["message"])
    for kind in KINDS:
        items = accepted[kind]
        failures = run_expectations(kind, [res.row for _, res in items], vp)
        for i, (path, res) in enumerate(items):
            reasons = failures.get(i)
            if not reasons:
                kept[kind].append(res.row)
                per_source[path]["kept"] += 1
                continue
            message = f"{res.file}:{res.index}: {explain(reasons[0], kind, res.row, vp)}"
            quarantine.append({"source": res.file, "row": res.index, "reason": reasons[0], "reasons": reasons,
                               "message": message, "stage": "validate", "original": res.original})
            per_source[path]["by_reason"][reasons[0]] += 1
            examples[reasons[0]].append(message)

    failed = []
    for path, s in per_source.items():
        s["quarantined"] = sum(s["by_reason"].values())
        if s["kept"] + s["quarantined"] != s["read"]:  # the bookkeeping invariant
            raise AssertionError(f"{path}: kept {s['kept']} + quarantined {s['quarantined']} != read {s['read']}")
        s["reject_share"] = round(s["quarantined"] / s["read"], 4) if s["read"] else 0.0
        s["by_reason"] = dict(sorted(s["by_reason"].items()))
        if s["reject_share"] > vp.max_reject_share:
            failed.append(path)
    read = sum(s["read"] for s in per_source.values())
    n_kept = sum(len(v) for v in kept.values())
    by_reason = Counter()
    for s in per_source.values():
        by_reason.update(s["by_reason"])
    metrics = {
        "read": read, "kept": n_kept, "quarantined": len(quarantine),
        "reject_share": round(len(quarantine) / read, 4) if read else 0.0,
        "max_reject_share": vp.max_reject_share,
        "by_reason": dict(sorted(by_reason.items())),
        "kinds": {k: _length_stats(kept[k], k, vp.long_row_chars) for k in KINDS},
        "long_row_chars": vp.long_row_chars,
        "sources": per_source,
        "failed_sources": failed,
    }
    assert n_kept + len(quarantine) == read
    return kept, quarantine, metrics, examples


def run(params: Params, out: str, quarantine: str, report: str, metrics: str) -> dict:
    started = time.time()
    vp = params.validate_
    kept, rejected, summary, examples = validate_sources(vp)
    summary["wall_time_s"] = round(time.time() - started, 2)

    with atomic_path(quarantine) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            dump_jsonl(rejected, fh)
    write_text(report, render_report(summary, examples))
    write_json(metrics, summary)
    if summary["failed_sources"]:
        worst = max(summary["failed_sources"], key=lambda p: summary["sources"][p]["reject_share"])
        s = summary["sources"][worst]
        top = max(s["by_reason"].items(), key=lambda kv: kv[1])[0]
        raise TemperingError(
            f"{worst}: {s['quarantined']} of {s['read']} rows rejected ({_pct(s['reject_share'])} > "
            f"validate.max_reject_share {_pct(vp.max_reject_share)}; mostly {top}); see {report} and {quarantine}")

    with atomic_path(out) as tmp:
        tmp.mkdir()
        for kind in KINDS:
            with open(tmp / f"{kind}.jsonl", "w", encoding="utf-8") as fh:
                dump_jsonl(kept[kind], fh)
        write_meta(tmp, stage="validate", params=vp, started=started,
                   inputs={spec.path: spec.path for spec in vp.sources},
                   extra={"counts": {k: len(v) for k, v in kept.items()}})
    return {"out": out, "read": summary["read"], "kept": summary["kept"], "quarantined": summary["quarantined"],
            "by_reason": summary["by_reason"], "kept_by_kind": {k: len(v) for k, v in kept.items()},
            "wall_time_s": round(time.time() - started, 2)}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/validated", help="folder for sft/preference/text.jsonl")
    parser.add_argument("--quarantine", default="data/quarantine/validate.jsonl", help="rejected rows (JSONL)")
    parser.add_argument("--report", default="reports/data_validate.md", help="markdown data report")
    parser.add_argument("--metrics", default="metrics/validate.json", help="metrics JSON")


def main(argv=None) -> int:
    return stage_main("validate", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
