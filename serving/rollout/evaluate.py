"""The rollout's evaluation gate: a small prompt set with expectations, run against the candidate
alone before it gets any traffic. Plain data in and out; the requests go through an injected
`ask(path, body, timeout_s) -> response JSON` (serving.rollout.stack sends them to the gateway, pinned to
the candidate with an admin key and `x-keel-variant`), so the checks are unit-tested by hand.

An eval file (YAML or JSON):

    min_pass_rate: 1.0          # share of cases that must pass (default: all)
    cases:
      - name: greets
        messages: [{role: user, content: "Say hello."}]   # chat, or `prompt:` for completions
        max_tokens: 16
        params: {stop: ["\\n"]}        # more request fields, as the API takes them
        expect: {regex: "(?i)hello"}    # or {exact: "..."} or {json_schema: {...}}

Greedy decoding (temperature 0) unless a case says otherwise, so a case means the same on every
run. Every limit has a value: cases, tokens (which bound the text a regex reads), the time each
request may take.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from serving.schema import Strict

MAX_CASES = 500
MAX_TOKENS = 4096
MAX_FILE_BYTES = 4 << 20
# What a failure quotes of the answer: enough to see what went wrong, not a page of text.
QUOTE_CHARS = 120


class EvalError(RuntimeError):
    """An eval file that cannot be used; str() names the file and what is wrong."""


_OWN_FIELDS = {"model", "prompt", "messages", "max_tokens", "temperature", "stream", "n"}


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class Expect(Strict):
    """Exactly one expectation about the answer's text."""

    regex: str | None = Field(None, max_length=2000, description="Found anywhere in the answer (re.search).")
    exact: str | None = Field(
        None, max_length=100_000, description="The whole answer, leading and trailing whitespace ignored."
    )
    json_schema: dict | None = Field(
        None, description="The answer parses as JSON and validates against this schema (JSON Schema 2020-12)."
    )

    @model_validator(mode="after")
    def _one(self) -> Expect:
        given = [k for k in ("regex", "exact", "json_schema") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of regex, exact, json_schema (got {', '.join(given) or 'none'})")
        return self

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
        return v

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v: dict | None) -> dict | None:
        if v is not None:
            from jsonschema import Draft202012Validator, SchemaError

            try:
                Draft202012Validator.check_schema(v)
            except SchemaError as e:
                raise ValueError(f"not a JSON schema: {e.message}") from None
        return v


class EvalCase(Strict):
    name: str = Field(min_length=1, max_length=128)
    prompt: str | None = Field(None, max_length=100_000, description="Sent to /v1/completions.")
    messages: list[Message] | None = Field(
        None, min_length=1, max_length=64, description="Sent to /v1/chat/completions."
    )
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0, le=2)
    params: dict[str, Any] = Field(
        default_factory=dict,
        max_length=32,
        description="More request fields, as the API takes them (stop, response_format, seed, ...).",
    )
    expect: Expect

    @field_validator("params")
    @classmethod
    def _not_the_question(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(v) & _OWN_FIELDS)
        if taken:
            raise ValueError(f"{', '.join(taken)}: given by the case itself, not in params")
        return v

    @model_validator(mode="after")
    def _one_input(self) -> EvalCase:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (completions) or messages (chat)")
        return self


class EvalSet(Strict):
    cases: list[EvalCase] = Field(min_length=1, max_length=MAX_CASES)
    min_pass_rate: float = Field(1.0, ge=0, le=1, description="Share of cases that must pass.")
    timeout_s: float = Field(60.0, gt=0, le=600, description="How long one answer may take.")

    @field_validator("cases")
    @classmethod
    def _unique(cls, cases: list[EvalCase]) -> list[EvalCase]:
        seen: set[str] = set()
        for c in cases:
            if c.name in seen:
                raise ValueError(f"two cases are named `{c.name}`")
            seen.add(c.name)
        return cases


