"""Stage ``validate``: ingest every configured source, check it, keep the good rows, quarantine the rest.

    python -m tasks.validate --out data/validated --quarantine data/quarantine/validate.jsonl \\
        --report reports/data_validate.md --html reports/data_validate.html \\
        --metrics metrics/validate.json --tokenizer models/base

The stage is wiring; the checks live in the library: the row rules in :mod:`tempering.filters`
(each stated once, as a filter ``(row) -> Reason | None``), the streaming runner in
:mod:`tempering.datacheck`, PII in :mod:`tempering.pii` and the dataset-level great-expectations
suite in :mod:`tempering.expectations`. One pass over the rows, memory bounded whatever the input
size (kept rows stream into the temporary ``--out`` folder, quarantine rows into spill files):

1. Ingest: each ``validate.sources`` entry (path, kind, format, field mapping) is read and
   normalized by :mod:`tempering.formats`. Rows that cannot be normalized (invalid JSON line,
   missing field, wrong type, ...) are rejected there.
2. Check: the content filters of the row's kind, in priority order (a row failing several gets the
   first as ``reason`` and all of them in ``reasons``):

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

3. PII (``validate.pii``): e-mail addresses, phone numbers and secret-looking tokens in kept rows
   are replaced by ``[REDACTED_*]`` (ids recomputed) and counted per kind and source.
4. Token checks (``validate.tokens``, with ``--tokenizer``): every kept SFT row is tokenized with
   :func:`tempering.train.data.tokenize_conversation` at ``sft.max_length`` / ``sft.chat_template``
   (declared in ``dvc.yaml``); rows whose supervised share is below ``min_supervised_share`` are
   quarantined (``low_supervision``; ``chat_template_error`` when the template cannot render a row),
   and the dataset suite checks the truncation rate and the share of examples whose end-of-turn
   token is outside the loss mask against their limits. Preference rows
   (``validate.preference_tokens``) are tokenized the way DPO trains on them
   (:func:`tempering.train.data.tokenize_preference`, :func:`~tempering.train.data.dpo_truncate`) at
   ``dpo.max_length`` / ``dpo.max_prompt_length`` (also declared in ``dvc.yaml``): a pair whose
   answers are identical once truncated is quarantined (``same_after_truncation``), and pairs whose
   prompt or an answer would be cut are either quarantined (``prompt_truncated``,
   ``answer_truncated``; ``truncation: quarantine``) or counted against
   ``max_prompt_truncation_rate`` / ``max_answer_truncation_rate`` (``truncation: count``).
5. Write: kept rows to ``--out/{sft,preference,text}.jsonl`` (+ ``meta.json``), rejected rows to
   ``--quarantine`` (``{source, row, reason, reasons, message, stage, original}``), a markdown data
   report (``--html``: the same as a standalone page) and ``--metrics`` (totals, per-source counts,
   reject shares, token stats, PII counts). kept + quarantined = read for every source (asserted).
6. Fail with a one-line error when the dataset suite finds any source's reject share (not counting
   the reasons in ``reject_share_ignores``, e.g. ties) above ``max_reject_share`` or a token rate
   above its limit, after the quarantine, report and metrics are written (so the evidence is kept)
   but before ``--out`` is renamed into place, so later stages never train on a broken export.
"""

from __future__ import annotations

import argparse
import time

from tempering import TemperingError
from tempering.cli import stage_main
from tempering.config import Params, ValidateParams
from tempering.datacheck import FileSink, ListSink, check_sources, run_checks
from tempering.filters import KINDS, PreferenceTokenFilter, SFTTokenFilter
from tempering.io import atomic_path, provenance, write_json, write_meta, write_text
from tempering.records import ValidateRecord, validated

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = (
    "validate",
    "sft.max_length",
    "sft.chat_template",
    "dpo.max_length",
    "dpo.max_prompt_length",
)


# ----------------------------------------------------------------------------- wiring


