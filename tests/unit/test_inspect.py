"""StreamInspector: what the client reads is the same however the engine's body is cut into
pieces; several events read at once that only add text are merged, nothing else is."""

from __future__ import annotations

import random

import orjson
import pytest

from serving.gateway.guard import OutputGuardWatch
from serving.gateway.inspect import StreamInspector
from serving.gateway.stages import RequestContext
from serving.policy.config import GuardrailPolicy
from serving.policy.guardrails import OutputGuard


def _chunk(delta: dict, finish=None) -> bytes:
    return (
        b"data: "
        + orjson.dumps(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": "demo",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )
        + b"\n\n"
    )


TOKENS = ["Write", " to", " jane", ".doe", "@", "example", ".com", " today", "."]
BODY = b"".join(
    [
        _chunk({"role": "assistant", "content": ""}),
        *(_chunk({"content": t}) for t in TOKENS),
        _chunk({"content": ""}, finish="stop"),
        b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}\n\n',
        b"data: [DONE]\n\n",
    ]
)


def _email_watch(ctx: RequestContext) -> OutputGuardWatch:
    guard = OutputGuard(
        GuardrailPolicy.model_validate({"output": [{"type": "pii", "entities": ["email"], "action": "redact"}]}).output
    )
    return OutputGuardWatch(guard, ctx.guardrail_actions)


def _inspect(pieces: list[bytes], guarded: bool) -> tuple[bytes, RequestContext]:
    ctx = RequestContext("r", "POST", "/v1/chat/completions", {}, b"")
    ctx.keep_text, ctx.client_wants_usage = True, False
    if guarded:
        ctx.watches = [_email_watch(ctx)]
    inspector = StreamInspector(ctx, chat=True)
    return b"".join([inspector.feed(p) for p in pieces] + [inspector.finish()]), ctx


def _splits(body: bytes) -> dict[str, list[bytes]]:
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(body)), 40))
    return {
        "one event a piece": [e + b"\n\n" for e in body.split(b"\n\n")[:-1]],
        "one byte a piece": [body[i : i + 1] for i in range(len(body))],
        "random pieces": [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])],
        "whole body": [body],
    }


def _events(out: bytes) -> list[dict]:
    return [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]


def _client_view(out: bytes) -> tuple[str, list]:
    """The text the client reads, and what every event carries besides text, in order."""
    events = _events(out)
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    others = []
    for e in events:
        for c in e["choices"]:
            rest = {k: v for k, v in c["delta"].items() if k != "content"}
            if rest or c.get("finish_reason"):
                others.append((rest, c.get("finish_reason")))
        if not e["choices"]:
            others.append(e)
    return text, others


@pytest.mark.parametrize("guarded", [False, True], ids=["usage and text only", "email redacted"])
def test_the_client_reads_the_same_however_the_body_is_cut(guarded):
    outputs = {name: _inspect(pieces, guarded) for name, pieces in _splits(BODY).items()}
    views = {name: _client_view(out) for name, (out, _) in outputs.items()}
    first = views["one event a piece"]
    assert all(v == first for v in views.values()), [n for n, v in views.items() if v != first]
    for out, c in outputs.values():
        assert c.usage == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
        assert out.endswith(b"data: [DONE]\n\n")
        assert c.completion_chunks == len(TOKENS) + 2  # every engine event counted, merged or not
    text, others = first
    assert others == [({"role": "assistant"}, None), ({}, "stop")]
    assert not any(e.get("usage") for e in _events(outputs["whole body"][0]))  # the client did not ask
    if guarded:
        assert text == "Write to [EMAIL] today." == "".join(outputs["whole body"][1].response_text)
    else:
        assert text == "".join(TOKENS)


def test_text_events_read_together_are_merged_into_one():
    out, _ = _inspect([BODY], guarded=True)
    events = _events(out)
    # role, then the nine tokens and the finish as one event; the id and model are the engine's
    assert [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events] == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Write to [EMAIL] today."}, "stop"),
    ]
    assert {(e["id"], e["model"]) for e in events} == {("c1", "demo")}
    one_by_one, _ = _inspect([e + b"\n\n" for e in BODY.split(b"\n\n")[:-1]], guarded=False)
    assert len(_events(one_by_one)) == len(TOKENS) + 2  # read one at a time: nothing to merge


def _event(choice: dict, **envelope) -> bytes:
    return (
        b"data: "
        + orjson.dumps(
            {"id": "c1", "object": "chat.completion.chunk", "model": "demo", **envelope, "choices": [choice]}
        )
        + b"\n\n"
    )


