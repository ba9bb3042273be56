"""Guardrail policy config: the rules a tenant's prompts and responses are checked against, and
the registry of rule types (`RULE_TYPES`).

A new rule type is one `RuleType` in RULE_TYPES (its name, the rule fields it owns, the actions
it allows, what its fields must add up to, and how it compiles to detectors or checks the
prompt's token count) plus its own fields on `GuardrailRule`, both here; its detection code
lives in its own module. The allowed values of `type`, the "field of another type" and "action
not available" errors, what the scan runs and which tenants need their prompts counted all
read the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import regex
from pydantic import Field, field_validator, model_validator

from serving.policy.guardrails.deny import pattern_source
from serving.policy.guardrails.detectors import (
    Detector,
    deny_detectors,
    injection_detectors,
    pii_detectors,
    probe_source,
)
from serving.policy.guardrails.injection import DEFAULT_INJECTION_THRESHOLD
from serving.policy.guardrails.normalise import view
from serving.policy.guardrails.pii import PII_ENTITIES, PiiEntity
from serving.schema import Strict as _Strict
from serving.schema import one_of

Action = Literal["block", "redact", "flag"]
ACTIONS: tuple[str, ...] = get_args(Action)


def _fine(rule: GuardrailRule) -> str | None:
    return None


@dataclass(frozen=True)
class RuleType:
    """One type of guardrail rule."""

    name: str
    description: str  # what it detects, in the `type` field's description
    fields: tuple[str, ...] = ()  # the GuardrailRule fields only this type may set
    actions: tuple[str, ...] = ACTIONS
    check: Callable[[GuardrailRule], str | None] = _fine  # what the fields must add up to: the error, or None
    # Text rules: the rule's detectors (the scan runs them over the normalised text).
    detectors: Callable[[GuardrailRule], list[Detector]] | None = None
    # Token-count rules (input only: the prompt is counted before the engine runs): the reason
    # a prompt of this many tokens breaks the rule, or None.
    over_count: Callable[[GuardrailRule, int], str | None] | None = None

    @property
    def reads_text(self) -> bool:
        return self.detectors is not None

    @property
    def reads_prompt_tokens(self) -> bool:
        return self.over_count is not None


def _needs_limit(rule: GuardrailRule) -> str | None:
    return None if rule.limit is not None else "max_prompt_tokens needs `limit`: the most prompt tokens allowed"


def _over_limit(rule: GuardrailRule, prompt_tokens: int) -> str | None:
    assert rule.limit is not None  # checked when the rule was read
    if prompt_tokens <= rule.limit:
        return None
    return f"the prompt has {prompt_tokens} tokens, more than the {rule.limit} allowed."


RULE_TYPES: dict[str, RuleType] = {
    t.name: t
    for t in (
        RuleType(
            "pii",
            "pii",
            fields=("entities",),
            detectors=lambda r: pii_detectors(r, r.entities),
        ),
        RuleType(
            "prompt_injection",
            "prompt_injection (heuristic phrases and chat-template markers)",
            fields=("threshold",),
            actions=("block", "flag"),
            detectors=lambda r: injection_detectors(r, r.threshold),
        ),
        RuleType(
            "deny",
            "deny (terms and regex patterns)",
            fields=("terms", "patterns"),
            check=lambda r: None if r.terms or r.patterns else "a deny rule needs `terms` or `patterns` (or both)",
            detectors=lambda r: deny_detectors(r, r.terms, r.patterns),
        ),
        RuleType(
            "max_prompt_tokens",
            "max_prompt_tokens (input only)",
            fields=("limit",),
            actions=("block", "flag"),
            check=_needs_limit,
            over_count=_over_limit,
        ),
    )
}


class GuardrailRule(_Strict):
    type: str = Field(
        description="What to detect: " + ", ".join(t.description for t in RULE_TYPES.values()) + ".",
        json_schema_extra={"enum": list(RULE_TYPES)},
    )
    action: Action = Field(
        "block",
        description="block: reject the request / cut the stream. redact: mask the match in place ("
        + " and ".join(t.name for t in RULE_TYPES.values() if "redact" in t.actions)
        + " only). flag: record only, text unchanged.",
    )
    name: str | None = Field(None, min_length=1, description="Label in errors, metrics and audit; default: the type.")
    entities: list[PiiEntity] | None = Field(None, description="pii: which entities to detect; leave out for all.")
    terms: list[str] = Field(
        default_factory=list,
        description="deny: words or phrases, matched case-insensitively as "
        "whole words in the normalised text (accents, full-width and look-alike letters, invisible "
        "characters folded; a term's own letters are folded too).",
    )
    patterns: list[str] = Field(
        default_factory=list,
        description="deny: regular expressions (Python `regex` syntax), "
        "case-sensitive unless they start with (?i), searched in the normalised text (their own "
        "non-ASCII characters folded the same way).",
    )
    threshold: float | None = Field(
        None,
        gt=0,
        description="prompt_injection: the summed weight of distinct phrases that "
        f"fires the rule (strong phrases weigh 1.0); default {DEFAULT_INJECTION_THRESHOLD}.",
    )
    limit: int | None = Field(None, ge=1, description="max_prompt_tokens: the most prompt tokens allowed.")

    @property
    def label(self) -> str:
        return self.name or self.type

    @property
    def kind(self) -> RuleType:
        return RULE_TYPES[self.type]

    def detectors(self) -> list[Detector]:
        """What the scan runs for this rule; none for a rule that does not read text."""
        return [] if self.kind.detectors is None else self.kind.detectors(self)

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        return one_of(v, RULE_TYPES)

    @field_validator("entities")
    @classmethod
    def _some_entities(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError(f"is empty; list some of {', '.join(PII_ENTITIES)}, or leave it out to detect all")
        return None if v is None else list(dict.fromkeys(v))

    @field_validator("terms")
    @classmethod
    def _terms_not_blank(cls, v: list[str]) -> list[str]:
        for i, term in enumerate(v):
            if not view(term).strip():  # (zero-width characters alone are empty too)
                raise ValueError(f"term {i} is empty")
        return v

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                regex.compile(p)
            except regex.error as e:
                raise ValueError(f"`{p}` is not a valid regular expression: {e}") from None
            try:  # what runs: its non-ASCII letters folded, as the text they search is
                compiled = regex.compile(pattern_source(p))
            except regex.error as e:
                raise ValueError(f"`{p}` is not valid once its non-ASCII characters are folded: {e}") from None
            try:  # streams search it inside a larger pattern; a trailing (?x) comment would break that
                regex.compile(probe_source(pattern_source(p)))
            except regex.error as e:
                raise ValueError(f"`{p}` cannot be embedded in a larger pattern: {e}") from None
            if compiled.fullmatch("") is not None:
                raise ValueError(f"`{p}` matches empty text, so it would match everywhere")
        return v

    @model_validator(mode="after")
    def _combination(self):
        kind = self.kind
        for other in RULE_TYPES.values():
            for field in other.fields:
                if field in self.model_fields_set and other is not kind:
                    raise ValueError(f"`{field}` is only for {other.name} rules, not {self.type}")
        if self.action not in kind.actions:
            raise ValueError(
                f"action `{self.action}` is not available for {self.type}; use {' or '.join(kind.actions)}"
            )
        problem = kind.check(self)
        if problem is not None:
            raise ValueError(problem)
        return self


class GuardrailPolicy(_Strict):
    input: list[GuardrailRule] = Field(
        default_factory=list, description="Rules over the prompt, before the engine sees it."
    )
    output: list[GuardrailRule] = Field(
        default_factory=list,
        description="Rules over the response, before the client sees it "
        "(streamed responses are scanned as they stream).",
    )

    @field_validator("output")
    @classmethod
    def _output_rules(cls, v: list[GuardrailRule]) -> list[GuardrailRule]:
        for i, rule in enumerate(v):
            if rule.kind.reads_prompt_tokens:
                raise ValueError(f"rule {i}: {rule.type} checks the prompt; put it under input")
        return v
