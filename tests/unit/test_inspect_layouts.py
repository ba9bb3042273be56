"""The inspector reads what the engine sent, not where vLLM happens to put it: the same responses
in other layouts (key order, spacing, escapes, extra fields, SSE data lines) give the client,
the quota and the audit the same text, usage and redactions as a full JSON parse."""

from __future__ import annotations

import orjson
import pytest

from tests.inspect_contract import check, layouts, output_guard, relayout, view

GUARD = output_guard([{"type": "pii", "entities": ["email"], "action": "redact"}])
BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1764000000, "model": "demo"}
USAGE = {"prompt_tokens": 7, "total_tokens": 19, "completion_tokens": 12}


def _sse(*objs) -> bytes:
    return b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


def _chat_lp(token: str) -> dict:
    top = [{"token": t, "logprob": -1.0, "bytes": list(t.encode())} for t in (token, "x")]
    return {"content": [{"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": top}]}


def _chat_chunk(idx: int, delta: dict, finish=None, lp=None) -> dict:
    choice = {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": finish}
    if finish:
        choice["stop_reason"] = None
    return {**BASE, "choices": [choice]}


CHAT_TOKENS = [
    ["Mail", " jane", ".doe", "@", "example", ".com", ' "now"', "\n\u00e9t\u00e9 \U0001f600", "."],
    ["All", " fine", ", \\ ", "tab\t", "</script>"],
]
CHAT_N2 = _sse(
    *(_chat_chunk(i, {"role": "assistant", "content": ""}) for i in (0, 1)),
    *(
        _chat_chunk(i, {"content": tokens[k]}, lp=_chat_lp(tokens[k]))
        for k in range(max(map(len, CHAT_TOKENS)))
        for i, tokens in enumerate(CHAT_TOKENS)
        if k < len(tokens)
    ),
    *(_chat_chunk(i, {"content": ""}, finish="length") for i in (0, 1)),
    {**BASE, "choices": [], "usage": USAGE},
)

ARGS = ['{"to', '": "', "bob", "@", "example", ".org", '", "re": "d\u00e9j\u00e0 vu"}']
CHAT_TOOLS = _sse(
    _chat_chunk(0, {"role": "assistant", "content": ""}),
    _chat_chunk(
        0,
        {"tool_calls": [{"id": "chatcmpl-tool-1", "type": "function", "index": 0, "function": {"name": "send_mail"}}]},
    ),
    *(_chat_chunk(0, {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}) for a in ARGS),
    _chat_chunk(0, {"content": ""}, finish="tool_calls"),
    {**BASE, "choices": [], "usage": USAGE},
)


def _cmpl_chunk(idx: int, text: str, offset: int, finish=None) -> dict:
    lp = {"text_offset": [offset], "token_logprobs": [-0.5], "tokens": [text], "top_logprobs": [{text: -0.5, "x": -1}]}
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1764000000,
        "model": "demo",
        "choices": [{"index": idx, "text": text, "logprobs": lp, "finish_reason": finish, "stop_reason": None}],
    }


# "": a token that is part of a character (its text comes with the next one), logprobs and all
CMPL_TOKENS = [["write ", "to ", "a", "@b", ".io", "", " \u00fcber"], ["nothing ", "", "here"]]
CMPL_N2 = _sse(
    *(
        _cmpl_chunk(i, tokens[k], sum(map(len, tokens[:k])), "length" if k == len(tokens) - 1 else None)
        for k in range(max(map(len, CMPL_TOKENS)))
        for i, tokens in enumerate(CMPL_TOKENS)
        if k < len(tokens)
    ),
    {**_cmpl_chunk(0, "", 0), "choices": [], "usage": USAGE},
)

CHAT_WHOLE = orjson.dumps(
    {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "created": 1764000000,
        "model": "demo",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": 'Mail "jane@example.com"\n\u00e9', "tool_calls": []},
                "logprobs": {"content": [_chat_lp("Mail")["content"][0], _chat_lp(' "jane')["content"][0]]},
                "finish_reason": "length",
            },
            {
                "index": 1,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "t1",
                            "type": "function",
                            "function": {"name": "send_mail", "arguments": '{"to": "bob@example.org"}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            },
        ],
        "usage": USAGE,
    }
)
CMPL_WHOLE = orjson.dumps(
    {
        "id": "cmpl-2",
        "object": "text_completion",
        "created": 1764000000,
        "model": "demo",
        "choices": [
            {
                "index": i,
                "text": text,
                "logprobs": {"text_offset": [0], "token_logprobs": [-0.1], "tokens": [text], "top_logprobs": [None]},
                "finish_reason": "length",
            }
            for i, text in enumerate(["to a@b.io", "nothing \u00fcber"])
        ],
        "usage": USAGE,
    }
)

RESPONSES = {
    "chat stream, n=2, logprobs": (CHAT_N2, True, True, {"n": 2, "logprobs": True, "top_logprobs": 2}),
    "chat stream, tool call": (CHAT_TOOLS, True, True, {"tools": [], "tool_choice": "required"}),
    "completions stream, n=2, logprobs": (CMPL_N2, False, True, {"n": 2, "logprobs": 1}),
    "chat, n=2, logprobs, tool call": (CHAT_WHOLE, True, False, {"n": 2, "logprobs": True}),
    "completions, n=2, logprobs": (CMPL_WHOLE, False, False, {"n": 2, "logprobs": 1}),
}
CASES = [(name, layout) for name, r in RESPONSES.items() for layout in ("vLLM's", *layouts(r[2]))]


@pytest.mark.parametrize(("name", "layout"), CASES, ids=[f"{n}: {layout} layout" for n, layout in CASES])
def test_text_usage_and_redaction_agree_with_a_full_parse_in_any_layout(name, layout):
    body, chat, stream, payload = RESPONSES[name]
    relaid = body if layout == "vLLM's" else relayout(body, stream, layout)
    assert layout == "vLLM's" or relaid != body
    ref, redacted = check(relaid, chat, stream, payload, GUARD, bytewise=True)
    # the same response whatever the layout, and one whose email the rule redacts
    assert ref.texts() == view(body, chat, stream).texts()
    assert {k: v for k, v in (ref.usage or {}).items() if k != "x_new"} == USAGE
    assert any(redacted[k] != v for k, v in ref.fields.items())