def test_events_with_more_than_text_or_of_another_choice_are_not_merged():
    logprobs = {"content": [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}]}
    body = b"".join(
        [
            _event({"index": 0, "delta": {"content": "a"}, "logprobs": logprobs, "finish_reason": None}),
            _event({"index": 0, "delta": {"content": "b"}, "logprobs": logprobs, "finish_reason": None}),
            _event({"index": 0, "delta": {"content": "c"}, "finish_reason": None}),
            _event({"index": 1, "delta": {"content": "x"}, "finish_reason": None}),
            _event({"index": 0, "delta": {"content": "d"}, "finish_reason": None}),
            _event({"index": 0, "delta": {"content": '\u00e9"}'}, "finish_reason": None}),
            _event({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}),
            _event({"index": 0, "delta": {"content": "e"}, "finish_reason": None}, model="other"),
            _event({"index": 0, "delta": {"content": "f"}, "finish_reason": None}, model="other"),
            _event({"index": 0, "delta": {"content": "g"}, "finish_reason": None}),
            _event({"index": 0, "delta": {"content": "h"}, "finish_reason": "stop"}),
            b"data: [DONE]\n\n",
        ]
    )
    out, ctx = _inspect([body], guarded=False)
    deltas = [
        (e["model"], e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0].get("finish_reason"))
        for e in _events(out)
    ]
    assert deltas == [
        ("demo", 0, {"content": "a"}, None),
        ("demo", 0, {"content": "b"}, None),
        ("demo", 0, {"content": "c"}, None),
        ("demo", 1, {"content": "x"}, None),
        ("demo", 0, {"content": 'd\u00e9"}'}, None),  # merged, escapes and all
        ("demo", 0, {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}, None),
        ("other", 0, {"content": "e"}, None),
        ("other", 0, {"content": "f"}, None),  # not the stream's envelope
        ("demo", 0, {"content": "gh"}, "stop"),
    ]  # the finish takes the run it ends
    assert ctx.completion_chunks == 11
    assert "".join(ctx.response_text) == 'abcxd\u00e9"}efgh'


def test_events_whose_usage_changes_are_not_merged():
    # continuous usage stats: every chunk carries the usage so far, and the client sees each
    body = b"".join(
        _event(
            {"index": 0, "delta": {"content": t}, "finish_reason": None},
            usage={"prompt_tokens": 3, "completion_tokens": i + 1, "total_tokens": i + 4},
        )
        for i, t in enumerate(["a", "b", "c"])
    )
    ctx = RequestContext("r", "POST", "/v1/chat/completions", {}, b"")
    ctx.keep_text, ctx.client_wants_usage = True, True
    inspector = StreamInspector(ctx, chat=True)
    events = _events(inspector.feed(body) + inspector.finish())
    assert [(e["choices"][0]["delta"]["content"], e["usage"]["completion_tokens"]) for e in events] == [
        ("a", 1),
        ("b", 2),
        ("c", 3),
    ]


def test_a_completion_stream_merges_its_text_events_too():
    def ev(text, finish=None):
        return (
            b"data: "
            + orjson.dumps(
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "model": "demo",
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                }
            )
            + b"\n\n"
        )

    body = b"".join([ev("mail "), ev("jane"), ev("@example.com"), ev(" now"), ev("", "length"), b"data: [DONE]\n\n"])
    outs = []
    for pieces in ([body], [e + b"\n\n" for e in body.split(b"\n\n")[:-1]]):
        ctx = RequestContext("r", "POST", "/v1/completions", {}, b"")
        ctx.keep_text, ctx.client_wants_usage = True, False
        ctx.watches = [_email_watch(ctx)]
        inspector = StreamInspector(ctx, chat=False)
        outs.append(_events(b"".join(inspector.feed(p) for p in pieces) + inspector.finish()))
    whole, one_by_one = outs
    assert [(e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in whole] == [
        ("mail [EMAIL] now", "length")
    ]
    assert "".join(e["choices"][0]["text"] for e in one_by_one) == "mail [EMAIL] now"
    assert len(one_by_one) > 1


def test_a_stream_whose_text_cannot_be_located_is_still_inspected_event_by_event():
    # "content" twice (the envelope has an object with such a key): no template, nothing merged
    body = b"".join(
        _event({"index": 0, "delta": {"content": t}, "finish_reason": None}, meta={"content": "x"})
        for t in ["mail ", "a@b", ".io", " now"]
    )
    out, ctx = _inspect([body], guarded=True)
    texts = [e["choices"][0]["delta"]["content"] for e in _events(out)]
    assert "".join(texts) == "mail [EMAIL] now" and len(texts) > 1


# -- every text field, and logprobs, through the output guardrails -----------------------------


def _lp(token: str, *alternatives: str) -> dict:
    return {
        "content": [
            {
                "token": token,
                "logprob": -0.5,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": -1.0, "bytes": list(t.encode())} for t in (token, *alternatives)
                ],
            }
        ]
    }


