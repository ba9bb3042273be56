"""The response inspector's contract: whatever the engine's bytes look like, what the client, the
quota and the audit get agrees with a full JSON parse of those bytes.

Shared by the unit tests (made-up streams) and the e2e contract test (the real engine's bytes).
The reference side parses with the standard library's json and reads SSE as the spec says, so it
shares no code with serving/gateway/inspect.py.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from serving.gateway.guard import OutputGuardWatch
from serving.gateway.inspect import StreamInspector, inspect_json
from serving.gateway.stages import RequestContext
from serving.policy.config import GuardrailPolicy
from serving.policy.guardrails import OutputGuard

MODES = ("usage only", "audit text", "redact and audit")


@dataclass
class View:
    """What a response shows, read with a full parse."""

    fields: dict = field(default_factory=dict)  # (choice, field name) -> its text, joined
    primary: list = field(default_factory=list)  # the main text's pieces, in order
    finish: dict = field(default_factory=dict)  # choice -> finish_reason
    tokens: dict = field(default_factory=dict)  # choice -> logprob tokens shown
    usage: dict | None = None  # a stream: its usage chunk's
    usage_events: int = 0  # a stream: events with no choices and a usage

    def texts(self) -> dict:
        return {k: v for k, v in self.fields.items() if v}


def sse_events(body: bytes) -> list:
    """The data of each event, as the SSE spec reads it; json-parsed where it is JSON."""
    out = []
    for ev in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln for ln in ev.split(b"\n") if ln.startswith(b"data:")]
        if not lines:
            continue
        data = b"\n".join(ln[6:] if ln.startswith(b"data: ") else ln[5:] for ln in lines)
        try:
            out.append(json.loads(data))
        except ValueError:
            out.append(data)
    return out


def view(body: bytes, chat: bool, stream: bool) -> View:
    v = View()
    objs = [e for e in sse_events(body) if isinstance(e, dict)] if stream else [json.loads(body)]
    holder_key = ("delta" if stream else "message") if chat else None
    primary = "content" if chat else "text"
    for obj in objs:
        choices = obj.get("choices") or []
        if not choices and isinstance(obj.get("usage"), dict):
            v.usage = obj["usage"]
            v.usage_events += 1
        if not stream:
            v.usage = obj.get("usage")
        for c in choices:
            idx = c.get("index", 0)
            if c.get("finish_reason") is not None:
                v.finish[idx] = c["finish_reason"]
            holder = c.get(holder_key) if holder_key else c
            for name, text in _texts(holder or {}, chat):
                v.fields[(idx, name)] = v.fields.get((idx, name), "") + text
                if name == primary:
                    v.primary.append(text)
            lp = c.get("logprobs")
            if isinstance(lp, dict):
                entries = (lp.get("content") or []) + (lp.get("refusal") or []) if chat else lp.get("tokens") or []
                v.tokens.setdefault(idx, []).extend(e["token"] if chat else e for e in entries)
    return v


def _texts(holder: dict, chat: bool):
    if not chat:
        if isinstance(holder.get("text"), str):
            yield "text", holder["text"]
        return
    for key in ("content", "refusal", "reasoning", "reasoning_content"):
        if isinstance(holder.get(key), str):
            yield key, holder[key]
    for pos, call in enumerate(holder.get("tool_calls") or []):
        fn = call.get("function") or {}
        for key in ("arguments", "name"):
            if isinstance(fn.get(key), str):
                yield ("tool_calls", call.get("index", pos), key), fn[key]


# -- the same response in other layouts ----------------------------------------------------------


def _escaped(value) -> str:
    """JSON with every character of every string value written as an escape (keys kept)."""
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else json.dumps(c)[1:-1] for c in value) + '"'
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + _escaped(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_escaped, value)) + "]"
    return json.dumps(value)


def _reversed(value):
    if isinstance(value, dict):
        return {k: _reversed(value[k]) for k in reversed(value)}
    if isinstance(value, list):
        return [_reversed(v) for v in value]
    return value


LAYOUTS = {
    "spaced": lambda o: json.dumps(o, ensure_ascii=False),
    "keys reversed": lambda o: json.dumps(_reversed(o), ensure_ascii=False, separators=(",", ":")),
    "non-ASCII escaped": lambda o: json.dumps(o, separators=(",", ":")),
    "every character escaped": _escaped,
    "extra fields": lambda o: json.dumps(_extra(o), separators=(",", ":")),
}
SSE_LAYOUTS = ("no space after data:", "pretty-printed over several data lines", "lines ending in CR LF")


def _extra(value):
    """Fields a newer engine might add, at every level."""
    if isinstance(value, dict):
        return {"x_new": {"content": "x", "text": "x", "usage": None}, **{k: _extra(v) for k, v in value.items()}}
    if isinstance(value, list):
        return [_extra(v) for v in value]
    return value


def relayout(body: bytes, stream: bool, layout: str) -> bytes:
    """The same JSON values in another layout."""
    if not stream:
        return LAYOUTS[layout](json.loads(body)).encode()
    out = []
    for ev in sse_events(body):
        if not isinstance(ev, (dict, list)):
            out.append(b"data: " + ev + (b"\r\n\r\n" if layout == "lines ending in CR LF" else b"\n\n"))
        elif layout == "no space after data:":
            out.append(b"data:" + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n")
        elif layout == "lines ending in CR LF":
            out.append(b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\r\n\r\n")
        elif layout == "pretty-printed over several data lines":
            lines = json.dumps(ev, indent=1, ensure_ascii=False).encode().split(b"\n")
            out.append(b"".join(b"data: " + ln + b"\n" for ln in lines) + b"\n")
        else:
            out.append(b"data: " + LAYOUTS[layout](ev).encode() + b"\n\n")
    return b"".join(out)


def layouts(stream: bool) -> tuple:
    return tuple(LAYOUTS) + (SSE_LAYOUTS if stream else ())


# -- the inspector against the parse ---------------------------------------------------------------


def output_guard(rules: list[dict]) -> OutputGuard:
    return OutputGuard(GuardrailPolicy.model_validate({"output": rules}).output)


def whole(guard: OutputGuard, name, text: str) -> str:
    """What the rules make of a field's whole text, checked at once."""
    return OutputGuardWatch(guard, []).field(0, name).last(text)


