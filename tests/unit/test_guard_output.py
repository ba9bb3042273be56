"""Output guardrails cannot be side-stepped by reading another field: content, refusal,
reasoning, tool-call arguments, completion text with echo, and the tokens in logprobs and
top_logprobs, streamed or not, never show a redacted or blocked span, and the openai client
reads what is left. Driven through the real gateway in front of the stand-in engine."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.unit.fake_engine import FakeEngine
from tests.unit.test_guard_input import EMAIL, completion, send
from tests.unit.test_policy_gateway import APP_KEY, CHAT, Harness, error_of, policy, run

SPLIT_EMAIL = ["Write to ", "jo", "hn.", "smith", "@", "exam", "ple", ".org", " today", "."]


def sse_events(r) -> list[dict]:
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    return [json.loads(e) for e in events if e != "[DONE]"]


def chunks_parse(r) -> list[ChatCompletionChunk]:
    """Every event as the openai SDK reads it (strict validation, not the SDK's lenient path)."""
    return [ChatCompletionChunk.model_validate(e) for e in sse_events(r) if "error" not in e]


def field_text(chunks: list[ChatCompletionChunk], field: str) -> str:
    out = []
    for c in chunks:
        for ch in c.choices:
            d = ch.delta
            if field == "tool_arguments":
                out += [tc.function.arguments or "" for tc in d.tool_calls or [] if tc.function]
            else:
                out.append(getattr(d, field, None) or (d.model_extra or {}).get(field) or "")
    return "".join(out)


def logprob_tokens(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [t.token for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content or []]


@pytest.mark.parametrize("field", ["content", "refusal", "reasoning", "reasoning_content", "tool_arguments"])
def test_a_streamed_email_is_redacted_in_every_field_and_in_its_logprobs(tmp_path, field):
    engine = FakeEngine(tokens=SPLIT_EMAIL, field=field)
    r, _, records = send(policy(tmp_path), {**CHAT, "stream": True, "logprobs": True, "top_logprobs": 2}, engine=engine)
    assert r.status_code == 200
    for piece in ("smith", "exam", "hn.", ".org"):
        assert piece not in r.text  # in no text, no logprob token, no alternative
    chunks = chunks_parse(r)
    assert field_text(chunks, field) == "Write to [EMAIL] today."
    tokens = logprob_tokens(chunks)
    assert tokens == ["Write to "]  # before the email; after the redaction, no more entries
    assert {"guardrail": "pii", "action": "redact", "direction": "output", "entity": "email", "count": 1} in records[
        -1
    ]["guardrails"]


def test_logprobs_of_a_clean_stream_all_reach_the_client_with_their_alternatives(tmp_path):
    words = ["The", " sky", " is", " blue", "."]
    engine = FakeEngine(tokens=words, alternatives={" sky": [" sea"]})
    r, _, _ = send(policy(tmp_path), {**CHAT, "stream": True, "logprobs": True, "top_logprobs": 2}, engine=engine)
    chunks = chunks_parse(r)
    assert logprob_tokens(chunks) == words
    tops = [
        [a.token for a in t.top_logprobs]
        for c in chunks
        for ch in c.choices
        if ch.logprobs
        for t in ch.logprobs.content
    ]
    assert tops[1] == [" sky", " sea"]


def test_an_alternative_token_that_a_rule_would_hit_is_not_shown(tmp_path):
    words = ["Send", " it", " to", " bob", "."]
    engine = FakeEngine(tokens=words, alternatives={" bob": [" launch codes", f" {EMAIL}", " alice"]})
    r, _, _ = send(policy(tmp_path), {**CHAT, "stream": True, "logprobs": True, "top_logprobs": 4}, engine=engine)
    assert "launch" not in r.text and "jane" not in r.text
    chunks = chunks_parse(r)
    tops = {
        t.token: [a.token for a in t.top_logprobs]
        for c in chunks
        for ch in c.choices
        if ch.logprobs
        for t in ch.logprobs.content
    }
    assert tops[" bob"] == [" bob", " alice"]


def test_a_blocked_term_in_the_stream_never_reaches_the_client_through_logprobs(tmp_path):
    tokens = ["Here ", "are ", "the ", "launch", " codes", ": 1234"]
    engine = FakeEngine(tokens=tokens, field="reasoning")
    r, _, records = send(policy(tmp_path), {**CHAT, "stream": True, "logprobs": True, "top_logprobs": 1}, engine=engine)
    assert "launch" not in r.text and "1234" not in r.text
    assert sse_events(r)[-1]["error"]["code"] == "content_policy_violation"
    assert records[-1]["guardrails"][-1]["action"] == "block"


@pytest.mark.parametrize("field", ["content", "refusal", "reasoning", "tool_arguments"])
def test_a_non_streamed_answer_is_redacted_in_every_field_and_its_logprobs_dropped(tmp_path, field):
    engine = FakeEngine(tokens=SPLIT_EMAIL, field=field)
    r, _, _ = send(policy(tmp_path), {**CHAT, "logprobs": True, "top_logprobs": 2}, engine=engine)
    assert r.status_code == 200
    assert "smith" not in r.text and "exam" not in r.text
    answer = ChatCompletion.model_validate(r.json())
    message = answer.choices[0].message
    if field == "tool_arguments":
        text = message.tool_calls[0].function.arguments
    else:
        text = getattr(message, field, None) or message.model_extra.get(field)
    assert text == "Write to [EMAIL] today."
    assert answer.choices[0].logprobs.content == []
    assert int(r.headers["content-length"]) == len(r.content)


def test_a_non_streamed_clean_answer_keeps_its_logprobs(tmp_path):
    engine = FakeEngine(tokens=["All", " good"], alternatives={" good": [" fine"]})
    r, _, _ = send(policy(tmp_path), {**CHAT, "logprobs": True, "top_logprobs": 2}, engine=engine)
    answer = ChatCompletion.model_validate(r.json())
    assert [(t.token, [a.token for a in t.top_logprobs]) for t in answer.choices[0].logprobs.content] == [
        ("All", ["All"]),
        (" good", [" good", " fine"]),
    ]


def output_only(tmp_path) -> dict:
    """Output rules only: the prompt reaches the engine as written, so echo shows it."""
    pol = policy(tmp_path)
    pol["guardrails"]["strict"]["input"] = []
    return pol


def openai_call(pol: dict, engine: FakeEngine, create):
    """What the openai client reads from the gateway: create(client) makes the call."""

    async def go():
        async with Harness(pol, {"demo": engine}) as h:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{h.gw.port}/v1", api_key=APP_KEY, max_retries=0)
            try:
                answer = await create(client)
                if hasattr(answer, "__aiter__"):
                    answer = [c async for c in answer]
                return answer
            finally:
                await client.close()

    return run(go())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_echo_with_logprobs_shows_no_email_and_no_blocked_term(tmp_path, stream):
    engine = FakeEngine(tokens=[" and", " more"])
    answer = openai_call(
        output_only(tmp_path),
        engine,
        lambda c: c.completions.create(
            model="demo", prompt=f"mail {EMAIL} about it", echo=True, logprobs=1, max_tokens=8, stream=stream
        ),
    )
    choices = [c for e in answer for c in e.choices] if stream else answer.choices
    assert "jane" not in repr(answer)
    assert "".join(c.text for c in choices) == "mail [EMAIL] about it and more"
    # the echoed prompt's token held the email: it and every token after it are dropped
    assert [t for c in choices if c.logprobs for t in c.logprobs.tokens or []] == []

    with pytest.raises(openai.APIError) if stream else pytest.raises(openai.BadRequestError) as blocked:
        answer = openai_call(
            output_only(tmp_path),
            engine,
            lambda c: c.completions.create(
                model="demo", prompt="the launch codes", echo=True, logprobs=1, max_tokens=8, stream=stream
            ),
        )
    assert "launch" not in str(blocked.value.body)


def test_the_openai_client_reads_a_guarded_stream_with_logprobs(tmp_path):
    async def go():
        engine = FakeEngine(tokens=SPLIT_EMAIL, alternatives={" today": [" tomorrow"]})
        async with Harness(policy(tmp_path), {"demo": engine}) as h:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{h.gw.port}/v1", api_key=APP_KEY)
            stream = await client.chat.completions.create(
                model="demo", messages=CHAT["messages"], stream=True, logprobs=True, top_logprobs=2
            )
            chunks = [c async for c in stream]
            await client.close()
            return chunks

    chunks = run(go())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Write to [EMAIL] today."
    assert logprob_tokens(chunks) == ["Write to "]


@pytest.mark.parametrize(
    "path,option",
    [
        ("/v1/chat/completions", "return_token_ids"),
        ("/v1/chat/completions", "return_tokens_as_token_ids"),
        ("/v1/chat/completions", "prompt_logprobs"),
        ("/v1/chat/completions", "return_prompt_text"),
        ("/v1/completions", "return_token_ids"),
        ("/v1/completions", "prompt_logprobs"),
    ],
)
def test_options_that_would_show_unscanned_text_are_400_for_tenants_with_output_rules(tmp_path, path, option):
    body = {**CHAT, option: True} if path.endswith("chat/completions") else completion("hi", **{option: 1})
    r, engine_requests, _ = send(policy(tmp_path), body, path=path)
    assert r.status_code == 400 and engine_requests == []
    err = error_of(r)
    assert err["param"] == option and err["code"] == "unsupported_with_guardrails"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    "field, label",
    [
        ("content", None),
        ("refusal", "0.refusal"),
        ("reasoning_content", "0.reasoning_content"),
        ("tool_arguments", "0.tool_calls.0.arguments"),
    ],
)
def test_the_audit_keeps_every_field_the_client_was_shown_redacted(tmp_path, field, label, stream):
    """audit_content: true (the policy's acme tenant) keeps what the client saw, in every field."""
    r, _, records = send(
        policy(tmp_path), {**CHAT, "stream": stream}, engine=FakeEngine(tokens=SPLIT_EMAIL, field=field)
    )
    assert r.status_code == 200
    rec = records[-1]
    if label is None:
        assert rec["response"] == "Write to [EMAIL] today." and "response_fields" not in rec
    else:
        shown = {label: "Write to [EMAIL] today."}
        if field == "tool_arguments":
            shown["0.tool_calls.0.name"] = "lookup"  # the stand-in engine's tool name
        assert rec["response_fields"] == shown
    assert "smith" not in json.dumps(rec)