def _lp_body(tokens: list[str], index: int = 0, field: str = "content") -> list[bytes]:
    events = [_event({"index": index, "delta": {field: t}, "logprobs": _lp(t), "finish_reason": None}) for t in tokens]
    return events + [_event({"index": index, "delta": {field: ""}, "logprobs": None, "finish_reason": "stop"})]


def _guarded(body: bytes, pieces: list[bytes] | None = None) -> tuple[list[dict], RequestContext]:
    ctx = RequestContext("r", "POST", "/v1/chat/completions", {}, b"")
    ctx.client_wants_usage, ctx.payload = False, {"logprobs": True}
    ctx.watches = [_email_watch(ctx)]
    inspector = StreamInspector(ctx, chat=True)
    out = b"".join(inspector.feed(p) for p in (pieces or [body])) + inspector.finish()
    return _events(out), ctx


def _seen(events: list[dict], index: int = 0, field: str = "content") -> tuple[str, list[str]]:
    """A choice's text as the client reads it, and the logprob tokens it is shown."""
    text = "".join((c.get("delta") or {}).get(field) or "" for e in events for c in e["choices"] if c["index"] == index)
    tokens = [
        t["token"]
        for e in events
        for c in e["choices"]
        if c["index"] == index and c.get("logprobs")
        for t in c["logprobs"]["content"]
    ]
    return text, tokens


def test_logprobs_of_text_held_back_wait_for_it_and_a_redacted_span_never_shows_in_them():
    tokens = ["Write", " to", " jane", ".doe", "@", "example", ".com", " today", "."]
    body = b"".join(_lp_body(tokens)) + b"data: [DONE]\n\n"
    for name, pieces in _splits(body).items():
        events, _ = _guarded(body, pieces)
        text, shown = _seen(events)
        assert text == "Write to [EMAIL] today.", name
        assert shown == ["Write", " to"], name  # what preceded the email; nothing from it on
        for ev in events:  # no event shows a logprob whose text is still held back
            assert "jane" not in orjson.dumps(ev).decode()


def test_logprobs_of_a_clean_stream_reach_the_client_whole_and_in_order_however_it_is_cut():
    tokens = ["The", " sky", " is", " blue", " and", " 42", " is", " the", " answer", "."]
    body = b"".join(_lp_body(tokens)) + b"data: [DONE]\n\n"
    for name, pieces in _splits(body).items():
        events, _ = _guarded(body, pieces)
        assert _seen(events) == ("".join(tokens), tokens), name


def test_each_choice_and_each_field_is_scanned_on_its_own():
    # choice 1's email is redacted and its logprobs stop; choice 0 is untouched, and an email
    # split between the reasoning and the content of one choice is two texts, neither an email
    body = b"".join(
        [
            *_lp_body(["Mail", " a@b.io", " now"], index=1),
            *_lp_body(["All", " fine"], index=0),
            *_lp_body(["x", "@"], index=2, field="reasoning"),
            *_lp_body(["b.io"], index=2),
            b"data: [DONE]\n\n",
        ]
    )
    events, ctx = _guarded(body)
    assert _seen(events, 1) == ("Mail [EMAIL] now", ["Mail"])
    assert _seen(events, 0) == ("All fine", ["All", " fine"])
    assert _seen(events, 2, "reasoning")[0] == "x@" and _seen(events, 2)[0] == "b.io"
    assert [(a.entity, a.count) for a in ctx.guardrail_actions] == [("email", 1)]


def test_a_stream_cut_before_its_finish_releases_held_text_and_its_logprobs():
    body = b"".join(_lp_body(["Reach", " me", " at"])[:-1])  # no finishing event, no [DONE]
    events, _ = _guarded(body)
    assert _seen(events) == ("Reach me at", ["Reach", " me", " at"])
