"""The fields of a request body that Keel itself reads, typed as the engine types them.

vLLM's request models (pydantic, lax mode) run `"n": "20"`, `20.0` and `true` as integers. The
quota must count what the engine will run, so the fields Keel reads are validated by the same
library with the same types (vLLM 0.29, entrypoints/openai/*/protocol.py), and a value that lax
mode converted is written back in its canonical form: from then on the gateway and the engine
read the same value. What the engine would refuse is a 400 here, naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import Required, TypedDict

from serving.errors import GatewayError

INT64_MAX = 2**63 - 1  # the engine's integer range: larger counts are refused there too

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
_CANONICAL = (frozenset(_Completion.__annotations__) | frozenset(_Chat.__annotations__)) \
    - {"messages", "chat_template_kwargs", "tools", "prompt_embeds"}

# What a field of several accepted shapes must be, by path (`*`: any index); pydantic names
# each shape's failure, which reads worse than one sentence.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids (integers) or a list of such lists",
    "prompt_embeds": "a base64 string or a list of them",
    "messages.*.content": "a string, a list of content parts or null",
    "messages.*.content.*": "a content part: an object (or a string)",
}


class _Endpoint:
    def __init__(self, schema: type, chat: bool):
        self.adapter = TypeAdapter(schema)
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


_ENDPOINTS = {
    "/v1/chat/completions": _Endpoint(_Chat, chat=True),
    "/v1/completions": _Endpoint(_Completion, chat=False),
}


def check_fields(path: str, payload: dict) -> bool:
    """Whether the payload was rewritten (a lax spelling made canonical); a field the engine
    would refuse is a GatewayError 400 naming it."""
    endpoint = _ENDPOINTS.get(path)
    return endpoint.check(payload) if endpoint is not None else False


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


def _input_path(payload: dict, err: dict) -> str:
    """pydantic's error location as a path in the body (`messages.0.role`), without the names it
    gives the members of a union."""
    loc = err["loc"]
    missing = err["type"] == "missing"
    node: Any = payload
    parts = []
    for part in loc[:-1] if missing else loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
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
