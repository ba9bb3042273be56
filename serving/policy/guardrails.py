"""Input and output guardrails: PII, prompt-injection heuristics, deny-lists, prompt size.

A tenant's guardrail policy is two lists of rules, `input` (the prompt, before the engine sees
it) and `output` (the response, before the client sees it). Each rule detects something and
takes one action: `block` (the request or the stream ends with an error that never repeats the
matched text), `redact` (the match is masked in place: `[EMAIL]`, ..., `[REDACTED]` for
deny-lists) or `flag` (recorded only; the text is unchanged).

How a text is scanned
---------------------
Every detector is a regex (plus, for some PII, a validator: Luhn, IBAN mod-97, SSN rules).
- block and flag detectors are independent: every validated match of a block detector blocks,
  every one of a flag detector is counted, whatever else matched around it.
- redact detectors share the text: scanning left to right, the next redaction is the validated
  match that starts first (then the longest, then the earliest rule); scanning resumes after it.
A complete match that fails its validator is plain text, and the search goes on one character
after its start (so `1 4111 1111 1111 1111` still finds the card inside).

Streams
-------
`StreamScanner` runs the same scan on text that arrives in pieces and releases only what is
decided. It uses the `regex` module's partial matching: `P.search(text, partial=True)` reports a
match that could still be forming at the end of the buffer, and the probe `(?:P)(?!)`, which can
never match, reports the leftmost position from which *any* path of P reaches the end of the
buffer. A decision at a position is final once no path from it reaches the end, so text before
the earliest such position is released (redacted) at once and the rest is held. Plain prose is
held by at most a word (a word may still become an email's local part). So, for every split of a
text into chunks, what `feed`/`flush` release adds up to `check_text(text)`; the one exception is
a candidate longer than `MAX_HOLD` characters, which is decided on what has arrived.

Per token, only the detectors that are holding text back, or that a character of the new piece
could begin a match of (a precomputed table), are searched again; the rest stay idle. Only the
unreleased text (and a little context for lookbehinds) is kept and searched.

Presidio (MIT licence) was the reference for the PII regexes and validators; we do not depend on
it: its analyzer pulls spaCy and a model download, and it cannot match partially on a stream.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Literal

import regex
from pydantic import Field, field_validator, model_validator

# From serving.schema, not serving.config: that would be circular (serving.config imports
# serving.policy.config, which imports this module).
from serving.schema import Strict as _Strict

PII_ENTITIES = ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "secret")
PiiEntity = Literal["email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "secret"]

MASKS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "credit_card": "[CREDIT_CARD]",
    "iban": "[IBAN]",
    "us_ssn": "[US_SSN]",
    "ip_address": "[IP_ADDRESS]",
    "secret": "[SECRET]",
}
DENY_MASK = "[REDACTED]"

# What a block message says was found: never the matched text itself.
_FOUND = {
    "email": "an email address",
    "phone": "a phone number",
    "credit_card": "a credit card number",
    "iban": "an IBAN",
    "us_ssn": "a US social security number",
    "ip_address": "an IP address",
    "secret": "a secret (an API key or a private key)",
    "term": "text on the deny-list",
    "pattern": "text on the deny-list",
    None: "what looks like a prompt injection",
}

MAX_HOLD = 8192  # longest text a stream holds back undecided (a 4096-bit RSA PEM key is ~3.3k)
_CONTEXT = 64  # released characters kept so lookbehinds and \b see what precedes the buffer
DEFAULT_INJECTION_THRESHOLD = 1.0  # one strong phrase (weight 1.0) is enough


# -- config --------------------------------------------------------------------------------------

_OWNER = {  # field -> the rule type it belongs to
    "entities": "pii",
    "terms": "deny",
    "patterns": "deny",
    "threshold": "prompt_injection",
    "limit": "max_prompt_tokens",
}


class GuardrailRule(_Strict):
    type: Literal["pii", "prompt_injection", "deny", "max_prompt_tokens"] = Field(
        description="What to detect: pii, prompt_injection (heuristic phrases and chat-template "
        "markers), deny (terms and regex patterns), max_prompt_tokens (input only).")
    action: Literal["block", "redact", "flag"] = Field(
        "block", description="block: reject the request / cut the stream. redact: mask the match "
        "in place (pii and deny only). flag: record only, text unchanged.")
    name: str | None = Field(
        None, min_length=1, description="Label in errors, metrics and audit; default: the type.")
    entities: list[PiiEntity] | None = Field(
        None, description="pii: which entities to detect; leave out for all.")
    terms: list[str] = Field(
        default_factory=list, description="deny: words or phrases, matched case-insensitively as "
        "whole words.")
    patterns: list[str] = Field(
        default_factory=list, description="deny: regular expressions (Python `regex` syntax), "
        "case-sensitive unless they start with (?i).")
    threshold: float | None = Field(
        None, gt=0, description="prompt_injection: the summed weight of distinct phrases that "
        f"fires the rule (strong phrases weigh 1.0); default {DEFAULT_INJECTION_THRESHOLD}.")
    limit: int | None = Field(
        None, ge=1, description="max_prompt_tokens: the most prompt tokens allowed.")

    @property
    def label(self) -> str:
        return self.name or self.type

    @field_validator("entities")
    @classmethod
    def _some_entities(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError(f"is empty; list some of {', '.join(PII_ENTITIES)}, or leave it out "
                             "to detect all")
        return None if v is None else list(dict.fromkeys(v))

    @field_validator("terms")
    @classmethod
    def _terms_not_blank(cls, v: list[str]) -> list[str]:
        for i, term in enumerate(v):
            if not term.strip():
                raise ValueError(f"term {i} is empty")
        return v

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                compiled = regex.compile(p)
            except regex.error as e:
                raise ValueError(f"`{p}` is not a valid regular expression: {e}") from None
            try:  # streams search it inside a larger pattern; a trailing (?x) comment would break that
                regex.compile(_probe_source(p))
            except regex.error as e:
                raise ValueError(f"`{p}` cannot be embedded in a larger pattern: {e}") from None
            if compiled.fullmatch("") is not None:
                raise ValueError(f"`{p}` matches empty text, so it would match everywhere")
        return v

    @model_validator(mode="after")
    def _combination(self):
        for field, owner in _OWNER.items():
            if field in self.model_fields_set and owner != self.type:
                raise ValueError(f"`{field}` is only for {owner} rules, not {self.type}")
        if self.action == "redact" and self.type in ("prompt_injection", "max_prompt_tokens"):
            raise ValueError(f"action `redact` is not available for {self.type}; use block or flag")
        if self.type == "deny" and not (self.terms or self.patterns):
            raise ValueError("a deny rule needs `terms` or `patterns` (or both)")
        if self.type == "max_prompt_tokens" and self.limit is None:
            raise ValueError("max_prompt_tokens needs `limit`: the most prompt tokens allowed")
        return self


class GuardrailPolicy(_Strict):
    input: list[GuardrailRule] = Field(
        default_factory=list, description="Rules over the prompt, before the engine sees it.")
    output: list[GuardrailRule] = Field(
        default_factory=list, description="Rules over the response, before the client sees it "
        "(streamed responses are scanned as they stream).")

    @field_validator("output")
    @classmethod
    def _output_rules(cls, v: list[GuardrailRule]) -> list[GuardrailRule]:
        for i, rule in enumerate(v):
            if rule.type == "max_prompt_tokens":
                raise ValueError(f"rule {i}: max_prompt_tokens checks the prompt; put it under input")
        return v


# -- runtime types ---------------------------------------------------------------------------------


@dataclass
class GuardrailAction:
    guardrail: str  # the rule's name
    action: str  # "block" | "redact" | "flag"
    direction: str  # "input" | "output"
    entity: str | None  # "email", ... for pii; "term"/"pattern" for deny; None otherwise
    count: int = 1


class GuardrailBlocked(Exception):
    """A block rule matched. `message` is safe to show the user: it never repeats the match."""

    def __init__(self, guardrail: str, direction: str, entity: str | None, message: str):
        super().__init__(message)
        self.guardrail = guardrail
        self.direction = direction
        self.entity = entity
        self.message = message


def _blocked(guardrail: str, direction: str, entity: str | None) -> GuardrailBlocked:
    what = "prompt" if direction == "input" else "response"
    return GuardrailBlocked(guardrail, direction, entity,
                            f"Blocked by guardrail `{guardrail}`: the {what} contains {_FOUND[entity]}.")


# -- detectors -----------------------------------------------------------------------------------
# Patterns are written so a match cannot start in the middle of a word or number (lookbehinds)
# and cannot stop in the middle of one (lookaheads); the stream scanner relies on the first.


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _accept_card(m: regex.Match) -> int | None:
    """End of the longest Luhn-valid card (13-19 digits) in the match that ends between groups."""
    text, start = m.group(), m.start()
    ends = []  # (digit count, end offset) at every group boundary
    digits = 0
    for i, ch in enumerate(text):
        if ch.isdigit():
            digits += 1
            if i + 1 == len(text) or not text[i + 1].isdigit():
                ends.append((digits, i + 1))
    compact = "".join(ch for ch in text if ch.isdigit())
    for n, end in reversed(ends):
        if 13 <= n <= 19 and _luhn_ok(compact[:n]):
            return start + end
    return None


# SWIFT IBAN registry: country -> total length.
_IBAN_LENGTH = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def _iban_ok(iban: str) -> bool:
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _accept_iban(m: regex.Match) -> int | None:
    """End of the IBAN in the match: exactly its country's length, then a group boundary."""
    text, start = m.group(), m.start()
    length = _IBAN_LENGTH.get(text[:2])
    if length is None:
        return None
    taken = 0
    for i, ch in enumerate(text):
        if ch != " ":
            taken += 1
            if taken == length:
                end = start + i + 1
                after = m.string[end:end + 1]
                if after.isalnum():  # the IBAN would end inside a group
                    return None
                compact = text[:i + 1].replace(" ", "")
                return end if _iban_ok(compact) else None
    return None


