"""Which fields of a request put text in front of the model, and which fields of a response show
text to the client: one spec per endpoint, read by the guardrail stages and the response
inspector. A field vLLM adds is one line here.

The reference is vLLM 0.32 (no text field changed since 0.29): the request models
(entrypoints/openai/*/protocol.py) and what renderers/chat_utils.py (entrypoints/ in 0.29)
hands the chat template (_parse_chat_message_content*): every role (custom roles too), the
text of `text`, `input_text`, `output_text`, `refusal` and `thinking` parts, a `tool_reference`
part's name, a part's unknown fields (kept for templates that read
parts), `name`, `reasoning` (and its old name `reasoning_content`), assistant tool calls,
`tool_call_id`, `task`, a developer message's `tools`, the request's `tools`, `documents`,
`chat_template` and `chat_template_kwargs`; on /v1/completions the prompt (text, token ids, or
lists of either) and `suffix`. Media parts (images, audio, video) are not text and are not
scanned; prompt embeddings cannot be scanned and are refused where input rules apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serving.errors import GatewayError

# How a field's value is read:
TEXT = "text"  # a string
ROLE = "role"  # a string; the standard roles are not scanned (they are the template's own words)
PART = "part"  # a content part: a string, or an object whose text keys depend on its type
JSON = "json"  # any JSON value: every string in it, and every object key
PROMPT = "prompt"  # a completion prompt: text, token ids, or a list of either
OPAQUE = "opaque"  # cannot be read as text (embeddings): refused where input rules apply

STANDARD_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})

# The keys that hold a content part's text (vLLM's MM_PARSER_MAP: text, input_text and
# output_text parts in `text`, refusal, thinking, a tool_reference's `name`). They are read
# whatever the part's `type` says: without a type, or with a `uuid`, vLLM goes by the keys.
PART_TEXTS = frozenset({"text", "refusal", "thinking", "name"})
OPAQUE_PARTS = frozenset({"prompt_embeds"})  # as a type or as a key
# Keys of content parts that vLLM reads itself (vLLM's _KNOWN_CONTENT_PART_FIELDS); any other
# key of a part goes to the template as it is, so it is scanned as text.
PART_KNOWN_KEYS = frozenset(
    {
        "audio_embeds",
        "audio_url",
        "closed",
        "data",
        "file",
        "image_embeds",
        "image_pil",
        "image_url",
        "input_audio",
        "name",
        "prompt_cache_breakpoint",
        "refusal",
        "text",
        "thinking",
        "type",
        "uuid",
        "video_embeds",
        "video_url",
    }
)


@dataclass(frozen=True)
class Endpoint:
    """What one endpoint's request gives the model and its response shows the client."""

    request: tuple[tuple[str, str], ...]  # (path, kind); `name[]` walks a list
    choice_texts: tuple[str, ...]  # text keys of a choice's delta/message (chat) or the choice
    call_texts: tuple[str, ...]  # text keys of each tool call's function (chat)
    whole_texts: tuple[str, ...]  # of those, the ones sent whole (a name): checked alone, never held
    # Options that make the engine show text the output guardrails cannot see (token ids, the
    # rendered prompt, prompt logprobs): refused for tenants with output rules.
    unscanned_output_options: tuple[str, ...]
    tree: dict = field(init=False, repr=False, compare=False)  # request paths as a tree: walked once
    text_keys: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "tree", _path_tree(self.request))
        object.__setattr__(self, "text_keys", frozenset(self.choice_texts))


def _path_tree(paths: tuple[tuple[str, str], ...]) -> dict:
    """key -> [(walks a list, kind or subtree)]: the paths that share a prefix share a node."""
    tree: dict = {}
    for path, kind in paths:
        node = tree
        segments = path.split(".")
        for i, seg in enumerate(segments):
            many = seg.endswith("[]")
            entries = node.setdefault(seg[:-2] if many else seg, [])
            if i == len(segments) - 1:
                entries.append((many, kind))
                break
            sub = next((then for m, then in entries if m == many and isinstance(then, dict)), None)
            if sub is None:
                sub = {}
                entries.append((many, sub))
            node = sub
    return tree


CHAT = Endpoint(
    request=(
        ("messages[].role", ROLE),
        ("messages[].content", TEXT),
        ("messages[].content[]", PART),
        ("messages[].name", TEXT),
        ("messages[].reasoning", TEXT),
        ("messages[].reasoning_content", TEXT),  # vLLM renames it `reasoning`
        ("messages[].tool_calls[].function.name", TEXT),
        ("messages[].tool_calls[].function.arguments", JSON),  # a JSON string or an object
        ("messages[].tool_call_id", TEXT),
        ("messages[].task", TEXT),
        ("messages[].tools", JSON),  # a developer message's tools
        ("tools[].function", JSON),  # name, description, parameters (a JSON schema: keys too)
        ("documents", JSON),
        ("chat_template", TEXT),  # vLLM refuses it unless --trust-request-chat-template
        ("chat_template_kwargs", JSON),
    ),
    choice_texts=("content", "refusal", "reasoning", "reasoning_content"),
    call_texts=("arguments", "name"),
    whole_texts=("name",),
    unscanned_output_options=(
        "return_token_ids",
        "return_tokens_as_token_ids",
        "prompt_logprobs",
        "return_prompt_text",
    ),
)

