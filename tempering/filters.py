"""Row-level data checks as composable filters, each rule stated once (after datatrove's ``BaseFilter``).

Owns every per-row check ``validate`` applies and the words of its quarantine message:

- :class:`Reason`: the quarantine reason code and the one-line message naming the field (the runner
  in :mod:`tempering.datacheck` prefixes ``file:row``);
- content filters (:func:`content_filters`), one :class:`RowFilter` per check, in priority order
  (:data:`CHECKS`): ``unknown_role``, ``bad_role_order``, ``empty_field``,
  ``chosen_equals_rejected``, ``control_chars``, ``too_short``, ``too_long``;
- token filters, built with a tokenizer: :class:`SFTTokenFilter` (``chat_template_error``,
  ``low_supervision``; tokenized exactly as SFT trains) and :class:`PreferenceTokenFilter`
  (``chat_template_error``, ``prompt_truncated``, ``answer_truncated``, ``same_after_truncation``;
  tokenized exactly as DPO trains). They also accumulate, in bounded memory, the aggregates the
  dataset-level suite (:mod:`tempering.expectations`) judges and the report shows;
- :class:`ValueCounts`: exact quantiles (numpy's ``linear`` percentile, bit for bit) from value
  counts, so memory grows with the number of distinct values, never with the number of rows.

A filter is a callable ``(row) -> Reason | None`` on an internal row (``{"id", "source",
"messages"}`` and so on, see :mod:`tempering.formats`); a filter group's ``reasons(row)`` gives
every failing check of the row, in priority order (the first names the row's ``reason``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

KINDS = ("sft", "preference", "text")
# Priority order: the first failing check names the row's reason.
CHECKS = ("unknown_role", "bad_role_order", "empty_field", "chosen_equals_rejected", "control_chars",
          "too_short", "too_long")
TOKEN_CHECKS = ("chat_template_error", "low_supervision")
PREFERENCE_TOKEN_CHECKS = ("chat_template_error", "prompt_truncated", "answer_truncated", "same_after_truncation")
# C0 controls but \t and \n, DEL, the replacement character (a decode already failed upstream)
# and lone UTF-16 surrogates (from "\ud800"-style JSON escapes; they cannot be written as UTF-8).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd\ud800-\udfff]")
STANDARD_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Reason:
    """Why a row is quarantined: the reason code and a one-line message naming the field."""

    code: str
    message: str


@dataclass(frozen=True)
class RowFilter:
    """One check: ``check(row)`` returns the failure message, or None when the row passes."""

    code: str
    check: Callable[[dict], str | None]

    def __call__(self, row: dict) -> Reason | None:
        message = self.check(row)
        return None if message is None else Reason(self.code, message)


@dataclass(frozen=True)
class FilterGroup:
    """Filters applied together; ``reasons`` runs all of them (priority order is list order)."""

    filters: tuple[RowFilter, ...]

    def reasons(self, row: dict) -> list[Reason]:
        return [r for r in (f(row) for f in self.filters) if r is not None]


# ----------------------------------------------------------------------------- row fields


def fields(kind: str, row: dict) -> list[tuple[str, str]]:
    """(field path, text) of every content field of an internal row."""
    if kind == "sft":
        return [(f"messages[{i}].content ({m['role']})", m["content"]) for i, m in enumerate(row["messages"])]
    if kind == "preference":
        return ([(f"prompt[{i}].content ({m['role']})", m["content"]) for i, m in enumerate(row["prompt"])]
                + [("chosen", row["chosen"]), ("rejected", row["rejected"])])
    return [("text", row["text"])]


def roles(kind: str, row: dict) -> list[str]:
    if kind == "sft":
        return [m["role"] for m in row["messages"]]
    if kind == "preference":
        return [m["role"] for m in row["prompt"]]
    return []


def row_chars(kind: str, row: dict) -> int:
    """Characters in all content fields of a row (the report's row length)."""
    return sum(len(t) for _, t in fields(kind, row))


# ----------------------------------------------------------------------------- content checks


def unknown_role(kind: str, allowed: tuple[str, ...]) -> RowFilter:
    """Every role is one of ``validate.allowed_roles``."""
    where = "messages" if kind == "sft" else "prompt"

    def check(row: dict) -> str | None:
        rs = roles(kind, row)
        for i, role in enumerate(rs):
            if role not in allowed:
                return f"{where}[{i}].role {role!r} is not one of {', '.join(allowed)}"
        return None if rs else f"{where}: no turns"
    return RowFilter("unknown_role", check)


def bad_role_order(kind: str) -> RowFilter:
    """An optional leading system turn, then user/assistant alternating, starting with user and
    ending with assistant (a preference prompt ends with user). Other allowed roles (tool) are
    skipped: the order is defined over the standard roles."""
    where = "messages" if kind == "sft" else "prompt"
    last = "user" if kind == "preference" else "assistant"

    def check(row: dict) -> str | None:
        seq = [(i, r) for i, r in enumerate(roles(kind, row)) if r in STANDARD_ROLES]
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
        if seq[-1][1] != last:
            return (f"{where}[{seq[-1][0]}]: must end with {'a user' if last == 'user' else 'an assistant'} turn "
                    f"(got {seq[-1][1]})")
        return None
    return RowFilter("bad_role_order", check)


def empty_field(kind: str) -> RowFilter:
    """No message content, chosen, rejected or text is empty (or only whitespace)."""
    def check(row: dict) -> str | None:
        name = next((name for name, text in fields(kind, row) if not text.strip()), None)
        return None if name is None else f"field {name} is empty"
    return RowFilter("empty_field", check)


def chosen_equals_rejected() -> RowFilter:
    """The two answers of a preference pair differ (ignoring surrounding whitespace)."""
    def check(row: dict) -> str | None:
        return "fields chosen and rejected are identical" if row["chosen"].strip() == row["rejected"].strip() else None
    return RowFilter("chosen_equals_rejected", check)


def control_chars(kind: str) -> RowFilter:
    """No control characters besides ``\\n`` and ``\\t`` (nor U+FFFD, nor lone surrogates)."""
    def check(row: dict) -> str | None:
        for name, text in fields(kind, row):
            m = CONTROL.search(text)
            if m:
                return f"field {name} contains control character U+{ord(m.group()):04X} at offset {m.start()}"
        return None
    return RowFilter("control_chars", check)


def too_short(kind: str, limit: int) -> RowFilter:
    """Every field has at least ``limit`` characters (``min_chars``; a text row ``min_text_chars``)."""
    def check(row: dict) -> str | None:
        fs = fields(kind, row)
        name, text = min(fs, key=lambda f: len(f[1])) if fs else ("(none)", "")
        return None if len(text) >= limit else f"field {name} is too short ({len(text)} < {limit} characters)"
    return RowFilter("too_short", check)


def too_long(kind: str, limit: int) -> RowFilter:
    """No field is longer than ``limit`` characters (``max_chars``)."""
    def check(row: dict) -> str | None:
        fs = fields(kind, row)
        if not fs:
            return None
        name, text = max(fs, key=lambda f: len(f[1]))
        return None if len(text) <= limit else f"field {name} is too long ({len(text)} > {limit} characters)"
    return RowFilter("too_long", check)


def content_filters(kind: str, vp) -> FilterGroup:
    """The content checks of one kind (``vp`` = ValidateParams), in :data:`CHECKS` order."""
    out = []
    if kind != "text":
        out += [unknown_role(kind, tuple(vp.allowed_roles)), bad_role_order(kind)]
    out.append(empty_field(kind))
    if kind == "preference":
        out.append(chosen_equals_rejected())
    out += [control_chars(kind), too_short(kind, vp.min_text_chars if kind == "text" else vp.min_chars),
            too_long(kind, vp.max_chars)]
    return FilterGroup(tuple(out))


# ----------------------------------------------------------------------------- exact streaming quantiles


class ValueCounts:
    """Exact order statistics of a stream from its value counts: memory grows with the number of
    distinct values (token counts, character counts, supervised shares ``s/n`` with ``n`` at most
    ``max_length``), not with the number of rows. :meth:`percentile` is numpy's default
    (``linear``) percentile, bit for bit."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.n = 0

    def add(self, value) -> None:
        self.counts[value] += 1
        self.n += 1

    def _sorted(self) -> list:
        return sorted(self.counts.items())

    def min(self):
        return min(self.counts) if self.counts else None

    def max(self):
        return max(self.counts) if self.counts else None

    def count_over(self, limit) -> int:
        return sum(c for v, c in self.counts.items() if v > limit)

    def _at(self, items: list, k: int):
        seen = 0
        for value, c in items:
            seen += c
            if k < seen:
                return value
        raise IndexError(k)

    def percentile(self, q: float) -> float:
        """``numpy.percentile(values, q)`` without the values (raises on an empty stream)."""
        if not self.n:
            raise ValueError("percentile of an empty stream")
        items = self._sorted()
        quantile = q / 100
        virtual = (self.n - 1) * quantile
        lo = math.floor(virtual)
        hi = min(lo + 1, self.n - 1)
        lo = max(0, min(lo, self.n - 1))
        gamma = virtual - lo
        a, b = self._at(items, lo), self._at(items, hi)
        diff = b - a
        return float(b - diff * (1 - gamma)) if gamma >= 0.5 else float(a + diff * gamma)


# ----------------------------------------------------------------------------- SFT token checks


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


def _error_text(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class SFTTokenFilter:
    """SFT rows as SFT will see them (:func:`tempering.train.data.tokenize_conversation` at
    ``sft.max_length`` / ``sft.chat_template``): ``chat_template_error`` when the template cannot
    render the row, ``low_supervision`` when less than ``min_supervised_share`` of its tokens after
    truncation is supervised (a row with none fails even at 0). Also accumulates the truncation and
    end-of-turn aggregates (bounded memory) for the dataset suite and the report."""

    def __init__(self, tokenizer, *, max_length: int, chat_template: str | None, tp) -> None:
        self.tokenizer, self.max_length, self.chat_template, self.tp = tokenizer, max_length, chat_template, tp
        self._marker: tuple[str, list[int]] | None = None
        self.examples = self.truncated = self.eot_missing = self.eot_cut = 0
        self.tokens = ValueCounts()
        self.shares = ValueCounts()

    @property
    def marker(self) -> tuple[str, list[int]]:
        if self._marker is None:
            self._marker = end_of_turn_marker(self.tokenizer, self.chat_template)
        return self._marker

    def measure(self, row: dict) -> dict:
        """Tokens, supervised share after truncation, truncation, end-of-turn in the mask."""
        from tempering.train.data import tokenize_conversation

        eot = self.marker[1]
        try:
            enc = tokenize_conversation(self.tokenizer, row["messages"], None, self.chat_template)
        except (ValueError, TypeError, KeyError) as exc:
            return {"error": _error_text(exc)}
        ids, labels = enc["input_ids"], enc["labels"]
        n, max_length = len(ids), self.max_length
        supervised = sum(1 for x in labels[:max_length] if x != -100)
        last = max((k for k, x in enumerate(labels) if x != -100), default=-1)
        eot_ok = bool(eot) and last >= len(eot) - 1 and ids[last - len(eot) + 1:last + 1] == eot
        return {"error": None, "tokens": n, "supervised": supervised,
                "supervised_share": supervised / min(n, max_length) if n else 0.0,
                "truncated": n > max_length, "eot_missing": not eot_ok, "eot_cut": eot_ok and last >= max_length}

    def judge(self, s: dict) -> Reason | None:
        """Count ``s`` (one :meth:`measure`) into the aggregates; the row's reason, if any."""
        self.examples += 1
        if s["error"]:
            return Reason("chat_template_error",
                          f"messages: the chat template cannot render this conversation ({s['error']})")
        self.tokens.add(s["tokens"])
        self.shares.add(s["supervised_share"])
        self.truncated += s["truncated"]
        self.eot_missing += s["eot_missing"]
        self.eot_cut += s["eot_cut"]
        floor = self.tp.min_supervised_share
        if s["supervised_share"] < floor or (floor == 0 and s["supervised_share"] <= 0):
            return Reason("low_supervision",
                          f"messages: only {s['supervised']} of {min(s['tokens'], self.max_length)} tokens "
                          f"({100 * s['supervised_share']:.1f}%) are supervised after truncation at "
                          f"{self.max_length} tokens (validate.tokens.min_supervised_share {floor})")
        return None

    def __call__(self, row: dict) -> Reason | None:
        return self.judge(self.measure(row))

    def reasons(self, row: dict) -> list[Reason]:
        r = self(row)
        return [r] if r else []

    @property
    def ok(self) -> int:
        return self.tokens.n

    def rates(self) -> dict:
        """The aggregates the dataset suite judges (None when no row could be tokenized)."""
        if not self.ok:
            return {"truncation_rate": None, "eot_missing_rate": None}
        return {"truncation_rate": self.truncated / self.ok, "eot_missing_rate": self.eot_missing / self.ok}

    def summary(self, failed: list[str]) -> dict:
        """``metrics["tokens"]`` (``failed``: the dataset suite's broken limits)."""
        marker, eos = self.marker[0], self.tokenizer.eos_token
        ok, tp = bool(self.ok), self.tp
        rates = self.rates()
        return {
            "checked": True, "examples": self.examples, "max_length": self.max_length,
            "end_of_turn": marker, "end_of_turn_is_eos": bool(marker) and marker.strip() == (eos or "").strip(),
            "tokens_p50": int(self.tokens.percentile(50)) if ok else 0,
            "tokens_p95": int(self.tokens.percentile(95)) if ok else 0,
            "tokens_max": int(self.tokens.max()) if ok else 0,
            "supervised_share_p5": round(float(self.shares.percentile(5)), 4) if ok else 0.0,
            "supervised_share_p50": round(float(self.shares.percentile(50)), 4) if ok else 0.0,
            "supervised_share_min": round(float(self.shares.min()), 4) if ok else 0.0,
            "truncated": self.truncated, "truncation_rate": _round(rates["truncation_rate"]),
            "eot_missing": self.eot_missing, "eot_missing_rate": _round(rates["eot_missing_rate"]),
            "eot_cut_by_truncation": self.eot_cut,
            "min_supervised_share": tp.min_supervised_share, "max_truncation_rate": tp.max_truncation_rate,
            "max_eot_missing_rate": tp.max_eot_missing_rate, "failed": failed,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


# ----------------------------------------------------------------------------- preference token checks


class PreferenceTokenFilter:
    """Preference rows as DPO will see them (:func:`tempering.train.data.tokenize_preference`,
    :func:`~tempering.train.data.dpo_truncate` at ``dpo.max_length`` / ``dpo.max_prompt_length``):
    ``same_after_truncation`` always; ``prompt_truncated`` / ``answer_truncated`` per row with
    ``truncation: quarantine`` (with ``count`` they are only counted for the dataset suite)."""

    def __init__(self, tokenizer, *, max_length: int, max_prompt_length: int, chat_template: str | None,
                 ptp) -> None:
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.chat_template, self.ptp = chat_template, ptp
        self.examples = self.prompt_truncated = self.answer_truncated = self.same = 0
        self.prompts = ValueCounts()
        self.answers = ValueCounts()

    def measure(self, row: dict) -> dict:
        from tempering.train.data import dpo_truncate, tokenize_preference

        try:
            enc = tokenize_preference(self.tokenizer, row["prompt"], row["chosen"], row["rejected"],
                                      self.chat_template)
        except (ValueError, TypeError, KeyError) as exc:
            return {"error": _error_text(exc)}
        max_length = self.max_length
        cut = dpo_truncate(enc, max_length, self.max_prompt_length)
        p, c, r = (len(enc[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        kept = len(cut["prompt_ids"])
        return {"error": None, "prompt_tokens": p, "chosen_tokens": c, "rejected_tokens": r,
                "prompt_kept": kept, "answer_room": max_length - kept,
                "prompt_truncated": p > self.max_prompt_length,
                "chosen_truncated": kept + c > max_length, "rejected_truncated": kept + r > max_length,
                "answer_truncated": kept + max(c, r) > max_length,
                "same_after_truncation": cut["chosen_ids"] == cut["rejected_ids"]}

    def judge(self, s: dict) -> list[Reason]:
        """Count ``s`` into the aggregates; the row's reasons in :data:`PREFERENCE_TOKEN_CHECKS` order."""
        self.examples += 1
        if s["error"]:
            return [Reason("chat_template_error", f"prompt: the chat template cannot render this pair ({s['error']})")]
        self.prompts.add(s["prompt_tokens"])
        self.answers.add(max(s["chosen_tokens"], s["rejected_tokens"]))
        self.prompt_truncated += s["prompt_truncated"]
        self.answer_truncated += s["answer_truncated"]
        self.same += s["same_after_truncation"]
        max_length, out = self.max_length, []
        if self.ptp.truncation == "quarantine":
            if s["prompt_truncated"]:
                out.append(Reason("prompt_truncated",
                                  f"prompt: {s['prompt_tokens']} tokens after the chat template, over "
                                  f"dpo.max_prompt_length={self.max_prompt_length}: its first "
                                  f"{s['prompt_tokens'] - self.max_prompt_length} tokens would be cut"))
            if s["answer_truncated"]:
                field = "chosen" if s["chosen_truncated"] else "rejected"
                n = s[f"{field}_tokens"]
                out.append(Reason("answer_truncated",
                                  f"{field}: {n} tokens after a {s['prompt_kept']}-token prompt, over "
                                  f"dpo.max_length={max_length}: its last {s['prompt_kept'] + n - max_length} "
                                  "tokens would be cut"))
        if s["same_after_truncation"]:
            out.append(Reason("same_after_truncation",
                              f"chosen and rejected: identical in the {s['answer_room']} tokens that fit in "
                              f"dpo.max_length={max_length} after the {s['prompt_kept']}-token prompt: the pair "
                              "carries no preference"))
        return out

    def reasons(self, row: dict) -> list[Reason]:
        return self.judge(self.measure(row))

    @property
    def ok(self) -> int:
        return self.prompts.n

    def rates(self) -> dict:
        if not self.ok:
            return {"prompt_truncation_rate": None, "answer_truncation_rate": None}
        return {"prompt_truncation_rate": self.prompt_truncated / self.ok,
                "answer_truncation_rate": self.answer_truncated / self.ok}

    def summary(self, failed: list[str]) -> dict:
        """``metrics["preference_tokens"]``; with ``truncation: quarantine`` the truncated pairs are
        dropped, not counted, so no rate can fail."""
        ptp, rates = self.ptp, self.rates()

        def pct(v: ValueCounts, q: int) -> int:
            return int(v.percentile(q)) if v.n else 0

        return {
            "checked": True, "examples": self.examples, "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length, "truncation": ptp.truncation,
            "prompt_tokens_p50": pct(self.prompts, 50), "prompt_tokens_p95": pct(self.prompts, 95),
            "prompt_tokens_max": self.prompts.max() or 0,
            "answer_tokens_p50": pct(self.answers, 50), "answer_tokens_p95": pct(self.answers, 95),
            "answer_tokens_max": self.answers.max() or 0,
            "prompt_truncated": self.prompt_truncated, "prompt_truncation_rate": _round(rates["prompt_truncation_rate"]),
            "answer_truncated": self.answer_truncated, "answer_truncation_rate": _round(rates["answer_truncation_rate"]),
            "same_after_truncation": self.same, "template_errors": self.examples - self.ok,
            "max_prompt_truncation_rate": ptp.max_prompt_truncation_rate,
            "max_answer_truncation_rate": ptp.max_answer_truncation_rate,
            "failed": failed if ptp.truncation == "count" else [],
        }
