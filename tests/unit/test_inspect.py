"""StreamInspector: the same output however the engine's body is cut into pieces."""

from __future__ import annotations

import random

import orjson
import pytest

from serving.gateway.inspect import StreamInspector
from serving.gateway.stages import RequestContext
from serving.policy.config import GuardrailPolicy
from serving.policy.guardrails import OutputGuard


def _chunk(delta: dict, finish=None) -> bytes:
    return b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "model": "demo",
                                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


TOKENS = ["Write", " to", " jane", ".doe", "@", "example", ".com", " today", "."]
BODY = b"".join([_chunk({"role": "assistant", "content": ""}), *(_chunk({"content": t}) for t in TOKENS),
                 _chunk({"content": ""}, finish="stop"),
                 b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}\n\n',
                 b"data: [DONE]\n\n"])


def _inspect(pieces: list[bytes], guarded: bool) -> tuple[bytes, RequestContext]:
    ctx = RequestContext("r", "POST", "/v1/chat/completions", {}, b"")
    ctx.keep_text, ctx.client_wants_usage = True, False
    if guarded:
        ctx.output_guard = OutputGuard(GuardrailPolicy.model_validate(
            {"output": [{"type": "pii", "entities": ["email"], "action": "redact"}]}).output)
    inspector = StreamInspector(ctx, chat=True)
    return b"".join([inspector.feed(p) for p in pieces] + [inspector.finish()]), ctx


def _splits(body: bytes) -> dict[str, list[bytes]]:
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(body)), 40))
    return {
        "one event a piece": [e + b"\n\n" for e in body.split(b"\n\n")[:-1]],
        "one byte a piece": [body[i:i + 1] for i in range(len(body))],
        "random pieces": [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])],
        "whole body": [body],
    }


@pytest.mark.parametrize("guarded", [False, True], ids=["usage and text only", "email redacted"])
def test_the_output_is_the_same_however_the_body_is_cut(guarded):
    outputs = {name: _inspect(pieces, guarded) for name, pieces in _splits(BODY).items()}
    (first, ctx), *rest = outputs.values()
    assert all(out == first for out, _ in rest), [name for name, (out, _) in outputs.items() if out != first]
    for _, c in outputs.values():
        assert c.usage == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    events = [orjson.loads(e[6:]) for e in first.split(b"\n\n") if e.startswith(b"data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert not any(e.get("usage") for e in events)  # the client did not ask for it
    assert first.endswith(b"data: [DONE]\n\n")
    if guarded:
        assert text == "Write to [EMAIL] today." == "".join(ctx.response_text)
    else:
        assert text == "".join(TOKENS)
