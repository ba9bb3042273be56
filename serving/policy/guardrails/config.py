"""Guardrail policy config: the rules a tenant's prompts and responses are checked against."""

from __future__ import annotations

from typing import Literal

import regex
from pydantic import Field, field_validator, model_validator

from serving.policy.guardrails.deny import pattern_source
from serving.policy.guardrails.detectors import probe_source
from serving.policy.guardrails.injection import DEFAULT_INJECTION_THRESHOLD
from serving.policy.guardrails.normalise import view
from serving.policy.guardrails.pii import PII_ENTITIES, PiiEntity

# From serving.schema, not serving.config: that would be circular (serving.config imports
# serving.policy.config, which imports this package).
from serving.schema import Strict as _Strict

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
        "markers), deny (terms and regex patterns), max_prompt_tokens (input only)."
    )
    action: Literal["block", "redact", "flag"] = Field(
        "block",
        description="block: reject the request / cut the stream. redact: mask the match "
        "in place (pii and deny only). flag: record only, text unchanged.",
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
            if rule.type == "max_prompt_tokens":
                raise ValueError(f"rule {i}: max_prompt_tokens checks the prompt; put it under input")
        return v