def token_filters(vp: ValidateParams, tokenizer=None, *, max_length: int | None = None,
                  chat_template: str | None = None, dpo_max_length: int | None = None,
                  dpo_max_prompt_length: int | None = None) -> dict:
    """The token filters ``vp`` asks for, or why each is skipped: the keyword arguments of
    :func:`tempering.datacheck.run_checks`."""
    out: dict = {"sft_tokens": None, "preference_tokens": None}
    if not vp.tokens.enabled:
        out["tokens_skipped"] = "disabled (validate.tokens.enabled: false)"
    elif tokenizer is None or max_length is None:
        out["tokens_skipped"] = "no tokenizer given (--tokenizer)"
    else:
        out["sft_tokens"] = SFTTokenFilter(tokenizer, max_length=max_length, chat_template=chat_template,
                                           tp=vp.tokens)
    if not vp.preference_tokens.enabled:
        out["preference_skipped"] = "disabled (validate.preference_tokens.enabled: false)"
    elif tokenizer is None or dpo_max_length is None or dpo_max_prompt_length is None:
        out["preference_skipped"] = "no tokenizer given (--tokenizer)"
    else:
        out["preference_tokens"] = PreferenceTokenFilter(
            tokenizer, max_length=dpo_max_length, max_prompt_length=dpo_max_prompt_length,
            chat_template=chat_template, ptp=vp.preference_tokens)
    return out


def validate_sources(vp: ValidateParams, *, tokenizer=None, max_length: int | None = None,
                     chat_template: str | None = None, dpo_max_length: int | None = None,
                     dpo_max_prompt_length: int | None = None) -> tuple[dict[str, list[dict]], list[dict], dict, dict]:
    """Check every source in memory: (kept rows per kind, quarantine rows, metrics, examples).

    The same checks as the stage, into a :class:`~tempering.datacheck.ListSink` (for tests and small
    inputs; the stage streams into files). With a ``tokenizer`` (and ``max_length``) the SFT token
    checks run too; their aggregate verdict is ``metrics["tokens"]["failed"]`` (the caller decides to
    stop). With ``dpo_max_length`` and ``dpo_max_prompt_length`` the preference token checks run as
    well (``metrics["preference_tokens"]``).
    """
    sink = ListSink()
    metrics, examples = run_checks(vp, sink, **token_filters(
        vp, tokenizer, max_length=max_length, chat_template=chat_template, dpo_max_length=dpo_max_length,
        dpo_max_prompt_length=dpo_max_prompt_length))
    return sink.kept, sink.quarantined(), metrics, examples


def _token_failure(tok: dict, report: str) -> str:
    parts = []
    if "truncation_rate" in tok["failed"]:
        parts.append(f"{tok['truncated']} of {tok['examples']} SFT examples ({_pct(tok['truncation_rate'])}) are longer "
                     f"than sft.max_length={tok['max_length']} tokens after the chat template "
                     f"(validate.tokens.max_truncation_rate {_pct(tok['max_truncation_rate'])}); raise sft.max_length "
                     "or shorten the data")
    if "eot_missing_rate" in tok["failed"]:
        what = repr(tok["end_of_turn"].strip()) if tok["end_of_turn"].strip() else "none: the template adds no marker"
        parts.append(f"the assistant end-of-turn token ({what}) is outside the loss mask in {tok['eot_missing']} of "
                     f"{tok['examples']} SFT examples (validate.tokens.max_eot_missing_rate "
                     f"{_pct(tok['max_eot_missing_rate'])}); the model would not learn to stop: fix the chat template")
    return "token checks: " + "; ".join(parts) + f"; see {report}"


def _preference_token_failure(tok: dict, report: str) -> str:
    parts = []
    if "prompt_truncation_rate" in tok["failed"]:
        parts.append(f"{tok['prompt_truncated']} of {tok['examples']} preference pairs "
                     f"({_pct(tok['prompt_truncation_rate'])}) have prompts longer than dpo.max_prompt_length="
                     f"{tok['max_prompt_length']} tokens (validate.preference_tokens.max_prompt_truncation_rate "
                     f"{_pct(tok['max_prompt_truncation_rate'])}); raise dpo.max_prompt_length or shorten the data")
    if "answer_truncation_rate" in tok["failed"]:
        parts.append(f"{tok['answer_truncated']} of {tok['examples']} preference pairs "
                     f"({_pct(tok['answer_truncation_rate'])}) have an answer cut at dpo.max_length="
                     f"{tok['max_length']} tokens (validate.preference_tokens.max_answer_truncation_rate "
                     f"{_pct(tok['max_answer_truncation_rate'])}); raise dpo.max_length or shorten the data")
    return "preference token checks: " + "; ".join(parts) + f"; see {report}"


