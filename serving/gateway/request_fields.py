"""The fields of a request body that Keel itself reads, typed as the engine types them, and
what they ask the engine to run: prompts, choices and output tokens, the base of a token
reservation and of the context check.

vLLM's request models (pydantic, lax mode) run `"n": "20"`, `20.0` and `true` as integers. The
quota must count what the engine will run, so the fields Keel reads are validated by the same
library with the same types (vLLM 0.32, entrypoints/openai/*/protocol.py), and a value that lax
mode converted is written back in its canonical form: from then on the gateway and the engine
read the same value. What the engine would refuse is a 400 here, naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import Required, TypedDict

from serving.errors import GatewayError

INT64_MAX = 2**63 - 1  # the engine's integer range: larger counts are refused there too
COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) max_tokens for /v1/completions
FALLBACK_CONTEXT = 4096  # the context assumed for a model whose max_model_len the config leaves out

Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
# vLLM also wants ids >= 0, and says so itself; checked here it would triple the cost of a long
# token-id prompt (2.7 ms for 64k ids instead of 0.9), for counts that need only its length.
TokenId = int


class _StreamOptions(TypedDict, total=False):
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    include_usage: bool | None
    continuous_usage_stats: bool | None


class _Message(TypedDict, total=False):
    role: Required[str]
    content: str | list[str | dict[str, Any]] | None


class _Common(TypedDict, total=False):
    model: str | None
    n: Annotated[int, Field(ge=1, le=INT64_MAX)] | None
    max_tokens: Count | None
    stream: bool | None
    stream_options: _StreamOptions | None
    user: str | None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None
    add_special_tokens: bool


class _Chat(_Common, total=False):
    messages: Required[list[_Message]]
    max_completion_tokens: Count | None
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template_kwargs: dict[str, Any] | None
    tools: list[dict[str, Any]] | None


class _Completion(_Common, total=False):
    prompt: list[TokenId] | list[list[TokenId]] | str | list[str] | None
    prompt_embeds: str | list[str] | None  # base64 tensors, as JSON strings


# Fields whose validated value may be written back (the others are containers pydantic copies
# without the keys it does not know; nothing in them is converted).
_CANONICAL = (frozenset(_Completion.__annotations__) | frozenset(_Chat.__annotations__)) - {
    "messages",
    "chat_template_kwargs",
    "tools",
    "prompt_embeds",
}

# What a field of several accepted shapes must be, by path (`*`: any index); pydantic names
# each shape's failure, which reads worse than one sentence.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids (integers) or a list of such lists",
    "prompt_embeds": "a base64 string or a list of them",
    "messages.*.content": "a string, a list of content parts or null",
    "messages.*.content.*": "a content part: an object (or a string)",
}


@dataclass(frozen=True)
class Generation:
    """What a request asks the engine to run, as the engine reads it."""

    prompts: int = 1  # prompts the engine runs: text, token ids and embeddings alike
    embeds: int = 0  # of which prompt_embeds, whose length the gateway cannot count
    n: int = 1  # choices per prompt
    max_output: int | None = None  # tokens per choice asked for; None: until the context ends
    output_param: str = "max_tokens"  # the field max_output came from
    truncate: int | None = None  # truncate_prompt_tokens (-1: to what the context leaves)

    def reservation(self, counts: list[int] | None, limit: int | None) -> tuple[int, int]:
        """(prompt, output) tokens the request may use at most: each prompt the engine runs (its
        `counts`, when counted), and for each n choices of what it may generate (max_output, or
        what the context `limit` leaves)."""
        if counts is not None:
            counts = self.prompt_lengths(counts, limit)
        else:  # not counted (no token limit needs it): prompts count 0, their outputs still count
            counts = [0] * (self.prompts - self.embeds)
        prompt = sum(counts)
        output = sum(self._choice_cap(p, limit) for p in counts)
        if self.embeds:
            # An embeddings prompt's length is unknown here: charged as long as the context allows
            # next to its output, the most such a prompt can cost.
            cap = self._choice_cap(0, limit)
            output += self.embeds * cap
            if limit is not None:
                prompt += self.embeds * max(0, limit - cap)
        return prompt, self.n * output

    def context_error(self, counts: list[int] | None, limit: int | None, field: str) -> GatewayError | None:
        """The 400 the engine answers for the request's length, as vLLM and OpenAI word it:
        output asked beyond the context, or a counted prompt (in `field`) that leaves no room for it."""
        if limit is None:
            return None
        out = self.max_output
        if out is not None and out > limit:
            return GatewayError(
                400,
                f"`{self.output_param}` is {out}, more than this model's context "
                f"length of {limit} tokens. Please request fewer output tokens.",
                code="context_length_exceeded",
                param=self.output_param,
            )
        for prompt in self.prompt_lengths(counts or [], limit):
            if prompt + (out or 0) > limit:
                return GatewayError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{prompt + (out or 0)} tokens ({prompt} in the {field}, {out or 0} for the completion). "
                    f"Please reduce the length of the {field} or of the completion.",
                    code="context_length_exceeded",
                    param=field,
                )
        return None

    def prompt_lengths(self, counts: list[int], limit: int | None) -> list[int]:
        """The prompts as the engine keeps them (counts already hold truncate_prompt_tokens >= 0)."""
        if self.truncate == -1 and limit is not None:  # vLLM keeps what the context leaves the output
            room = limit - (self.max_output or 0)
            return [min(c, room) for c in counts]
        return counts

    def _choice_cap(self, prompt: int, limit: int | None) -> int:
        if self.max_output is None:
            return max(0, (limit if limit is not None else FALLBACK_CONTEXT) - prompt)
        asked = max(self.max_output, 1)  # 0 is refused by the engine, or runs one step (echo)
        return max(0, min(asked, limit - prompt)) if limit is not None else asked


class _Endpoint:
    def __init__(self, schema: type, chat: bool):
        self.adapter: TypeAdapter[Any] = TypeAdapter(schema)
        self.chat = chat

    def check(self, payload: dict) -> bool:
        """Validate; write back what lax mode converted. True when the payload changed."""
        try:
            self.adapter.validate_python(payload, strict=True)  # canonical already: the usual case
            return False
        except ValidationError:
            pass
        try:
            canonical = self.adapter.validate_python(payload)
        except ValidationError as e:
            raise _field_error(payload, e) from None
        changed = False
        for key, value in canonical.items():
            if key in _CANONICAL and not _identical(payload[key], value):
                payload[key] = value
                changed = True
        return changed

    def generation(self, p: dict) -> Generation:
        n = p.get("n") or 1
        truncate = p.get("truncate_prompt_tokens")
        if self.chat:
            mct = p.get("max_completion_tokens")
            if mct is not None:
                return Generation(1, 0, n, mct, "max_completion_tokens", truncate)
            return Generation(1, 0, n, p.get("max_tokens"), "max_tokens", truncate)
        embeds = p.get("prompt_embeds")
        embeds = 0 if embeds is None else 1 if isinstance(embeds, str) else len(embeds)
        max_tokens = p.get("max_tokens")
        if max_tokens is None:
            max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
        return Generation(prompt_count(p.get("prompt")) + embeds, embeds, n, max_tokens, "max_tokens", truncate)


def prompt_count(prompt: Any) -> int:
    """Prompts in a (validated) completions `prompt`, as vLLM's prompt_to_seq splits it."""
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        return 1
    if prompt and all(type(t) is int for t in prompt):  # one prompt of token ids
        return 1
    return len(prompt)