COMPLETIONS = Endpoint(
    request=(
        ("prompt", PROMPT),
        ("suffix", TEXT),  # vLLM refuses it today; a model that takes it puts it in the prompt
        ("prompt_embeds", OPAQUE),
    ),
    choice_texts=("text",),
    call_texts=(),
    whole_texts=(),
    unscanned_output_options=("return_token_ids", "return_tokens_as_token_ids", "prompt_logprobs"),
)


def endpoint_for(path: str) -> Endpoint | None:
    endpoint = path.split("?", 1)[0].rstrip("/")
    if endpoint.endswith("/chat/completions"):
        return CHAT
    if endpoint.endswith("/completions"):
        return COMPLETIONS
    return None


# -- request side ------------------------------------------------------------------------------

Slot = tuple[Callable[[], str], Callable[[str], None]]  # (get, put) of one text


class Unscannable(Exception):
    """A field the input guardrails cannot read. `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


def request_slots(endpoint: Endpoint, payload: dict, tokenizer: Any = None) -> list[Slot]:
    """(get, put) for every text of the request the model will be given, in order. Token-id
    prompts are decoded with `tokenizer` (and put back encoded); raises Unscannable for a field
    that cannot be read (token ids and no tokenizer, embeddings, ids that are not token ids)."""
    slots: list[Slot] = []
    _visit(endpoint.tree, payload, (), slots, tokenizer)
    return slots


def _visit(tree: dict, obj: dict, where: tuple, slots: list, tokenizer) -> None:
    for key in list(obj):
        entries = tree.get(key)
        if entries is None:
            continue
        value = obj[key]
        for many, then in entries:
            if not many:
                _apply(then, obj, key, where + (key,), slots, tokenizer)
            elif isinstance(value, list):
                for i in range(len(value)):
                    _apply(then, value, i, where + (key, i), slots, tokenizer)


def _apply(then, holder, key, where: tuple, slots: list, tokenizer) -> None:
    if isinstance(then, dict):
        if isinstance(holder[key], dict):
            _visit(then, holder[key], where, slots, tokenizer)
    else:
        _READERS[then](holder, key, where, slots, tokenizer)


def _param(where: tuple) -> str:
    """The field's name in an error: messages[0].content[1].type."""
    out = ""
    for w in where:
        out += f"[{w}]" if isinstance(w, int) else (f".{w}" if out else w)
    return out


def _text(holder, key, where, slots, tokenizer) -> None:
    if isinstance(holder[key], str):
        slots.append(_slot(holder, key))


def _role(holder, key, where, slots, tokenizer) -> None:
    role = holder[key]
    if isinstance(role, str) and role not in STANDARD_ROLES:
        slots.append(_slot(holder, key))


def _part(holder, key, where, slots, tokenizer) -> None:
    part = holder[key]
    if isinstance(part, str):
        slots.append(_slot(holder, key))
        return
    if not isinstance(part, dict):
        return
    kind = part.get("type")  # any JSON value: a list or an object is no part type, not a crash
    if (isinstance(kind, str) and kind in OPAQUE_PARTS) or not OPAQUE_PARTS.isdisjoint(part):
        param = _param(where)
        raise Unscannable(
            f"{param}.type", f"`{param}` is a prompt_embeds part, which the input guardrails cannot read; send text."
        )
    for k in list(part):
        if k in PART_TEXTS:
            if isinstance(part[k], str):
                slots.append(_slot(part, k))
        elif k not in PART_KNOWN_KEYS:  # passed to the template as it is
            _json(part, k, where, slots, tokenizer)