def splits(body: bytes, stream: bool, bytewise: bool = False) -> dict[str, list[bytes]]:
    if not stream:
        return {"whole body": [body]}
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(body)), min(40, len(body) - 1)))
    out = {
        "whole body": [body],
        "one event a piece": [e for e in re.split(rb"(?<=\n\n)|(?<=\r\n\r\n)", body) if e],
        "random pieces": [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])],
    }
    if bytewise:
        out["one byte a piece"] = [body[i : i + 1] for i in range(len(body))]
    return out


def inspect(
    body, pieces, chat, stream, payload, mode, guard, wants_usage=False, shortcuts=True
) -> tuple[bytes, RequestContext]:
    ctx = RequestContext("r", "POST", "/v1/chat/completions" if chat else "/v1/completions", {}, b"")
    ctx.payload = payload
    ctx.client_wants_usage = wants_usage
    ctx.keep_text = mode != "usage only"
    if mode == "redact and audit":
        ctx.watches = [OutputGuardWatch(guard, ctx.guardrail_actions)]
    if not stream:
        return inspect_json(ctx, body, chat), ctx
    inspector = StreamInspector(ctx, chat, shortcuts)
    return b"".join([inspector.feed(p) for p in pieces] + [inspector.finish()]), ctx


def check(
    body: bytes, chat: bool, stream: bool, payload: dict, guard: OutputGuard, bytewise: bool = False
) -> tuple[View, dict]:
    """body through the inspector in every mode and cut (bytewise: one byte a piece too), against
    a full parse of it. Returns the parse and what the rules make of each of its fields."""
    ref = view(body, chat, stream)
    primary = "content" if chat else "text"
    redacted = {k: whole(guard, k[1], v) for k, v in ref.fields.items()}
    cuts = splits(body, stream, bytewise)
    for mode, cut, wants_usage, shortcuts in itertools.product(
        MODES,
        cuts,
        (False, True) if stream else (True,),
        (True, False) if stream else (True,),
    ):
        pieces = cuts[cut]
        where = f"{mode}, {cut}, client {'asks for' if wants_usage else 'does not ask for'} usage"
        where += "" if shortcuts else ", every event parsed"
        out, ctx = inspect(body, pieces, chat, stream, payload, mode, guard, wants_usage, shortcuts)
        seen = view(out, chat, stream)
        assert ctx.usage == ref.usage, where
        if stream:
            assert seen.usage_events == (ref.usage_events if wants_usage else 0), where
            assert out.rstrip().endswith(b"[DONE]") == body.rstrip().endswith(b"[DONE]"), where
        assert seen.finish == ref.finish, where
        if mode != "redact and audit":
            assert seen.texts() == ref.texts(), where
            assert seen.tokens == ref.tokens, where
            if mode == "audit text":
                assert "".join(ctx.response_text) == "".join(ref.primary), where
            continue
        assert seen.texts() == {k: v for k, v in redacted.items() if v}, where
        assert Counter("".join(ctx.response_text)) == Counter(
            "".join(v for k, v in redacted.items() if k[1] == primary)
        ), where
        for (idx, name), text in redacted.items():
            if name != primary and text:
                label = f"{idx}." + (".".join(map(str, name)) if isinstance(name, tuple) else name)
                assert "".join(ctx.response_fields.get(label, [])) == text, where
        for idx, tokens in ref.tokens.items():
            shown = seen.tokens.get(idx, [])
            assert shown == tokens[: len(shown)], where  # in order, none made up
            choice_clean = all(redacted[k] == v for k, v in ref.fields.items() if k[0] == idx)
            if choice_clean and whole(guard, "tokens", "".join(tokens)) == "".join(tokens):
                assert shown == tokens, where
            else:  # nothing a rule would change is shown in them
                assert whole(guard, "tokens", "".join(shown)) == "".join(shown), where
    return ref, redacted
