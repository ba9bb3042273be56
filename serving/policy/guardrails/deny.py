"""Deny-list detectors: terms (whole words, any case, any whitespace between words) and the
tenant's own regular expressions.

Both run on the view of the text (normalise.py), so their own non-ASCII characters are written
as what they read in the view: `Müller` finds Müller, Mu\u0308ller and MULLER. A case-insensitive
one matches the view of each case of its letters, since a letter and its capital may read
differently (Greek Ν reads N, its small ν reads v; Cyrillic В reads B, в stays в)."""

from __future__ import annotations

import regex

from serving.policy.guardrails.normalise import view

DENY_MASK = "[REDACTED]"


def _views(c: str, ignorecase: bool) -> list[str]:
    """What c reads in a view (and, ignoring case, what each case of it reads), longest first."""
    forms = (c, c.lower(), c.upper(), c.casefold()) if ignorecase else (c,)
    views: dict[str, str] = {}
    for v in map(view, forms):
        if v:
            views.setdefault(v.casefold() if ignorecase else v, v)
    return sorted(views.values(), key=lambda v: (-len(v), v))


def _literal(c: str, ignorecase: bool) -> str:
    """A pattern for the literal character c of a rule, as it reads in the view."""
    if c.isascii():
        return regex.escape(c)
    views = _views(c, ignorecase)
    if not views:  # an invisible character: the view has nothing for it
        return ""
    if len(views) == 1 and len(views[0]) == 1:
        return regex.escape(views[0])
    return "(?:" + "|".join(map(regex.escape, views)) + ")"


def term_source(terms: list[str]) -> str:
    phrases = {
        r"\s+".join(w for w in ("".join(_literal(c, True) for c in word) for word in t.split()) if w) for t in terms
    }
    return r"(?<!\w)(?:" + "|".join(sorted(phrases, key=len, reverse=True)) + r")(?!\w)"


def pattern_source(pattern: str) -> str:
    """A tenant's pattern as it runs on the view: each non-ASCII character (regex syntax is
    ASCII, so these are literals) replaced by what it reads there. Case-insensitive patterns
    ((?i) at the start) match each case of it; in a character class, only one-character readings."""
    if pattern.isascii():
        return pattern
    ignorecase = bool(regex.compile(pattern).flags & regex.IGNORECASE)
    out: list[str] = []
    class_from = -1  # where the character class being read began, or -1 outside one
    escaped = False
    for i, c in enumerate(pattern):
        if c.isascii():
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif class_from < 0 and c == "[":
                class_from = i
            elif class_from >= 0 and c == "]" and i > class_from + 1 and pattern[class_from + 1 : i] != "^":
                class_from = -1
            out.append(c)
            continue
        if escaped:  # an escaped non-ASCII character is that character
            out.pop()
            escaped = False
        if class_from >= 0:
            out.append("".join(regex.escape(v) for v in _views(c, ignorecase) if len(v) == 1))
        else:
            out.append(_literal(c, ignorecase))
    return "".join(out)