def _accept_ssn(m: regex.Match) -> int | None:
    digits = "".join(ch for ch in m.group() if ch.isdigit())
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    return m.end()


def _accept_phone(m: regex.Match) -> int | None:
    digits = sum(ch.isdigit() for ch in m.group())
    return m.end() if 7 <= digits <= 15 else None


def _accept_ipv6(m: regex.Match) -> int | None:
    text = m.group()
    if not any(ch not in ":." for ch in text):  # "::" alone is punctuation, not an address
        return None
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return m.end()


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HEX4 = r"[0-9A-Fa-f]{1,4}"



def _has(*literals: str) -> Callable[[str], bool]:
    return lambda text: any(lit in text for lit in literals)


_has_digit = re.compile(r"\d").search  # the same Unicode digits as the patterns' \d

# entity -> [(pattern, validator, lazy, needs)]. `lazy` patterns (a lazy quantifier up to a
# terminator) are final once they match, so they skip the any-path probe, which would hold them
# to the end. `needs(text)` is false for a text no match can be in (every match holds one of
# those characters or strings): a whole text that fails it is not searched at all.
_PII: dict[str, list[tuple[str, Callable[[regex.Match], int | None] | None, bool, Callable[[str], object]]]] = {
    "email": [(
        r"(?<![\w.%+-])[\w%+-](?:[\w.%+-]{0,62}[\w%+-])?"
        r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
        r"(?![\w-]|\.[A-Za-z0-9])", None, False, _has("@"))],
    # International (E.164: + and 7-15 digits) or NANP with separators. Bare digit runs, dates
    # (2024-01-31), versions (1.2.3) and prices are not phone numbers here.
    "phone": [(
        r"(?<![\w+.-])(?:"
        r"\+[1-9](?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){1,7}"
        r"|(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
        r")(?![\w]|[.-]\d)", _accept_phone, False, _has_digit)],
    "credit_card": [(r"(?<![\w+-])(?:\d[ -]?){12,18}\d(?!\w)", _accept_card, False, _has_digit)],
    "iban": [(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?",
              _accept_iban, False, _has_digit)],
    "us_ssn": [(r"(?<![\w+.-])\d{3}(?P<ssn_sep>[- ]?)\d{2}(?P=ssn_sep)\d{4}(?!\w|-\d)",
                _accept_ssn, False, _has_digit)],
    "ip_address": [
        # An IPv4 address right after "hex:" is the tail of an IPv6 one (::ffff:192.0.2.1).
        (rf"(?<![\w.]|[0-9A-Fa-f]:|::){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)", None, False, _has_digit),
        (rf"(?<![\w:.])(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:{_HEX4}|{_OCTET}(?:\.{_OCTET}){{3}})?"
         r"(?![\w:]|\.\d)", _accept_ipv6, False, _has(":")),
    ],
    "secret": [
        (r"(?<![\w-])(?:"
         r"sk-keel-[A-Za-z0-9_-]{8,}"  # Keel
         r"|sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"  # OpenAI
         r"|(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"  # AWS access key id
         r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
         r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
         r"|AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"  # Google API key
         r"|[sr]k_live_[A-Za-z0-9]{16,}"  # Stripe
         r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"  # JWT
         r")", None, False,
         _has("sk-", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "AIza",
              "k_live_", "eyJ")),
        # A PEM private key through its matching END line; an unterminated one to the end.
        (r"-----BEGIN (?P<pem_label>(?:[A-Z0-9]+ )*)PRIVATE KEY-----[\s\S]*?"
         r"(?:-----END (?P=pem_label)PRIVATE KEY-----|\Z)", None, True, _has("PRIVATE KEY-----")),
    ],
}

