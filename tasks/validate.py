"""Stage ``validate``: ingest every configured source, check it, keep the good rows, quarantine the rest.

    python -m tasks.validate --out data/validated --quarantine data/quarantine/validate.jsonl \\
        --report reports/data_validate.md --html reports/data_validate.html \\
        --metrics metrics/validate.json --tokenizer models/base

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

3. PII (``validate.pii``): e-mail addresses, phone numbers and secret-looking tokens in kept rows
   are replaced by ``[REDACTED_*]`` (ids recomputed) and counted per kind and source.
4. Token checks (``validate.tokens``, with ``--tokenizer``): every kept SFT row is tokenized with
   :func:`tempering.train.data.tokenize_conversation` at ``sft.max_length`` / ``sft.chat_template``
   (declared in ``dvc.yaml``); a second great-expectations suite quarantines rows whose supervised
   share is below ``min_supervised_share`` (``low_supervision``; ``chat_template_error`` when the
   template cannot render a row) and checks the truncation rate and the share of examples whose
   end-of-turn token is outside the loss mask against their limits. Preference rows
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
6. Fail with a one-line error when any source's reject share (not counting the reasons in
   ``reject_share_ignores``, e.g. ties) exceeds ``max_reject_share`` or a token threshold is broken,
   after the quarantine, report and metrics are written (so the evidence is kept) but before
   ``--out`` is, so later stages never train on a broken export.
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
from tempering.io import atomic_path, content_id, write_json, write_jsonl, write_meta, write_text

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = (
    "validate",
    "sft.max_length",
    "sft.chat_template",
    "dpo.max_length",
    "dpo.max_prompt_length",
)

KINDS = ("sft", "preference", "text")
# Priority order: the first failing check names the row's reason.
CHECKS = ("unknown_role", "bad_role_order", "empty_field", "chosen_equals_rejected", "control_chars",
          "too_short", "too_long")
# C0 controls but \t and \n, DEL, the replacement character (a decode already failed upstream)
# and lone UTF-16 surrogates (from "\ud800"-style JSON escapes; they cannot be written as UTF-8).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd\ud800-\udfff]")
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


def gx_context():
    """An ephemeral great-expectations context (no files, no network) with its progress bars off."""
    import logging

    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def run_expectations(kind: str, rows: list[dict], vp: ValidateParams) -> dict[int, list[str]]:
    """Run the kind's suite over ``rows``; return {row position: [failed reasons, priority order]}."""
    if not rows:
        return {}
    import logging

    import great_expectations as gx
    import pandas as pd

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    df = pd.DataFrame([derive(kind, row, vp) for row in rows])
    context = gx_context()
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


# ----------------------------------------------------------------------------- PII

PII_PATTERNS: dict[str, list[re.Pattern]] = {
    "email": [re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{1,63}@((?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24})"
                         r"(?![\w@-])")],
    "phone": [
        # international: +CC then 7-14 more digits in groups ("+44 20 7946 0958", "+1-202-555-0143")
        re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,2}(?:[ .-]?\d{2,4}){2,4}(?![\w-])"),
        # North American: "(202) 555-0143", "202-555-0143", "1-202.555.0143" (one separator style)
        re.compile(r"(?<![\w-])(?:1[-. ])?(?:\(\d{3}\) ?\d{3}[-. ]\d{4}|\d{3}([-.])\d{3}\1\d{4})(?![\w-])"),
    ],
    "secret": [
        re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
        re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])"),             # AWS access key id
        re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"),  # GitHub
        re.compile(r"(?<![A-Za-z0-9])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),                  # OpenAI / Anthropic
        re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}"),                          # Slack
        re.compile(r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{35}"),                                  # Google API key
        re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}"),                                    # Hugging Face
        re.compile(r"(?<![A-Za-z0-9])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT
        # key = "literal" assignments: only the literal is replaced
        re.compile(r"(?i)(?<![A-Za-z0-9])(?:api[_-]?key|secret[_-]?key|client[_-]?secret|access[_-]?token|auth[_-]?token"
                   r"|password|passwd|secret)[\"']?\s*[:=]\s*[\"']([^\s\"']{8,})[\"']"),
    ],
}
PII_PLACEHOLDER = {"email": "[REDACTED_EMAIL]", "phone": "[REDACTED_PHONE]", "secret": "[REDACTED_SECRET]"}
_PII_HINT = {"email": "@", "phone": None, "secret": None}