# ----------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_report(metrics: dict, examples: dict[str, list[str]]) -> str:
    lines = ["# Data validation report", "",
             f"Read **{metrics['read']}** rows from {len(metrics['sources'])} source(s): kept **{metrics['kept']}**, "
             f"quarantined **{metrics['quarantined']}** ({_pct(metrics['reject_share'])}). "
             f"Limit per source: {_pct(metrics['max_reject_share'])}.", ""]
    if metrics["failed_sources"]:
        lines += [f"**FAILED**: reject share above the limit in {', '.join(metrics['failed_sources'])}.", ""]
    tok = metrics.get("tokens") or {}
    if tok.get("failed"):
        lines += [f"**FAILED**: token checks broken: {', '.join(tok['failed'])} (see Token checks).", ""]
    ptok = metrics.get("preference_tokens") or {}
    if ptok.get("failed"):
        lines += [f"**FAILED**: preference token checks broken: {', '.join(ptok['failed'])} "
                  "(see Token checks (preference)).", ""]
    ignored = metrics.get("reject_share_ignores") or []
    if ignored:
        lines += [f"Not counted towards the limit (still quarantined): {', '.join(ignored)}.", ""]
    lines += ["## Per source", "", "| source | kind | format | read | kept | dropped | reject share | reasons |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for path, s in metrics["sources"].items():
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(s["by_reason"].items(), key=lambda kv: -kv[1])) or "-"
        flag = " **(over limit)**" if path in metrics["failed_sources"] else ""
        counted = s.get("counted_reject_share", s["reject_share"])
        share = _pct(s["reject_share"]) + (f" ({_pct(counted)} counted)" if counted != s["reject_share"] else "")
        lines.append(f"| `{path}` | {s['kind']} | {s['format']} | {s['read']} | {s['kept']} | {s['quarantined']} | "
                     f"{share}{flag} | {reasons} |")
    lines += ["", "## Kept rows per kind", "", "| kind | rows | median chars | p95 chars | max chars | "
              f"over {metrics['long_row_chars']} chars |", "|---|---:|---:|---:|---:|---:|"]
    for kind, k in metrics["kinds"].items():
        over = "- (packed)" if kind == "text" else k["over_long_row_chars"]
        lines.append(f"| {kind} | {k['rows']} | {k['chars_p50']} | {k['chars_p95']} | {k['chars_max']} | {over} |")
    lines += ["", f"SFT and preference rows over {metrics['long_row_chars']} characters (`validate.long_row_chars`) "
              "are likely to exceed a 256-token training `max_length` (about 4 characters per token) and be "
              "truncated; text rows are packed into blocks, so their length does not matter.", ""]
    lines += ["## Token checks (SFT, after the chat template)", ""]
    if not tok.get("checked"):
        lines += [f"Not run: {tok.get('skipped', 'no tokenizer given')}.", ""]
    else:
        def mark(name: str) -> str:
            return " **(over limit)**" if name in tok["failed"] else ""
        lines += ["| check | value | limit |", "|---|---:|---:|",
                  f"| examples checked | {tok['examples']} | |",
                  f"| tokens p50 / p95 / max | {tok['tokens_p50']} / {tok['tokens_p95']} / {tok['tokens_max']} | "
                  f"max_length {tok['max_length']} |",
                  f"| truncated at max_length | {tok['truncated']} ({_pct(tok['truncation_rate'])}){mark('truncation_rate')}"
                  f" | {_pct(tok['max_truncation_rate'])} |",
                  f"| supervised share p5 / p50 / min | {tok['supervised_share_p5']} / {tok['supervised_share_p50']} / "
                  f"{tok['supervised_share_min']} | row minimum {tok['min_supervised_share']} |",
                  f"| end-of-turn outside the loss mask | {tok['eot_missing']} ({_pct(tok['eot_missing_rate'])})"
                  f"{mark('eot_missing_rate')} | {_pct(tok['max_eot_missing_rate'])} |",
                  f"| end-of-turn cut by truncation | {tok['eot_cut_by_truncation']} | |", "",
                  f"End-of-turn marker trained after each reply: `{tok['end_of_turn'].strip() or '(none)'}`"
                  + ("" if tok["end_of_turn_is_eos"] else " (not the tokenizer's EOS: generation must stop on it)")
                  + ".", ""]
    lines += ["## Token checks (preference pairs, as DPO sees them)", ""]
    if not ptok.get("checked"):
        lines += [f"Not run: {ptok.get('skipped', 'no tokenizer given')}.", ""]
    else:
        def pmark(name: str) -> str:
            return " **(over limit)**" if name in ptok["failed"] else ""
        mode = ("quarantined" if ptok["truncation"] == "quarantine" else "counted against the limit")
        lines += ["| check | value | limit |", "|---|---:|---:|",
                  f"| pairs checked | {ptok['examples']} | |",
                  f"| prompt tokens p50 / p95 / max | {ptok['prompt_tokens_p50']} / {ptok['prompt_tokens_p95']} / "
                  f"{ptok['prompt_tokens_max']} | max_prompt_length {ptok['max_prompt_length']} |",
                  f"| longer answer tokens p50 / p95 / max | {ptok['answer_tokens_p50']} / {ptok['answer_tokens_p95']}"
                  f" / {ptok['answer_tokens_max']} | max_length {ptok['max_length']} (with the prompt) |",
                  f"| prompt truncated | {ptok['prompt_truncated']} ({_pct(ptok['prompt_truncation_rate'])})"
                  f"{pmark('prompt_truncation_rate')} | {_pct(ptok['max_prompt_truncation_rate'])} |",
                  f"| an answer truncated | {ptok['answer_truncated']} ({_pct(ptok['answer_truncation_rate'])})"
                  f"{pmark('answer_truncation_rate')} | {_pct(ptok['max_answer_truncation_rate'])} |",
                  f"| answers identical after truncation (quarantined) | {ptok['same_after_truncation']} | 0 |", "",
                  f"Truncated pairs are {mode} (`validate.preference_tokens.truncation: {ptok['truncation']}`).", ""]
    pii = metrics.get("pii") or {}
    lines += ["## PII redaction", ""]
    if not pii.get("enabled"):
        lines += ["Disabled (`validate.pii.enabled: false`).", ""]
    else:
        lines += [f"Replaced in kept rows: {', '.join(f'{k} {v}' for k, v in pii['total'].items())} "
                  f"({pii['rows_redacted']} rows changed).", ""]
        per = [(p, s["redacted"]) for p, s in metrics["sources"].items() if s.get("redacted")]
        if per:
            lines += ["| source | " + " | ".join(pii["total"]) + " |", "|---|" + "---:|" * len(pii["total"])]
            lines += [f"| `{p}` | " + " | ".join(str(r.get(k, 0)) for k in pii["total"]) + " |" for p, r in per]
            lines.append("")
    if metrics["by_reason"]:
        lines += ["## Reasons", "", "| reason | rows |", "|---|---:|"]
        lines += [f"| {r} | {n} |" for r, n in sorted(metrics["by_reason"].items(), key=lambda kv: -kv[1])]
        lines += ["", "## Examples (first 3 per reason)", ""]
        for reason, msgs in sorted(examples.items()):
            lines.append(f"- **{reason}**")
            lines += [f"  - {m[:300]}" for m in msgs[:3]]
        lines.append("")
    return "\n".join(lines) + "\n"