def _json(holder, key, where, slots, tokenizer) -> None:
    value = holder[key]
    if isinstance(value, str):
        slots.append(_slot(holder, key))
        return
    stack = [value]
    while stack:  # iterative: a deep value cannot exhaust the stack
        node = stack.pop()
        if isinstance(node, dict):
            for k in list(node):
                v = node[k]
                if isinstance(v, str):
                    slots.append(_slot(node, k))  # before the key's slot, which may rename it
                elif isinstance(v, (dict, list)):
                    stack.append(v)
                slots.append(_key_slot(node, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, str):
                    slots.append(_slot(node, i))
                elif isinstance(v, (dict, list)):
                    stack.append(v)


def _prompt(holder, key, where, slots, tokenizer) -> None:
    prompt = holder[key]
    if isinstance(prompt, str):
        slots.append(_slot(holder, key))
        return
    if not isinstance(prompt, list) or not prompt:
        return
    if all(isinstance(p, str) for p in prompt):  # a batch of texts
        slots += [_slot(prompt, i) for i in range(len(prompt))]
        return
    if any(isinstance(p, list) for p in prompt):  # a batch: texts or token-id lists
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                slots.append(_slot(prompt, i))
            else:
                slots.append(_token_slot(prompt, i, where + (i,), tokenizer))
        return
    slots.append(_token_slot(holder, key, where, tokenizer))


def _opaque(holder, key, where, slots, tokenizer) -> None:
    if holder[key] is not None:
        param = _param(where)
        raise Unscannable(param, f"`{param}` cannot be read by the input guardrails; send the prompt as text.")


_READERS = {TEXT: _text, ROLE: _role, PART: _part, JSON: _json, PROMPT: _prompt, OPAQUE: _opaque}


def _slot(holder, key) -> Slot:
    def put(v: str) -> None:
        holder[key] = v

    return (lambda: holder[key]), put


def _key_slot(obj: dict, key: str) -> Slot:
    """An object key is text the template may print too; a changed key renames it."""

    def put(v: str) -> None:
        obj[v] = obj.pop(key)

    return (lambda: key), put


def _token_slot(holder, key, where: tuple, tokenizer) -> Slot:
    """A token-id prompt as the text the model sees (decoded with special tokens kept); a
    changed text is encoded back into ids."""
    param = _param(where)
    if tokenizer is None:
        raise Unscannable(
            param,
            f"`{param}` is token ids, which this model's input guardrails "
            "cannot read (no tokenizer for it in the gateway); send the prompt as text.",
        )
    ids = _token_ids(holder[key], param)
    try:
        text = tokenizer.decode(ids, skip_special_tokens=False)
    except (OverflowError, TypeError, ValueError):
        raise Unscannable(param, f"`{param}` holds a value that is not a token id.") from None

    def put(v: str) -> None:
        holder[key] = tokenizer.encode(v, add_special_tokens=False).ids

    return (lambda: text), put


def _token_ids(value: Any, param: str) -> list[int]:
    """The ids vLLM reads from a list (its pydantic model takes integral floats, booleans and
    numeric strings as ints, so those are ids too)."""
    if not isinstance(value, list):
        raise Unscannable(param, f"`{param}` must be a string, a list of strings or a list of token ids.")
    ids = []
    for v in value:
        if (
            isinstance(v, (bool, int))
            or isinstance(v, float)
            and v.is_integer()
            or isinstance(v, str)
            and v.strip().lstrip("+-").isdigit()
        ):
            ids.append(int(v))
        else:
            raise Unscannable(param, f"`{param}` mixes token ids with other values.")
    return ids


def unscannable_error(e: Unscannable) -> GatewayError:
    return GatewayError(400, e.message, code="unscannable_input", param=e.param)


# -- response side -----------------------------------------------------------------------------

# A response text field of a choice: "content", ..., or ("tool_calls", index, "arguments").
FieldName = Any


def choice_texts(endpoint: Endpoint, choice: dict, holder_key: str | None) -> list[tuple[dict, str, FieldName]]:
    """(holder, key, field name) for every text in a choice: holder[key] is the text.
    holder_key: "delta" (a chat stream), "message" (a chat response), None (completions)."""
    holder = choice.get(holder_key) if holder_key else choice
    if not isinstance(holder, dict):
        return []
    texts = endpoint.text_keys
    out = [(holder, k, k) for k, v in holder.items() if k in texts and isinstance(v, str)]
    if endpoint.call_texts and ("tool_calls" in holder or "function_call" in holder):
        calls = holder.get("tool_calls")
        if isinstance(calls, list):
            for pos, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    index = call.get("index", pos)
                    out += [
                        (fn, k, ("tool_calls", index, k)) for k in endpoint.call_texts if isinstance(fn.get(k), str)
                    ]
        fn = holder.get("function_call")  # the deprecated single call
        if isinstance(fn, dict):
            out += [(fn, k, ("function_call", k)) for k in endpoint.call_texts if isinstance(fn.get(k), str)]
    return out


def put_text(choice: dict, holder_key: str | None, name: FieldName, text: str) -> None:
    """Set a choice's text field, making the objects on the way (released held text at the end)."""
    holder = choice.setdefault(holder_key, {}) if holder_key else choice
    if isinstance(name, str):
        holder[name] = text
    elif name[0] == "tool_calls":
        calls = holder.setdefault("tool_calls", [])
        call = next((c for c in calls if c.get("index") == name[1]), None)
        if call is None:
            call = {"index": name[1], "function": {}}
            calls.append(call)
        call.setdefault("function", {})[name[2]] = text
    else:
        holder.setdefault("function_call", {})[name[1]] = text


def unscanned_options(endpoint: Endpoint, payload: dict) -> list[str]:
    return [o for o in endpoint.unscanned_output_options if payload.get(o) not in (None, False)]