def redact_text(text: str, pp) -> tuple[str, Counter]:
    """Replace PII in ``text`` (``pp`` = PiiParams); returns (text, counts per kind)."""
    counts: Counter = Counter()
    allow = {d.lower() for d in pp.allow_email_domains}
    for kind in pp.kinds:
        hint = _PII_HINT[kind]
        if hint and hint not in text:
            continue
        for pattern in PII_PATTERNS[kind]:
            def sub(m: re.Match, kind=kind) -> str:
                if kind == "email" and m.group(1).lower() in allow:
                    return m.group(0)
                if kind == "phone" and not 8 <= sum(c.isdigit() for c in m.group(0)) <= 15:
                    return m.group(0)
                counts[kind] += 1
                if kind == "secret" and m.lastindex:  # key = "literal": replace the literal only
                    start, end = m.span(m.lastindex)
                    whole = m.group(0)
                    return whole[: start - m.start()] + PII_PLACEHOLDER[kind] + whole[end - m.start():]
                return PII_PLACEHOLDER[kind]
            text = pattern.sub(sub, text)
    return text, counts


def redact_row(kind: str, row: dict, pp) -> tuple[dict, Counter]:
    """A copy of an internal row with PII replaced in every content field (``id`` recomputed)."""
    total: Counter = Counter()

    def red(text: str) -> str:
        out, c = redact_text(text, pp)
        total.update(c)
        return out

    if kind == "sft":
        content = {"messages": [{**m, "content": red(m["content"])} for m in row["messages"]]}
    elif kind == "preference":
        content = {"prompt": [{**m, "content": red(m["content"])} for m in row["prompt"]],
                   "chosen": red(row["chosen"]), "rejected": red(row["rejected"])}
    else:
        content = {"text": red(row["text"])}
    if not total:
        return row, total
    return {"id": content_id(content), "source": row["source"], **content}, total


# ----------------------------------------------------------------------------- token checks

TOKEN_CHECKS = ("chat_template_error", "low_supervision")


def end_of_turn_marker(tokenizer, chat_template: str | None) -> tuple[str, list[int]]:
    """What the template appends after an assistant reply inside the trained span (e.g. ``<|im_end|>``)."""
    from tempering.train.data import assistant_char_spans

    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    text, spans = assistant_char_spans(tokenizer, probe, chat_template)
    if not spans:
        return "", []
    reply = text[spans[-1][0]:spans[-1][1]]
    marker = reply[reply.rfind("pong") + 4:] if "pong" in reply else ""
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker.strip() else []
    return marker, list(ids)