def run(params: Params, out: str, quarantine: str, report: str, metrics: str, tokenizer: str | None = None,
        html: str | None = None) -> dict:
    started = time.time()
    vp = params.validate_
    check_sources(vp)
    tok = None
    if tokenizer and (vp.tokens.enabled or vp.preference_tokens.enabled):
        from tempering.train.data import load_tokenizer
        from tempering.train.precision import quiet_transformers

        quiet_transformers()
        tok = load_tokenizer(tokenizer, params.sft.chat_template)
    filters = token_filters(vp, tok, max_length=params.sft.max_length, chat_template=params.sft.chat_template,
                            dpo_max_length=params.dpo.max_length, dpo_max_prompt_length=params.dpo.max_prompt_length)
    # Kept rows stream into the temporary --out folder; it is renamed into place only when every
    # check passed (a failure below leaves the previous --out as it was).
    with atomic_path(out) as tmp, FileSink(tmp, tmp / ".quarantine-spill") as sink:
        summary, examples = run_checks(vp, sink, **filters)
        summary["wall_time_s"] = round(time.time() - started, 2)
        summary["rows_per_s"] = (round(summary["read"] / summary["wall_time_s"], 1)
                                 if summary["wall_time_s"] else None)
        with atomic_path(quarantine) as qtmp, open(qtmp, "wb") as fh:
            sink.write_quarantine(fh)
        text = render_report(summary, examples)
        write_text(report, text)
        if html:
            from tempering import templating

            write_text(html, templating.render("data_validate.html.j2", metrics=summary, examples=examples,
                                               title="tempering data validation report"))
        summary["provenance"] = provenance(started)
        write_json(metrics, validated(ValidateRecord, summary, metrics))
        if summary["failed_sources"]:
            worst = max(summary["failed_sources"], key=lambda p: summary["sources"][p]["reject_share"])
            s = summary["sources"][worst]
            top = max(s["by_reason"].items(), key=lambda kv: kv[1])[0]
            worst_share = s["counted_reject_share"]
            not_counted = (f", not counting {', '.join(vp.reject_share_ignores)}"
                           if worst_share != s["reject_share"] else "")
            raise TemperingError(
                f"{worst}: {s['quarantined']} of {s['read']} rows rejected ({_pct(worst_share)}{not_counted} > "
                f"validate.max_reject_share {_pct(vp.max_reject_share)}; mostly {top}); see {report} and {quarantine}")
        if summary["tokens"].get("failed"):
            raise TemperingError(_token_failure(summary["tokens"], report))
        if summary["preference_tokens"].get("failed"):
            raise TemperingError(_preference_token_failure(summary["preference_tokens"], report))
        kept_by_kind = {k: sum(s["kept"] for s in summary["sources"].values() if s["kind"] == k) for k in KINDS}
        write_meta(tmp, stage="validate", params=vp, started=started, reproducible=True,
                   inputs={spec.path: spec.path for spec in vp.sources},
                   extra={"counts": kept_by_kind,
                          "sft_tokens": {"max_length": params.sft.max_length,
                                         "chat_template": params.sft.chat_template, "tokenizer": tokenizer},
                          "preference_tokens": {"max_length": params.dpo.max_length,
                                                "max_prompt_length": params.dpo.max_prompt_length,
                                                "tokenizer": tokenizer}})
    return {"out": out, "read": summary["read"], "kept": summary["kept"], "quarantined": summary["quarantined"],
            "by_reason": summary["by_reason"], "kept_by_kind": kept_by_kind,
            "pii_redacted": summary["pii"]["total"], "token_checks": summary["tokens"].get("checked", False),
            "preference_token_checks": summary["preference_tokens"].get("checked", False),
            "wall_time_s": round(time.time() - started, 2)}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/validated", help="folder for sft/preference/text.jsonl")
    parser.add_argument("--quarantine", default="data/quarantine/validate.jsonl", help="rejected rows (JSONL)")
    parser.add_argument("--report", default="reports/data_validate.md", help="markdown data report")
    parser.add_argument("--html", default=None, help="the same report as a standalone HTML page")
    parser.add_argument("--metrics", default="metrics/validate.json", help="metrics JSON")
    parser.add_argument("--tokenizer", default=None,
                        help="model folder whose tokenizer + chat template the token checks use "
                             "(sft.max_length, sft.chat_template; dpo.max_length, dpo.max_prompt_length); "
                             "without it they are skipped")


def main(argv=None) -> int:
    return stage_main("validate", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
