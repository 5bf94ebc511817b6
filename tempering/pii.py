"""PII redaction: the patterns and the one place rows are redacted.

Owns the regexes for e-mail addresses, phone numbers and secret-looking tokens (API keys, private
keys, password literals), their ``[REDACTED_*]`` placeholders, :func:`redact_text` (one string,
counts per kind) and :func:`redact_row` (every content field of an internal row; ``id``
recomputed). ``validate`` applies it to the rows it keeps (``validate.pii``, :class:`PiiParams`).
"""

from __future__ import annotations

import re
from collections import Counter

from tempering.io import content_id

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