# Prompt injection: (phrase, weight); case-insensitive, any whitespace between words. Three
# detectors, because one alternation of everything is several times slower to search.
_INJECTION_WORDS: list[tuple[str, float]] = [  # each starts at a word boundary
    (r"(?:ignore|disregard|forget|skip|override|bypass|neglect)\s+"
     r"(?:(?:all|any|every|the|your|my|of|these|those|everything)\s+){0,3}"
     r"(?:previous|prior|above|earlier|preceding|foregoing|former|original|initial|system)\s+"
     r"(?:instructions?|prompts?|rules?|directions?|directives?|guidelines?|messages?|commands?"
     r"|context|guidance|constraints?)\b", 1.0),
    (r"(?:ignore|disregard|forget)\s+(?:everything|all)\s+(?:above|before|prior)\b", 1.0),
    (r"you\s+are\s+now\s+(?:DAN\b|in\s+(?:developer|dev|god|jailbreak|jailbroken|unrestricted"
     r"|unfiltered|debug)\s+mode\b|(?:an?\s+)?(?:unrestricted|unfiltered|uncensored|jailbroken)\b)",
     1.0),
    (r"(?:enable|activate|enter|switch\s+to)\s+(?:developer|dev|god|jailbreak|DAN)\s+mode\b", 1.0),
    (r"(?:reveal|print|show|display|repeat|output|leak|dump|expose|disclose|tell\s+me"
     r"|give\s+me|write\s+out|share)\s+(?:me\s+)?(?:your|the)\s+"
     r"(?:(?:full|entire|exact|original|hidden|secret|initial|complete|whole)\s+)*"
     r"(?:system\s+(?:prompt|message|instructions?)|(?:hidden|initial|original|secret)\s+"
     r"(?:prompt|instructions?))\b", 1.0),
    (r"(?:act|behave|respond|operate)\s+as\s+(?:if\s+you\s+(?:are|were)\s+)?(?:an?\s+)?"
     r"(?:unrestricted|unfiltered|uncensored|jailbroken|unlimited|amoral|unaligned)\b", 1.0),
    (r"pretend\s+(?:that\s+)?(?:you\s+(?:are|have)|to\s+(?:be|have))\s+(?:an?\s+)?"
     r"(?:no\s+(?:restrictions|rules|limits|filters|guidelines)|unrestricted|unfiltered"
     r"|uncensored|jailbroken)\b", 1.0),
    (r"what\s+(?:is|are)\s+your\s+(?:system\s+prompt|(?:hidden|initial|original)\s+instructions)\b",
     0.6),
    (r"do\s+anything\s+now\b", 0.6),
    (r"jailbr(?:eak|oken)\b", 0.5),
    (r"new\s+(?:system\s+)?instructions\s*:", 0.5),
    (r"(?:no\s+longer|not)\s+bound\s+by\b", 0.5),
    (r"from\s+now\s+on,?\s+you\s+(?:will|must|are|shall)\b", 0.4),
    (r"without\s+(?:any\s+)?(?:restrictions|filters|censorship|limitations|guidelines)\b", 0.4),
]
_INJECTION_MARKERS: list[tuple[str, float]] = [  # chat-template markers have no place in user text
    (r"<\|im_start\|>\s*(?:system|assistant)\b|<\|start_header_id\|>\s*system\b|<<SYS>>"
     r"|\[/?INST\]|<\|system\|>", 1.0),
    (r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>", 0.5),
]
_INJECTION_LINES: list[tuple[str, float]] = [  # a "### System:" header line
    (r"(?<=^[ \t]*)#{2,3}[ \t]*(?:system|instructions?)[ \t]*:", 1.0),  # starts at the #
]


def _injection_sources() -> list[tuple[str, dict[str, float], Callable[[str], object] | None]]:
    """(pattern, group -> weight, needs) for each injection detector; group names unique across
    them. Every marker holds "<|", "<<" or "]" (case does not change those), every header "##"."""
    out, i = [], 0
    for phrases, prefix, needs in ((_INJECTION_WORDS, r"\b", None), (_INJECTION_MARKERS, "", _has("<|", "<<", "]")),
                                   (_INJECTION_LINES, "", _has("##"))):
        weights = {}
        alts = []
        for phrase, weight in phrases:
            weights[f"inj{i}"] = weight
            alts.append(f"(?P<inj{i}>{phrase})")
            i += 1
        out.append((prefix + "(?:" + "|".join(alts) + ")", weights, needs))
    return out


_INJECTION = _injection_sources()


@dataclass(eq=False)
class _Detector:
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
    needs: Callable[[str], object] | None = None  # see _PII
    weights: dict[str, float] | None = None  # prompt injection: group name -> weight
    threshold: float = 0.0
    score_key: object = None  # prompt injection: the rule; its detectors' phrases add up


def _detector(rule: GuardrailRule, entity: str | None, mask: str, source: str, flags: int = 0,
              accept=None, lazy: bool = False, builtin: bool = True, weights=None,
              threshold: float = 0.0, needs=None) -> _Detector:
    pattern = regex.compile(source, flags)
    starts, pairs = _start_table(source, flags) if builtin else (None, None)
    return _Detector(
        guardrail=rule.label, action=rule.action, entity=entity, mask=mask, source=source,
        pattern=pattern,
        probe=None if lazy else regex.compile(_probe_source(source), flags),
        accept=accept, starts=starts, pairs=pairs, needs=needs, weights=weights,
        threshold=threshold, score_key=rule if weights is not None else None)


def _probe_source(source: str) -> str:
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
    pairs = frozenset(p << 7 | ord(ch) for ch in starts for p in range(128)
                      if pattern.match(chr(p) + ch, 1, partial=True))
    return starts, pairs


def _term_source(terms: list[str]) -> str:
    phrases = sorted({r"\s+".join(regex.escape(w) for w in t.split()) for t in terms}, key=len, reverse=True)
    return r"(?<!\w)(?:" + "|".join(phrases) + r")(?!\w)"


def _detectors(rule: GuardrailRule) -> list[_Detector]:
    if rule.type == "pii":
        out = []
        for entity in rule.entities or PII_ENTITIES:
            for source, accept, lazy, needs in _PII[entity]:
                out.append(_detector(rule, entity, MASKS[entity], source, accept=accept, lazy=lazy,
                                     needs=needs))
        return out
    if rule.type == "deny":
        out = []
        if rule.terms:
            out.append(_detector(rule, "term", DENY_MASK, _term_source(rule.terms), regex.IGNORECASE))
        for source in rule.patterns:
            out.append(_detector(rule, "pattern", DENY_MASK, source, builtin=False))
        return out
    if rule.type == "prompt_injection":
        threshold = rule.threshold if rule.threshold is not None else DEFAULT_INJECTION_THRESHOLD
        return [_detector(rule, None, "", source, regex.IGNORECASE | regex.MULTILINE,
                          weights=weights, threshold=threshold, needs=needs) for source, weights, needs in _INJECTION]
    return []  # max_prompt_tokens is not a text detector


# -- the scan ------------------------------------------------------------------------------------


_MATCH, _PENDING, _IDLE = 0, 1, 2


class _Cursor:
    """One detector's place in one text, in absolute offsets.

    IDLE: nothing can start before the end of the text seen so far; it is searched again only
    when new text holds a character a match can begin with. PENDING: a match could still be
    forming from `start`. MATCH (redact only): a decided, validated match at [start, end)."""

    __slots__ = ("det", "bit", "kind", "start", "end", "run")

    def __init__(self, det: _Detector, bit: int):
        self.det = det
        self.bit = bit
        self.kind = _IDLE
        self.start = 0
        self.end = 0
        self.run = -1  # the run whose text this decision was made on


def _decide(det: _Detector, s: str, pos: int, final: bool) -> tuple[int, int, int, regex.Match | None]:
    """The next decision for det in s from pos: (kind, start, end, match)."""
    n = len(s)
    partial = not final
    probe_at = -1  # leftmost position >= pos from which some path reaches the end (cached)
    while True:
        m = det.pattern.search(s, pos, partial=partial)
        if m is None:
            return _IDLE, n, n, None
        a, b = m.span()
        if m.partial:
            return (_PENDING, a, a, None) if a < n else (_IDLE, n, n, None)
        if partial:
            # search() prefers a complete match to an earlier partial one; the probe finds those,
            # and paths of this match's start that more text would take instead.
            if det.probe is not None:
                if probe_at < pos:
                    q = det.probe.search(s, pos, partial=True)
                    probe_at = q.start() if q is not None else n
                if probe_at <= a:
                    return _PENDING, probe_at, probe_at, None
            if b >= n:  # touches the end: more text could extend it
                return _PENDING, a, a, None
        end = det.accept(m) if det.accept is not None else b
        if end is None or end == a:
            pos = a + 1  # not a match after all: plain text; a match may start inside it
            continue
        return _MATCH, a, end, m


class _Tally:
    """The actions of one check (merged per guardrail, action and entity) and injection scores."""

    def __init__(self, direction: str):
        self.direction = direction
        self.actions: list[GuardrailAction] = []
        self._index: dict[tuple, GuardrailAction] = {}
        self.injection_groups: dict[int, dict[str, float]] = {}  # id(rule) -> phrase -> weight
        self.injection_fired: set[int] = set()

    def add(self, guardrail: str, action: str, entity: str | None) -> None:
        key = (guardrail, action, entity)
        found = self._index.get(key)
        if found is None:
            found = self._index[key] = GuardrailAction(guardrail, action, self.direction, entity, 0)
            self.actions.append(found)
        found.count += 1


class _Plan:
    """A guard's compiled detectors, split by what their matches do to the text."""

    def __init__(self, rules: list[GuardrailRule]):
        dets = [d for rule in rules for d in _detectors(rule)]
        self.block = [d for d in dets if d.action == "block"]
        self.redact = [d for d in dets if d.action == "redact"]
        self.flag = [d for d in dets if d.action == "flag"]
        self.dets = self.block + self.redact + self.flag
        self.empty = not dets
        self.all_bits = (1 << len(self.dets)) - 1
        # ASCII character -> the detectors a match of which can begin with it; any other
        # character may begin anything. Detectors with no known start set are always searched.
        always = sum(1 << i for i, d in enumerate(self.dets) if d.starts is None)
        self.starts_with = {chr(c): always for c in range(128)}
        self.after = [always] * (128 * 128)  # prev << 7 | char -> detectors that can start there
        for i, d in enumerate(self.dets):
            for ch in d.starts or ():
                self.starts_with[ch] |= 1 << i
            for pair in d.pairs or ():
                self.after[pair] |= 1 << i
        # A whole text lacking what every match of a detector holds skips that detector.
        self.needs = [(1 << i, d.needs) for i, d in enumerate(self.dets) if d.needs is not None]
        self._piece_bits: dict[tuple[str, str], int] = {}

    def bits_for(self, text: str, prev: str) -> int:
        """The detectors a match of which could begin somewhere in text (a streamed piece that
        follows the character prev, "" at the very start)."""
        first, after, bits = self.starts_with, self.after, 0
        p = ord(prev) if prev else 128
        for ch in text:
            c = ord(ch)
            if c >= 128:
                return self.all_bits
            bits |= after[p << 7 | c] if p < 128 else first[ch]
            p = c
        return bits

    def bits_for_piece(self, piece: str, prev: str) -> int:
        """The detectors a match of which could begin in a streamed piece, remembered per
        (previous character, piece): pieces are tokens, and tokens repeat.

        Of our own detectors, only those that the piece itself could begin (a partial search of
        prev + piece; one character of context, which can only let more through) are woken: a
        token such as " the" wakes none of them, though "t" may begin a phrase."""
        key = (prev, piece)
        bits = self._piece_bits.get(key)
        if bits is None:
            if len(self._piece_bits) >= 8192:
                self._piece_bits.clear()
            bits = self.bits_for(piece, prev)
            if len(piece) <= 32:
                text, at = prev + piece, len(prev)
                for i, det in enumerate(self.dets):
                    bit = 1 << i
                    if bits & bit and det.starts is not None:
                        m = det.pattern.search(text, at, partial=True)
                        # a partial match at the very end starts in the next piece, which is checked then
                        if m is None or m.start() >= len(text):
                            bits &= ~bit
            self._piece_bits[key] = bits
        return bits

    def possible(self, text: str) -> int:
        """The detectors that could match somewhere in a whole text."""
        bits = self.all_bits
        for bit, needs in self.needs:
            if not needs(text):
                bits &= ~bit
        return bits


class _Scan:
    """One text, scanned as it arrives. `feed` and `finish` return the text that is decided."""

    def __init__(self, plan: _Plan, tally: _Tally, mask: int = -1):
        """mask: the detectors to run (a whole text need not run those that cannot match it)."""
        self.plan = plan
        self.tally = tally
        self.mask = mask
        n_block, n_redact = len(plan.block), len(plan.redact)
        cursors = [_Cursor(d, 1 << i) if (1 << i) & mask else None for i, d in enumerate(plan.dets)]
        self.block = [c for c in cursors[:n_block] if c is not None]
        self.redact = [c for c in cursors[n_block:n_block + n_redact] if c is not None]
        self.flag = [c for c in cursors[n_block + n_redact:] if c is not None]
        self.text = ""  # what is kept: _CONTEXT released characters, then the undecided rest
        self.base = 0  # absolute offset of text[0]
        self.released = 0  # absolute offset up to which text has been released
        self.scanned = 0  # absolute end of the text at the previous run
        self.runs = 0

    def feed(self, piece: str) -> str:
        self.text += piece
        out = self._run(final=False)
        oldest = self._oldest_pending()
        if self.base + len(self.text) - oldest > MAX_HOLD:
            out += self._run(final=True)  # held too long: decide on what has arrived
            oldest = self._oldest_pending()
        self._trim(oldest)
        return out

    def finish(self) -> str:
        out = self._run(final=True)
        self._trim()
        return out

    def whole(self, text: str) -> str:
        """A text that is complete: the same decisions as feeding it in pieces, in one pass.
        (Construct the scan with mask=plan.possible(text) to skip what cannot match.)"""
        self.text = text
        return self.finish()

    # -- internals ----------------------------------------------------------------------------

    def _run(self, final: bool) -> str:
        s, base = self.text, self.base
        new_from = self.scanned
        end = base + len(s)
        self.scanned = end
        self.runs += 1
        at = new_from - base
        if end - new_from <= 64:
            woken = self.plan.bits_for_piece(s[at:], s[at - 1] if at > 0 else "")
        elif not final and end - new_from <= 512:  # several tokens read at once: cheaper than searching
            woken = self.plan.bits_for(s[at:], s[at - 1] if at > 0 else "")
        else:
            woken = self.plan.all_bits
        hold = end
        for c in self.block:
            if c.kind == _PENDING or c.bit & woken:
                self._independent(c, s, base, new_from, final)
            if c.kind == _PENDING:
                hold = min(hold, c.start)
        for c in self.flag:
            if c.kind == _PENDING or c.bit & woken:
                self._independent(c, s, base, new_from, final)
        return self._redact(s, base, new_from, woken, final, hold)

    def _independent(self, c: _Cursor, s: str, base: int, new_from: int, final: bool) -> None:
        """Advance a block or flag detector to its next undecided position, acting on matches."""
        det = c.det
        pos = (c.start if c.kind == _PENDING else new_from) - base
        while True:
            kind, a, b, m = _decide(det, s, pos, final)
            if kind != _MATCH:
                c.kind, c.start = kind, base + a
                return
            pos = b
            if det.weights is None or self._injection_fires(det, m):
                self._act(det)

    def _injection_fires(self, det: _Detector, m: regex.Match) -> bool:
        """Adds the phrase to its rule's score; True the first time the score reaches the threshold."""
        key = id(det.score_key)
        tally = self.tally
        if key in tally.injection_fired:
            return False
        groups = tally.injection_groups.setdefault(key, {})
        groups[m.lastgroup] = det.weights[m.lastgroup]
        if sum(groups.values()) >= det.threshold:
            tally.injection_fired.add(key)
            return True
        return False

    def _act(self, det: _Detector) -> None:
        if det.action == "block":
            raise _blocked(det.guardrail, self.tally.direction, det.entity)
        self.tally.add(det.guardrail, det.action, det.entity)

    def _redact(self, s: str, base: int, new_from: int, woken: int, final: bool, block_hold: int) -> str:
        """Release text up to the first undecided position, masking redact matches: the next
        redaction is the match that starts first (then the longest, then the earliest rule)."""
        run = self.runs
        pos = self.released
        out = []
        # An idle detector that no character of the new text could begin a match of stays idle.
        cursors = [c for c in self.redact if c.kind != _IDLE or c.bit & woken]
        while True:
            best = None
            hold = block_hold
            for c in cursors:
                kind = c.kind
                if kind == _IDLE:
                    if c.run == run or not c.bit & woken:
                        continue
                    frm = max(new_from, pos)
                elif c.start < pos or (kind == _PENDING and c.run != run):
                    frm = max(c.start, pos)  # overtaken by a redaction, or more text arrived
                else:
                    frm = -1
                if frm >= 0:
                    kind, a, b, _ = _decide(c.det, s, frm - base, final)
                    c.kind, c.start, c.end, c.run = kind, base + a, base + b, run
                if kind == _PENDING:
                    if c.start < hold:
                        hold = c.start
                elif kind == _MATCH and (best is None or c.start < best.start
                                         or c.start == best.start and c.end > best.end):
                    best = c
            if best is not None and best.start < hold:
                out.append(s[pos - base:best.start - base])
                out.append(best.det.mask)
                self.tally.add(best.det.guardrail, "redact", best.det.entity)
                pos = best.end
                continue
            if hold > pos:
                out.append(s[pos - base:hold - base])
                pos = hold
            break
        self.released = pos
        return "".join(out)

    def _oldest_pending(self) -> int:
        oldest = self.released
        for c in self.block:
            if c.kind == _PENDING and c.start < oldest:
                oldest = c.start
        for c in self.flag:
            if c.kind == _PENDING and c.start < oldest:
                oldest = c.start
        return oldest

    def _trim(self, oldest: int | None = None) -> None:
        cut = (self._oldest_pending() if oldest is None else oldest) - _CONTEXT - self.base
        if cut > 256:  # trim in steps: slicing the kept text on every piece would cost more
            self.text = self.text[cut:]
            self.base += cut


def _whole(plan: _Plan, tally: _Tally, text: str) -> str:
    return _Scan(plan, tally, plan.possible(text)).whole(text)


# -- guards ----------------------------------------------------------------------------------------


class InputGuard:
    """A policy's input rules, applied to a request's prompt texts before the engine sees them."""

    def __init__(self, rules: list[GuardrailRule]):
        self._token_rules = [r for r in rules if r.type == "max_prompt_tokens"]
        self._plan = _Plan([r for r in rules if r.type != "max_prompt_tokens"])

    def check(self, texts: list[str], prompt_tokens: int | None = None) -> tuple[list[str], list[GuardrailAction]]:
        """Returns the texts (redacted where a redact rule matched) and the actions taken.
        Raises GuardrailBlocked on the first block. Injection phrases add up across the texts;
        max_prompt_tokens is skipped when prompt_tokens is None (nothing counted them)."""
        tally = _Tally("input")
        if prompt_tokens is not None:
            for rule in self._token_rules:
                if prompt_tokens > rule.limit:
                    if rule.action == "block":
                        raise GuardrailBlocked(
                            rule.label, "input", None,
                            f"Blocked by guardrail `{rule.label}`: the prompt has {prompt_tokens} "
                            f"tokens, more than the {rule.limit} allowed.")
                    tally.add(rule.label, rule.action, None)
        if self._plan.empty:
            return list(texts), tally.actions
        return [_whole(self._plan, tally, text) for text in texts], tally.actions


class OutputGuard:
    """A policy's output rules, applied to whole responses (`check_text`) or streams (`stream`)."""

    def __init__(self, rules: list[GuardrailRule]):
        self._plan = _Plan(rules)

    @property
    def active(self) -> bool:
        return not self._plan.empty

    def check_text(self, text: str) -> tuple[str, list[GuardrailAction]]:
        """A whole (non-streamed) output: the text as the client may see it, and the actions.
        Raises GuardrailBlocked."""
        tally = _Tally("output")
        if self._plan.empty:
            return text, tally.actions
        return _whole(self._plan, tally, text), tally.actions

    def stream(self) -> StreamScanner:
        return StreamScanner(self._plan)


class StreamScanner:
    """One streamed output (one choice). Concatenating what feed and flush return gives
    check_text(whole text); nothing of a span that will be blocked or redacted is released.
    `actions` accumulates what was done; after a block it ends with that block (count 1)."""

    def __init__(self, plan: _Plan):
        self._plan = plan
        self._tally = _Tally("output")
        self.actions: list[GuardrailAction] = self._tally.actions
        self._scan: _Scan | None = None  # made on the first feed (a stream read whole needs none)
        self._blocked: GuardrailBlocked | None = None

    def feed(self, text: str) -> str:
        """The text that is safe to release now (redacted). Raises GuardrailBlocked."""
        if self._plan.empty:
            return text
        if self._blocked is not None:
            raise self._blocked
        if self._scan is None:
            self._scan = _Scan(self._plan, self._tally)
        try:
            return self._scan.feed(text)
        except GuardrailBlocked as e:
            self._note_block(e)
            raise

    def flush(self) -> str:
        """End of the stream: decide on everything held and release it. Raises GuardrailBlocked."""
        if self._blocked is not None:
            raise self._blocked
        if self._scan is None:
            return ""
        try:
            return self._scan.finish()
        except GuardrailBlocked as e:
            self._note_block(e)
            raise

    def last(self, text: str) -> str:
        """The stream's last text: feed(text) + flush(). When nothing came before it (the whole
        output arrived at once) it is checked as a whole text, which skips the detectors that
        cannot match it instead of searching each for a match that more text could complete."""
        if self._plan.empty:
            return text
        if self._scan is not None or self._blocked is not None:
            return (self.feed(text) if text else "") + self.flush()
        try:
            return _whole(self._plan, self._tally, text) if text else ""
        except GuardrailBlocked as e:
            self._note_block(e)
            raise

    def _note_block(self, e: GuardrailBlocked) -> None:
        # The stream's record ends with the block, so the audit shows why it stopped.
        self._blocked = e
        self._tally.add(e.guardrail, "block", e.entity)