def token_stats(rows: list[dict], tokenizer, *, max_length: int, chat_template: str | None) -> list[dict]:
    """Per SFT row: tokens, supervised share after truncation, truncation, end-of-turn in the mask.

    Uses :func:`tempering.train.data.tokenize_conversation`, the exact tokenization SFT trains on.
    """
    from tempering.train.data import tokenize_conversation

    _, eot = end_of_turn_marker(tokenizer, chat_template)
    out = []
    for row in rows:
        try:
            enc = tokenize_conversation(tokenizer, row["messages"], None, chat_template)
        except (ValueError, TypeError, KeyError) as exc:
            out.append({"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            continue
        ids, labels = enc["input_ids"], enc["labels"]
        n = len(ids)
        kept_labels = labels[:max_length]
        supervised = sum(1 for x in kept_labels if x != -100)
        last = max((k for k, x in enumerate(labels) if x != -100), default=-1)
        eot_ok = bool(eot) and last >= len(eot) - 1 and ids[last - len(eot) + 1:last + 1] == eot
        out.append({"error": None, "tokens": n, "supervised": supervised,
                    "supervised_share": supervised / min(n, max_length) if n else 0.0,
                    "truncated": n > max_length, "eot_missing": not eot_ok,
                    "eot_cut": eot_ok and last >= max_length})
    return out


def run_token_expectations(stats: list[dict], tp) -> tuple[dict[int, str], dict]:
    """The SFT token suite (great-expectations): per-row failures and the aggregate results."""
    import logging

    import great_expectations as gx
    import pandas as pd

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    per_row = {i: "chat_template_error" for i, s in enumerate(stats) if s["error"]}
    ok = [(i, s) for i, s in enumerate(stats) if not s["error"]]
    agg = {"truncation_rate": None, "eot_missing_rate": None, "failed": []}
    if not ok:
        return per_row, agg
    df = pd.DataFrame([{"supervised_share": s["supervised_share"], "truncated": float(s["truncated"]),
                        "eot_missing": float(s["eot_missing"])} for _, s in ok])
    E = gx.expectations
    suite = gx.ExpectationSuite(name="tempering_sft_tokens")
    # A row with no supervised token fails even at min_supervised_share 0 (strict minimum).
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(
        column="supervised_share", min_value=tp.min_supervised_share, strict_min=tp.min_supervised_share == 0,
        meta={"reason": "low_supervision"}))
    suite.add_expectation(E.ExpectColumnMeanToBeBetween(column="truncated", max_value=tp.max_truncation_rate,
                                                        meta={"reason": "truncation_rate"}))
    suite.add_expectation(E.ExpectColumnMeanToBeBetween(column="eot_missing", max_value=tp.max_eot_missing_rate,
                                                        meta={"reason": "eot_missing_rate"}))
    context = gx_context()
    asset = context.data_sources.add_pandas("tempering_tokens").add_dataframe_asset("sft_tokens")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    for res in result.results:
        reason = res.expectation_config.meta["reason"]
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise TemperingError(f"validate: token expectation {reason} failed to run: "
                                 f"{res.exception_info.get('exception_message')}")
        if reason == "low_supervision":
            for idx in res.result.get("unexpected_index_list") or []:
                per_row[ok[int(idx)][0]] = reason
        else:
            agg[reason] = round(float(res.result["observed_value"]), 4)
            if not res.success:
                agg["failed"].append(reason)
    return per_row, agg


def _token_summary(stats: list[dict], agg: dict, tp, max_length: int, marker: str, eos: str | None) -> dict:
    import numpy as np

    ok = [s for s in stats if not s["error"]]
    shares = np.asarray([s["supervised_share"] for s in ok]) if ok else np.zeros(1)
    tokens = np.asarray([s["tokens"] for s in ok]) if ok else np.zeros(1)
    return {
        "checked": True, "examples": len(stats), "max_length": max_length,
        "end_of_turn": marker, "end_of_turn_is_eos": bool(marker) and marker.strip() == (eos or "").strip(),
        "tokens_p50": int(np.percentile(tokens, 50)), "tokens_p95": int(np.percentile(tokens, 95)),
        "tokens_max": int(tokens.max()),
        "supervised_share_p5": round(float(np.percentile(shares, 5)), 4),
        "supervised_share_p50": round(float(np.percentile(shares, 50)), 4),
        "supervised_share_min": round(float(shares.min()), 4),
        "truncated": sum(1 for s in ok if s["truncated"]), "truncation_rate": agg["truncation_rate"],
        "eot_missing": sum(1 for s in ok if s["eot_missing"]), "eot_missing_rate": agg["eot_missing_rate"],
        "eot_cut_by_truncation": sum(1 for s in ok if s["eot_cut"]),
        "min_supervised_share": tp.min_supervised_share, "max_truncation_rate": tp.max_truncation_rate,
        "max_eot_missing_rate": tp.max_eot_missing_rate, "failed": agg["failed"],
    }


# ----------------------------------------------------------------------------- preference token checks

# Per-pair reasons, priority order (the first is the row's reason).
PREFERENCE_TOKEN_CHECKS = ("chat_template_error", "prompt_truncated", "answer_truncated", "same_after_truncation")


def preference_token_stats(rows: list[dict], tokenizer, *, max_length: int, max_prompt_length: int,
                           chat_template: str | None) -> list[dict]:
    """Per preference row: prompt and answer tokens as DPO tokenizes them, and what truncation at
    ``max_prompt_length`` / ``max_length`` does to them."""
    from tempering.train.data import dpo_truncate, tokenize_preference

    out = []
    for row in rows:
        try:
            enc = tokenize_preference(tokenizer, row["prompt"], row["chosen"], row["rejected"], chat_template)
        except (ValueError, TypeError, KeyError) as exc:
            out.append({"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            continue
        cut = dpo_truncate(enc, max_length, max_prompt_length)
        p, c, r = (len(enc[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        kept = len(cut["prompt_ids"])
        out.append({"error": None, "prompt_tokens": p, "chosen_tokens": c, "rejected_tokens": r,
                    "prompt_kept": kept, "answer_room": max_length - kept,
                    "prompt_truncated": p > max_prompt_length,
                    "chosen_truncated": kept + c > max_length, "rejected_truncated": kept + r > max_length,
                    "answer_truncated": kept + max(c, r) > max_length,
                    "same_after_truncation": cut["chosen_ids"] == cut["rejected_ids"]})
    return out


def run_preference_token_expectations(stats: list[dict], ptp) -> tuple[dict[int, list[str]], dict]:
    """The preference token suite (great-expectations): per-row reasons and the aggregate results.

    ``same_after_truncation`` always quarantines; ``prompt_truncated`` / ``answer_truncated``
    quarantine with ``truncation: quarantine`` and are column means against their limits otherwise."""
    import logging

    import great_expectations as gx
    import pandas as pd

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    per_row: dict[int, list[str]] = {i: ["chat_template_error"] for i, s in enumerate(stats) if s["error"]}
    ok = [(i, s) for i, s in enumerate(stats) if not s["error"]]
    agg = {"prompt_truncation_rate": None, "answer_truncation_rate": None, "failed": []}
    if not ok:
        return per_row, agg
    cols = ("prompt_truncated", "answer_truncated", "same_after_truncation")
    df = pd.DataFrame([{c: float(s[c]) for c in cols} for _, s in ok])
    E = gx.expectations
    suite = gx.ExpectationSuite(name="tempering_preference_tokens")
    per_row_checks = ["same_after_truncation"]
    if ptp.truncation == "quarantine":
        per_row_checks += ["prompt_truncated", "answer_truncated"]
    for col in per_row_checks:
        suite.add_expectation(E.ExpectColumnValuesToBeInSet(column=col, value_set=[0.0], meta={"reason": col}))
    suite.add_expectation(E.ExpectColumnMeanToBeBetween(
        column="prompt_truncated", max_value=ptp.max_prompt_truncation_rate,
        meta={"reason": "prompt_truncation_rate"}))
    suite.add_expectation(E.ExpectColumnMeanToBeBetween(
        column="answer_truncated", max_value=ptp.max_answer_truncation_rate,
        meta={"reason": "answer_truncation_rate"}))
    context = gx_context()
    asset = context.data_sources.add_pandas("tempering_pref_tokens").add_dataframe_asset("preference_tokens")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    failed: dict[int, set[str]] = defaultdict(set)
    for res in result.results:
        reason = res.expectation_config.meta["reason"]
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise TemperingError(f"validate: preference token expectation {reason} failed to run: "
                                 f"{res.exception_info.get('exception_message')}")
        if reason in PREFERENCE_TOKEN_CHECKS:
            for idx in res.result.get("unexpected_index_list") or []:
                failed[ok[int(idx)][0]].add(reason)
        else:
            agg[reason] = round(float(res.result["observed_value"]), 4)
            # With truncation: quarantine the truncated pairs are dropped, not counted.
            if not res.success and ptp.truncation == "count":
                agg["failed"].append(reason)
    for i, reasons in failed.items():
        per_row[i] = [c for c in PREFERENCE_TOKEN_CHECKS if c in reasons]
    return per_row, agg


def explain_preference_tokens(reason: str, s: dict, max_length: int, max_prompt_length: int) -> str:
    """A one-line message naming the field for one failed preference token check."""
    if reason == "chat_template_error":
        return f"prompt: the chat template cannot render this pair ({s['error']})"
    if reason == "prompt_truncated":
        return (f"prompt: {s['prompt_tokens']} tokens after the chat template, over dpo.max_prompt_length="
                f"{max_prompt_length}: its first {s['prompt_tokens'] - max_prompt_length} tokens would be cut")
    if reason == "answer_truncated":
        field = "chosen" if s["chosen_truncated"] else "rejected"
        n = s[f"{field}_tokens"]
        return (f"{field}: {n} tokens after a {s['prompt_kept']}-token prompt, over dpo.max_length={max_length}: "
                f"its last {s['prompt_kept'] + n - max_length} tokens would be cut")
    if reason == "same_after_truncation":
        return (f"chosen and rejected: identical in the {s['answer_room']} tokens that fit in dpo.max_length="
                f"{max_length} after the {s['prompt_kept']}-token prompt: the pair carries no preference")
    return reason


def _preference_token_summary(stats: list[dict], agg: dict, ptp, max_length: int, max_prompt_length: int) -> dict:
    import numpy as np

    ok = [s for s in stats if not s["error"]]

    def pct(values: list[int], q: int) -> int:
        return int(np.percentile(np.asarray(values), q)) if values else 0

    prompts = [s["prompt_tokens"] for s in ok]
    answers = [max(s["chosen_tokens"], s["rejected_tokens"]) for s in ok]
    return {
        "checked": True, "examples": len(stats), "max_length": max_length, "max_prompt_length": max_prompt_length,
        "truncation": ptp.truncation,
        "prompt_tokens_p50": pct(prompts, 50), "prompt_tokens_p95": pct(prompts, 95),
        "prompt_tokens_max": max(prompts, default=0),
        "answer_tokens_p50": pct(answers, 50), "answer_tokens_p95": pct(answers, 95),
        "answer_tokens_max": max(answers, default=0),
        "prompt_truncated": sum(1 for s in ok if s["prompt_truncated"]),
        "prompt_truncation_rate": agg["prompt_truncation_rate"],
        "answer_truncated": sum(1 for s in ok if s["answer_truncated"]),
        "answer_truncation_rate": agg["answer_truncation_rate"],
        "same_after_truncation": sum(1 for s in ok if s["same_after_truncation"]),
        "template_errors": len(stats) - len(ok),
        "max_prompt_truncation_rate": ptp.max_prompt_truncation_rate,
        "max_answer_truncation_rate": ptp.max_answer_truncation_rate, "failed": agg["failed"],
    }


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


def _length_stats(rows: list[dict], kind: str, long_chars: int) -> dict:
    import numpy as np

    sizes = [sum(len(t) for _, t in _fields(kind, r)) for r in rows]
    if not sizes:
        return {"rows": 0, "chars_p50": 0, "chars_p95": 0, "chars_max": 0, "over_long_row_chars": 0}
    arr = np.asarray(sizes)
    return {"rows": len(sizes), "chars_p50": int(np.percentile(arr, 50)), "chars_p95": int(np.percentile(arr, 95)),
            "chars_max": int(arr.max()), "over_long_row_chars": int((arr > long_chars).sum())}


# ----------------------------------------------------------------------------- stage


def _check_sources(vp: ValidateParams) -> None:
    if not vp.sources:
        raise TemperingError("validate.sources is empty: list at least one input file in params.yaml")
    seen = set()
    for spec in vp.sources:
        if spec.path in seen:
            raise TemperingError(f"validate.sources: {spec.path} is listed twice")
        seen.add(spec.path)


def validate_sources(vp: ValidateParams, *, tokenizer=None, max_length: int | None = None,
                     chat_template: str | None = None, dpo_max_length: int | None = None,
                     dpo_max_prompt_length: int | None = None) -> tuple[dict[str, list[dict]], list[dict], dict, dict]:
    """Ingest and check every source: (kept rows per kind, quarantine rows, metrics, examples).

    With a ``tokenizer`` (and ``max_length``) the SFT token checks run too; their aggregate verdict is
    ``metrics["tokens"]["failed"]`` (the caller decides to stop). With ``dpo_max_length`` and
    ``dpo_max_prompt_length`` the preference token checks run as well (``metrics["preference_tokens"]``).
    """
    _check_sources(vp)
    accepted: dict[str, list[tuple[str, Accepted]]] = {k: [] for k in KINDS}
    quarantine: list[dict] = []
    per_source: dict[str, dict] = {}
    for spec in vp.sources:
        stats = {"kind": spec.kind, "format": spec.format, "read": 0, "kept": 0, "quarantined": 0,
                 "by_reason": Counter(), "redacted": Counter()}
        per_source[spec.path] = stats
        for res in iter_source(spec, chunk_chars=vp.text_chunk_chars, pairing=vp.rated_pairs.pairing,
                               pairing_seed=vp.rated_pairs.seed):
            stats["read"] += 1
            if isinstance(res, Rejected):
                q = res.quarantine("validate")
                q["reasons"] = [res.reason]
                quarantine.append(q)
                stats["by_reason"][res.reason] += 1
            else:
                accepted[spec.kind].append((spec.path, res))

    examples: dict[str, list[str]] = defaultdict(list)
    for q in quarantine:
        examples[q["reason"]].append(q["message"])

    def drop(path: str, res: Accepted, reasons: list[str], message: str) -> None:
        quarantine.append({"source": res.file, "row": res.index, "reason": reasons[0], "reasons": reasons,
                           "message": message, "stage": "validate", "original": res.original})
        per_source[path]["by_reason"][reasons[0]] += 1
        examples[reasons[0]].append(message)

    # content checks (great-expectations), then PII redaction of what is kept
    survivors: dict[str, list[tuple[str, Accepted, dict]]] = {k: [] for k in KINDS}
    pii_total: Counter = Counter()
    rows_redacted = 0
    for kind in KINDS:
        items = accepted[kind]
        failures = run_expectations(kind, [res.row for _, res in items], vp)
        for i, (path, res) in enumerate(items):
            reasons = failures.get(i)
            if reasons:
                drop(path, res, reasons, f"{res.file}:{res.index}: {explain(reasons[0], kind, res.row, vp)}")
                continue
            row = res.row
            if vp.pii.enabled:
                row, counts = redact_row(kind, row, vp.pii)
                if counts:
                    rows_redacted += 1
                    pii_total.update(counts)
                    per_source[path]["redacted"].update(counts)
            survivors[kind].append((path, res, row))

    # token checks on SFT rows, as SFT will see them
    token_summary: dict = {"checked": False}
    if not vp.tokens.enabled:
        token_summary["skipped"] = "disabled (validate.tokens.enabled: false)"
    elif tokenizer is None or max_length is None:
        token_summary["skipped"] = "no tokenizer given (--tokenizer)"
    elif survivors["sft"]:
        stats = token_stats([row for _, _, row in survivors["sft"]], tokenizer, max_length=max_length,
                            chat_template=chat_template)
        bad, agg = run_token_expectations(stats, vp.tokens)
        marker, _ = end_of_turn_marker(tokenizer, chat_template)
        token_summary = _token_summary(stats, agg, vp.tokens, max_length, marker, tokenizer.eos_token)
        keep = []
        for i, (path, res, row) in enumerate(survivors["sft"]):
            reason = bad.get(i)
            if reason is None:
                keep.append((path, res, row))
                continue
            s = stats[i]
            if reason == "chat_template_error":
                detail = f"messages: the chat template cannot render this conversation ({s['error']})"
            else:
                detail = (f"messages: only {s['supervised']} of {min(s['tokens'], max_length)} tokens "
                          f"({100 * s['supervised_share']:.1f}%) are supervised after truncation at "
                          f"{max_length} tokens (validate.tokens.min_supervised_share "
                          f"{vp.tokens.min_supervised_share})")
            drop(path, res, [reason], f"{res.file}:{res.index}: {detail}")
        survivors["sft"] = keep
    else:
        token_summary["skipped"] = "no SFT rows"

    # token checks on preference rows, as DPO will see them
    pref_summary: dict = {"checked": False}
    ptp = vp.preference_tokens
    if not ptp.enabled:
        pref_summary["skipped"] = "disabled (validate.preference_tokens.enabled: false)"
    elif tokenizer is None or dpo_max_length is None or dpo_max_prompt_length is None:
        pref_summary["skipped"] = "no tokenizer given (--tokenizer)"
    elif survivors["preference"]:
        pstats = preference_token_stats([row for _, _, row in survivors["preference"]], tokenizer,
                                        max_length=dpo_max_length, max_prompt_length=dpo_max_prompt_length,
                                        chat_template=chat_template)
        pbad, pagg = run_preference_token_expectations(pstats, ptp)
        pref_summary = _preference_token_summary(pstats, pagg, ptp, dpo_max_length, dpo_max_prompt_length)
        keep = []
        for i, (path, res, row) in enumerate(survivors["preference"]):
            reasons = pbad.get(i)
            if not reasons:
                keep.append((path, res, row))
                continue
            detail = explain_preference_tokens(reasons[0], pstats[i], dpo_max_length, dpo_max_prompt_length)
            drop(path, res, reasons, f"{res.file}:{res.index}: {detail}")
        survivors["preference"] = keep
    else:
        pref_summary["skipped"] = "no preference rows"

    kept: dict[str, list[dict]] = {k: [] for k in KINDS}
    for kind in KINDS:
        for path, _, row in survivors[kind]:
            kept[kind].append(row)
            per_source[path]["kept"] += 1

    failed = []
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
        if s["counted_reject_share"] > vp.max_reject_share:
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
        "reject_share_ignores": list(vp.reject_share_ignores),
        "by_reason": dict(sorted(by_reason.items())),
        "kinds": {k: _length_stats(kept[k], k, vp.long_row_chars) for k in KINDS},
        "long_row_chars": vp.long_row_chars,
        "tokens": token_summary,
        "preference_tokens": pref_summary,
        "pii": {"enabled": vp.pii.enabled, "total": {k: pii_total.get(k, 0) for k in vp.pii.kinds},
                "rows_redacted": rows_redacted},
        "sources": per_source,
        "failed_sources": failed,
    }
    assert n_kept + len(quarantine) == read
    return kept, quarantine, metrics, examples


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


def run(params: Params, out: str, quarantine: str, report: str, metrics: str, tokenizer: str | None = None,
        html: str | None = None) -> dict:
    started = time.time()
    vp = params.validate_
    _check_sources(vp)
    tok = None
    if tokenizer and (vp.tokens.enabled or vp.preference_tokens.enabled):
        from tempering.train.data import load_tokenizer
        from tempering.train.precision import quiet_transformers

        quiet_transformers()
        tok = load_tokenizer(tokenizer, params.sft.chat_template)
    kept, rejected, summary, examples = validate_sources(
        vp, tokenizer=tok, max_length=params.sft.max_length, chat_template=params.sft.chat_template,
        dpo_max_length=params.dpo.max_length, dpo_max_prompt_length=params.dpo.max_prompt_length)
    summary["wall_time_s"] = round(time.time() - started, 2)
    summary["rows_per_s"] = round(summary["read"] / summary["wall_time_s"], 1) if summary["wall_time_s"] else None

    write_jsonl(quarantine, rejected)
    text = render_report(summary, examples)
    write_text(report, text)
    if html:
        from tempering import templating

        write_text(html, templating.render("data_validate.html.j2", metrics=summary, examples=examples,
                                           title="tempering data validation report"))
    write_json(metrics, summary)
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

    with atomic_path(out) as tmp:
        tmp.mkdir()
        for kind in KINDS:
            write_jsonl(tmp / f"{kind}.jsonl", kept[kind])
        write_meta(tmp, stage="validate", params=vp, started=started,
                   inputs={spec.path: spec.path for spec in vp.sources},
                   extra={"counts": {k: len(v) for k, v in kept.items()},
                          "sft_tokens": {"max_length": params.sft.max_length,
                                         "chat_template": params.sft.chat_template, "tokenizer": tokenizer},
                          "preference_tokens": {"max_length": params.dpo.max_length,
                                                "max_prompt_length": params.dpo.max_prompt_length,
                                                "tokenizer": tokenizer}})
    return {"out": out, "read": summary["read"], "kept": summary["kept"], "quarantined": summary["quarantined"],
            "by_reason": summary["by_reason"], "kept_by_kind": {k: len(v) for k, v in kept.items()},
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