_ENDPOINTS = {
    "/v1/chat/completions": _Endpoint(_Chat, chat=True),
    "/v1/completions": _Endpoint(_Completion, chat=False),
}


def check_fields(path: str, payload: dict) -> tuple[Generation, bool]:
    """(what the request asks the engine to run, whether the payload was rewritten); a field
    the engine would refuse, or read otherwise than Keel, is a GatewayError 400 naming it."""
    endpoint = _ENDPOINTS.get(path)
    if endpoint is None:
        return Generation(), False
    changed = endpoint.check(payload)
    return endpoint.generation(payload), changed


def _identical(a: Any, b: Any) -> bool:
    """Equal and of the same JSON types all the way down (True == 1 and 1.0 == 1 in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return a == b


def _field_error(payload: dict, e: ValidationError) -> GatewayError:
    """The 400 for the deepest failure pydantic found, named by its path in the body."""
    errors = e.errors(include_url=False)
    located = [(_input_path(payload, err), err) for err in errors]
    path, err = max(located, key=lambda pe: pe[0].count("."))
    if err["type"] == "missing":
        return GatewayError(400, f"`{path}` is required.", param=path)
    parts = path.split(".")
    for end in range(len(parts), 0, -1):  # the path itself, else the nearest field above it
        pattern = ".".join("*" if p.isdigit() else p for p in parts[:end])
        if pattern in _EXPECTED:
            path = ".".join(parts[:end])
            message = f"`{path}` must be {_EXPECTED[pattern]}"
            break
    else:
        message = f"`{path}`: {err['msg']}"
    got = repr(_at(payload, path))
    if len(got) > 40:
        got = got[:37] + "..."
    return GatewayError(400, f"{message} (got {got}).", param=path)


def _input_path(payload: dict, err: Mapping[str, Any]) -> str:  # one of ValidationError.errors()
    """pydantic's error location as a path in the body (`messages.0.role`), without the names it
    gives the members of a union."""
    loc = err["loc"]
    missing = err["type"] == "missing"
    node: Any = payload
    parts = []
    for part in loc[:-1] if missing else loc:
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and 0 <= part < len(node)
        ):
            node = node[part]
        else:
            continue  # a union member's name
        parts.append(str(part))
    if missing:
        parts.append(str(loc[-1]))
    return ".".join(parts)


def _at(payload: dict, path: str) -> Any:
    node: Any = payload
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
