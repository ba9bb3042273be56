"""Deny-list detectors: terms (whole words, any case, any whitespace between words) and the
tenant's own regular expressions."""

from __future__ import annotations

import regex

DENY_MASK = "[REDACTED]"


def term_source(terms: list[str]) -> str:
    phrases = sorted({r"\s+".join(regex.escape(w) for w in t.split()) for t in terms}, key=len, reverse=True)
    return r"(?<!\w)(?:" + "|".join(phrases) + r")(?!\w)"
