"""A rule's detectors, compiled: the pattern, its any-path probe for streams, its validator,
and the tables that let a stream skip a detector no new character can begin a match of."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import regex

from serving.policy.guardrails.deny import DENY_MASK, pattern_source, term_source
from serving.policy.guardrails.injection import DEFAULT_INJECTION_THRESHOLD, INJECTION_SOURCES
from serving.policy.guardrails.pii import MASKS, PII_ENTITIES, PII_SOURCES


class Owner(Protocol):
    """The rule a detector belongs to (a GuardrailRule): what it is called and what it does."""

    @property
    def label(self) -> str: ...

    @property
    def action(self) -> str: ...


@dataclass(eq=False)
class Detector:
    guardrail: str
    action: str
    entity: str | None
    mask: str
    source: str
    pattern: regex.Pattern
    probe: regex.Pattern | None  # (?:P)(?!): where could a P match still be forming?
    accept: Callable[[regex.Match], int | None] | None = None  # validated end, or None
    starts: frozenset[str] | None = None  # ASCII characters a match can start with; None: any
    # (previous character, character) pairs, as prev * 128 + char over ASCII, at which a match
    # can start: most patterns cannot start right after a letter or digit
    pairs: frozenset[int] | None = None
    needs: Callable[[str], object] | None = None  # see PII_SOURCES
    weights: dict[str, float] | None = None  # prompt injection: group name -> weight
    threshold: float = 0.0
    score_key: object = None  # prompt injection: the rule; its detectors' phrases add up


def _detector(
    rule: Owner,
    entity: str | None,
    mask: str,
    source: str,
    flags: int = 0,
    accept=None,
    lazy: bool = False,
    builtin: bool = True,
    weights=None,
    threshold: float = 0.0,
    needs=None,
) -> Detector:
    pattern = regex.compile(source, flags)
    starts, pairs = _start_table(source, flags) if builtin else (None, None)
    return Detector(
        guardrail=rule.label,
        action=rule.action,
        entity=entity,
        mask=mask,
        source=source,
        pattern=pattern,
        probe=None if lazy else regex.compile(probe_source(source), flags),
        accept=accept,
        starts=starts,
        pairs=pairs,
        needs=needs,
        weights=weights,
        threshold=threshold,
        score_key=rule if weights is not None else None,
    )


def probe_source(source: str) -> str:
    """A pattern that never matches, so a partial search reports every path of source that
    reaches the end of the text, not only the one a match would take."""
    return f"(?:{source})(?!)"


@functools.lru_cache(maxsize=256)
def _start_table(source: str, flags: int) -> tuple[frozenset[str], frozenset[int]]:
    """The ASCII characters a match (or a match still forming) can begin with, alone and after
    each ASCII character. Only for our own patterns, whose lookbehinds are negative or `^[ \t]*`,
    so that less context never hides a start: a positive lookbehind in general could fail on one
    character of context and hide a real start. Computed once per pattern (~5 ms)."""
    pattern = regex.compile(source, flags)
    starts = frozenset(ch for ch in map(chr, range(128)) if pattern.match(ch, partial=True))
    pairs = frozenset(
        p << 7 | ord(ch) for ch in starts for p in range(128) if pattern.match(chr(p) + ch, 1, partial=True)
    )
    return starts, pairs


def pii_detectors(rule: Owner, entities: Sequence[str] | None) -> list[Detector]:
    """A pii rule's detectors: each entity's patterns (every entity when `entities` is None)."""
    out = []
    for entity in entities or PII_ENTITIES:
        for source, accept, lazy, needs in PII_SOURCES[entity]:
            out.append(_detector(rule, entity, MASKS[entity], source, accept=accept, lazy=lazy, needs=needs))
    return out


def deny_detectors(rule: Owner, terms: list[str], patterns: list[str]) -> list[Detector]:
    """A deny rule's detectors: one for all its terms, one per pattern."""
    out = []
    if terms:
        out.append(_detector(rule, "term", DENY_MASK, term_source(terms), regex.IGNORECASE))
    for source in patterns:
        out.append(_detector(rule, "pattern", DENY_MASK, pattern_source(source), builtin=False))
    return out


def injection_detectors(rule: Owner, threshold: float | None) -> list[Detector]:
    """A prompt_injection rule's detectors: weighted phrase groups whose weights add up per rule."""
    return [
        _detector(
            rule,
            None,
            "",
            source,
            regex.IGNORECASE | regex.MULTILINE,
            weights=weights,
            threshold=threshold if threshold is not None else DEFAULT_INJECTION_THRESHOLD,
            needs=needs,
        )
        for source, weights, needs in INJECTION_SOURCES
    ]
