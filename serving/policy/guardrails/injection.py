"""Prompt-injection detectors: weighted phrases, chat-template markers and "### System:" lines."""

from __future__ import annotations

from collections.abc import Callable

from serving.policy.guardrails.pii import has

DEFAULT_INJECTION_THRESHOLD = 1.0  # one strong phrase (weight 1.0) is enough

# Prompt injection: (phrase, weight); case-insensitive, any whitespace between words. Three
# detectors, because one alternation of everything is several times slower to search.
_INJECTION_WORDS: list[tuple[str, float]] = [  # each starts at a word boundary
    (
        r"(?:ignore|disregard|forget|skip|override|bypass|neglect)\s+"
        r"(?:(?:all|any|every|the|your|my|of|these|those|everything)\s+){0,3}"
        r"(?:previous|prior|above|earlier|preceding|foregoing|former|original|initial|system)\s+"
        r"(?:instructions?|prompts?|rules?|directions?|directives?|guidelines?|messages?|commands?"
        r"|context|guidance|constraints?)\b",
        1.0,
    ),
    (r"(?:ignore|disregard|forget)\s+(?:everything|all)\s+(?:above|before|prior)\b", 1.0),
    (
        r"you\s+are\s+now\s+(?:DAN\b|in\s+(?:developer|dev|god|jailbreak|jailbroken|unrestricted"
        r"|unfiltered|debug)\s+mode\b|(?:an?\s+)?(?:unrestricted|unfiltered|uncensored|jailbroken)\b)",
        1.0,
    ),
    (r"(?:enable|activate|enter|switch\s+to)\s+(?:developer|dev|god|jailbreak|DAN)\s+mode\b", 1.0),
    (
        r"(?:reveal|print|show|display|repeat|output|leak|dump|expose|disclose|tell\s+me"
        r"|give\s+me|write\s+out|share)\s+(?:me\s+)?(?:your|the)\s+"
        r"(?:(?:full|entire|exact|original|hidden|secret|initial|complete|whole)\s+)*"
        r"(?:system\s+(?:prompt|message|instructions?)|(?:hidden|initial|original|secret)\s+"
        r"(?:prompt|instructions?))\b",
        1.0,
    ),
    (
        r"(?:act|behave|respond|operate)\s+as\s+(?:if\s+you\s+(?:are|were)\s+)?(?:an?\s+)?"
        r"(?:unrestricted|unfiltered|uncensored|jailbroken|unlimited|amoral|unaligned)\b",
        1.0,
    ),
    (
        r"pretend\s+(?:that\s+)?(?:you\s+(?:are|have)|to\s+(?:be|have))\s+(?:an?\s+)?"
        r"(?:no\s+(?:restrictions|rules|limits|filters|guidelines)|unrestricted|unfiltered"
        r"|uncensored|jailbroken)\b",
        1.0,
    ),
    (r"what\s+(?:is|are)\s+your\s+(?:system\s+prompt|(?:hidden|initial|original)\s+instructions)\b", 0.6),
    (r"do\s+anything\s+now\b", 0.6),
    (r"jailbr(?:eak|oken)\b", 0.5),
    (r"new\s+(?:system\s+)?instructions\s*:", 0.5),
    (r"(?:no\s+longer|not)\s+bound\s+by\b", 0.5),
    (r"from\s+now\s+on,?\s+you\s+(?:will|must|are|shall)\b", 0.4),
    (r"without\s+(?:any\s+)?(?:restrictions|filters|censorship|limitations|guidelines)\b", 0.4),
]
_INJECTION_MARKERS: list[tuple[str, float]] = [  # chat-template markers have no place in user text
    (
        r"<\|im_start\|>\s*(?:system|assistant)\b|<\|start_header_id\|>\s*system\b|<<SYS>>"
        r"|\[/?INST\]|<\|system\|>",
        1.0,
    ),
    (r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>", 0.5),
]
_INJECTION_LINES: list[tuple[str, float]] = [  # a "### System:" header line
    (r"(?<=^[ \t]*)#{2,3}[ \t]*(?:system|instructions?)[ \t]*:", 1.0),  # starts at the #
]


def _injection_sources() -> list[tuple[str, dict[str, float], Callable[[str], object] | None]]:
    """(pattern, group -> weight, needs) for each injection detector; group names unique across
    them. Every marker holds "<|", "<<" or "]" (case does not change those), every header "##"."""
    out: list[tuple[str, dict[str, float], Callable[[str], object] | None]] = []
    i = 0
    for phrases, prefix, needs in (
        (_INJECTION_WORDS, r"\b", None),
        (_INJECTION_MARKERS, "", has("<|", "<<", "]")),
        (_INJECTION_LINES, "", has("##")),
    ):
        weights = {}
        alts = []
        for phrase, weight in phrases:
            weights[f"inj{i}"] = weight
            alts.append(f"(?P<inj{i}>{phrase})")
            i += 1
        out.append((prefix + "(?:" + "|".join(alts) + ")", weights, needs))
    return out


INJECTION_SOURCES = _injection_sources()