def load_eval_set(path: str | Path) -> EvalSet:
    """The eval set in `path`; EvalError naming the file and the key path otherwise."""
    from serving.config import format_validation_error

    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise EvalError(f"{p}: larger than {MAX_FILE_BYTES >> 20} MiB")
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise EvalError(f"{p}: cannot read: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EvalError(f"{p}: not YAML or JSON: {e}") from None
    if not isinstance(doc, dict):
        raise EvalError(f"{p}: expected a mapping with `cases:`, got {type(doc).__name__}")
    try:
        return EvalSet.model_validate(doc)
    except ValidationError as e:
        raise EvalError(format_validation_error(e, str(p), EvalSet)) from None


def request_for(case: EvalCase, model: str) -> tuple[str, dict]:
    """The (path, body) that asks `model` the case's question."""
    body: dict[str, Any] = {
        **case.params,
        "model": model,
        "max_tokens": case.max_tokens,
        "temperature": case.temperature,
    }
    if case.messages is not None:
        body["messages"] = [m.model_dump() for m in case.messages]
        return "/v1/chat/completions", body
    body["prompt"] = case.prompt
    return "/v1/completions", body


def answer_text(response: Any) -> str:
    """The first choice's text of a chat or completions response; ValueError when it has none."""
    try:
        choice = response["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("the answer has no choices[0] text") from None
    if not isinstance(text, str):
        raise ValueError("the answer's text is not a string")
    return text


def check(expect: Expect, text: str) -> str | None:
    """Why `text` does not meet `expect`, or None when it does."""
    if expect.regex is not None:
        return None if re.search(expect.regex, text) else f"no match for /{expect.regex}/ in {_quote(text)}"
    if expect.exact is not None:
        return None if text.strip() == expect.exact.strip() else f"expected {_quote(expect.exact)}, got {_quote(text)}"
    from jsonschema import Draft202012Validator

    try:
        doc = json.loads(text)
    except ValueError:
        return f"not JSON: {_quote(text)}"
    err = next(iter(Draft202012Validator(expect.json_schema).iter_errors(doc)), None)
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        return f"JSON at {where}: {err.message}"
    return None


@dataclass
class EvalResult:
    total: int
    passed: int
    min_pass_rate: float
    failures: list[dict] = field(default_factory=list)  # {"case", "reason"}
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.passed >= self.min_pass_rate * self.total

    def summary(self) -> str:
        head = (
            f"evaluation: {self.passed} of {self.total} cases passed (needed "
            f"{self.min_pass_rate:.0%}) in {self.seconds:.1f} s"
        )
        shown = "; ".join(f"{f['case']}: {f['reason']}" for f in self.failures[:3])
        more = f" (+{len(self.failures) - 3} more)" if len(self.failures) > 3 else ""
        return head + (f"; failed: {shown}{more}" if shown else "")

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "passed": self.passed,
            "min_pass_rate": self.min_pass_rate,
            "failures": self.failures,
            "seconds": round(self.seconds, 3),
        }


class AskFailed(RuntimeError):
    """The request got no usable answer (HTTP error, timeout); str() says which."""


def run_eval(
    evalset: EvalSet, model: str, ask: Callable[[str, dict, float], Any], clock: Callable[[], float] = time.monotonic
) -> EvalResult:
    """Ask every case in turn (one at a time: the candidate may share its GPUs) and check each."""
    start = clock()
    result = EvalResult(total=len(evalset.cases), passed=0, min_pass_rate=evalset.min_pass_rate)
    for case in evalset.cases:
        path, body = request_for(case, model)
        try:
            reason = check(case.expect, answer_text(ask(path, body, evalset.timeout_s)))
        except (AskFailed, ValueError) as e:
            reason = str(e)
        if reason is None:
            result.passed += 1
        else:
            result.failures.append({"case": case.name, "reason": reason})
    result.seconds = clock() - start
    return result


def _quote(text: str) -> str:
    return json.dumps(text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "...")
