"""Hostile request bodies and the quota arithmetic: a 400 naming the field, never a 500; a
reservation that covers what the engine will run however the request spells it; a client that
leaves is still charged for what the engine did.

The first part checks serving/gateway/request_body.py and request_fields.py directly, the last
drives the gateway over HTTP in front of a stand-in engine (the Harness of test_policy_gateway.py).
"""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest

from serving.errors import GatewayError
from serving.gateway.request_body import MAX_JSON_DEPTH, parse
from serving.gateway.request_fields import Generation, check_fields
from tests.unit.fake_engine import FakeEngine
from tests.unit.test_policy_gateway import APP_KEY, CHAT, Harness, error_of, policy, run

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MSGS = [{"role": "user", "content": "hello there"}]


def refused(fn, *args) -> GatewayError:
    with pytest.raises(GatewayError) as e:
        fn(*args)
    assert e.value.status == 400
    return e.value


def nested(depth: int) -> bytes:
    """A JSON value `depth` levels deep."""
    return b"[" * depth + b"]" * depth


def quota_policy(tmp_path, **quotas) -> dict:
    pol = policy(tmp_path, guardrails={})
    pol["tenants"]["acme"].pop("guardrails")
    pol["tenants"]["acme"]["quotas"] = quotas
    return pol


# -- the body -------------------------------------------------------------------------------------


def test_a_body_nested_100000_deep_is_a_400_naming_the_field():
    body = b'{"model": "demo", "messages": [], "extra": ' + nested(100_000) + b"}"
    err = refused(parse, body)
    assert err.code == "invalid_json" and err.param == "extra"
    assert str(MAX_JSON_DEPTH) in err.message


def test_nesting_is_refused_one_level_past_the_limit_and_not_at_it():
    at_limit = b'{"x": ' + nested(MAX_JSON_DEPTH - 1) + b"}"  # the body itself is one level
    assert parse(at_limit)["x"]
    err = refused(parse, b'{"model": "demo", "tools": [{"a": ' + nested(MAX_JSON_DEPTH - 2) + b"}]}")
    assert err.param == "tools"
    long_and_deep = b'{"prompt": "' + b"x" * 100_000 + b'", "extra": ' + nested(MAX_JSON_DEPTH) + b"}"
    assert refused(parse, long_and_deep).param == "extra"
    orjson.dumps(parse(at_limit))  # what passes can be sent on (orjson.dumps stops at 255)


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', "messages.0.content"),
        (b'{"user": "\\udc00"}', "user"),
        (b'{"extra": {"deep": ["ok", "\\ud83d"]}}', "extra.deep.1"),
        (b'{"\\ud800": 1}', "\\ud800"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_its_field(raw, param):
    err = refused(parse, raw)
    assert err.param == param and "surrogate" in err.message
    err.message.encode("utf-8")  # the error itself is valid text (it goes to the audit log)


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"temperature": NaN}', "temperature"),
        (b'{"logit_bias": {"7": Infinity}}', "logit_bias.7"),
        (b'{"x": [1, -Infinity]}', "x.1"),
        (b'{"top_p": 1e400}', "top_p"),
    ],
)
def test_a_number_that_is_not_finite_is_a_400_naming_its_field(raw, param):
    err = refused(parse, raw)
    assert err.param == param and "finite" in err.message


def test_integers_beyond_64_bits_are_read_and_can_be_sent_on():
    payload = parse(b'{"model": "demo", "seed_like": 18446744073709551616, "neg": -9223372036854775809}')
    assert orjson.loads(orjson.dumps(payload))["seed_like"] == pytest.approx(2**64)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1} x', b"[1, 2]", b'"text"', b'{"s": "\xff"}'])
def test_what_is_not_a_json_object_is_a_400(raw):
    err = refused(parse, raw)
    assert err.param is None


def test_a_utf8_byte_order_mark_is_tolerated_as_the_engine_tolerates_it():
    assert parse(b'\xef\xbb\xbf{"model": "demo"}') == {"model": "demo"}


def test_hostile_bodies_get_a_400_naming_the_field_never_a_500(tmp_path):
    headers = {"authorization": f"Bearer {APP_KEY}", "content-type": "application/json"}
    stream = b'"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": true'
    bodies = {
        "deep": b"{" + stream + b', "extra": ' + nested(100_000) + b"}",
        "deep_300": b"{" + stream + b', "extra": ' + nested(300) + b"}",
        "surrogate": b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}], "stream": true}',
        "n_float": b"{" + stream + b', "n": 2.5}',
    }

    async def go():
        async with Harness(quota_policy(tmp_path, tokens_per_minute=100_000), {"demo": FakeEngine(tokens=["ok"])}) as h:
            out = {name: await h.client.post(CHAT_PATH, content=body, headers=headers) for name, body in bodies.items()}
            big = b"{" + stream + b', "extra": 18446744073709551616}'  # orjson.dumps refused it: a 500
            out["big_int"] = await h.client.post(CHAT_PATH, content=big, headers=headers)
            return out, h.engines["demo"].requests, h.audit_records()

    out, engine_requests, records = run(go())
    assert {name: (r.status_code, error_of(r)["param"]) for name, r in out.items() if name != "big_int"} == {
        "deep": (400, "extra"),
        "deep_300": (400, "extra"),
        "surrogate": (400, "messages.0.content"),
        "n_float": (400, "n"),
    }
    assert out["big_int"].status_code == 200
    assert len(engine_requests) == 1  # only the big integer reached the engine
    assert [r["status"] for r in records] == [400, 400, 400, 400, 200]


# -- fields Keel reads: typed as vLLM types them --------------------------------------------------

# (path, field, value the client sent, what vLLM's pydantic model makes of it)
LAX_SPELLINGS = [
    (CHAT_PATH, "n", "20", 20),
    (CHAT_PATH, "n", 20.0, 20),
    (CHAT_PATH, "n", "20.0", 20),
    (CHAT_PATH, "n", True, 1),
    (COMPLETIONS_PATH, "n", " 3", 3),
    (CHAT_PATH, "max_tokens", "40", 40),
    (CHAT_PATH, "max_completion_tokens", 40.0, 40),
    (COMPLETIONS_PATH, "max_tokens", True, 1),
    (CHAT_PATH, "stream", "false", False),
    (CHAT_PATH, "stream", 0, False),
    (CHAT_PATH, "stream", "yes", True),
    (CHAT_PATH, "truncate_prompt_tokens", "5", 5),
    (COMPLETIONS_PATH, "add_special_tokens", "false", False),
    (COMPLETIONS_PATH, "prompt", [1.0, 2.0], [1, 2]),
    (COMPLETIONS_PATH, "prompt", [True, 2], [1, 2]),
    (COMPLETIONS_PATH, "prompt", [[1.0], [2, 3]], [[1], [2, 3]]),
]


def _body(path: str, **fields) -> dict:
    base = {"model": "demo", "messages": list(MSGS)} if path == CHAT_PATH else {"model": "demo", "prompt": "hi"}
    return {**base, **fields}


@pytest.mark.parametrize("path, field, sent, read", LAX_SPELLINGS)
def test_a_lax_spelling_is_written_back_as_the_engine_reads_it(path, field, sent, read):
    payload = _body(path, **{field: sent})
    _, changed = check_fields(path, payload)
    assert changed
    assert payload[field] == read and type(payload[field]) is type(read)


def test_stream_options_spellings_are_read_as_the_engine_reads_them():
    payload = _body(CHAT_PATH, stream=1, stream_options={"include_usage": "false", "vendor": {"x": 1}})
    check_fields(CHAT_PATH, payload)
    assert payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": False, "vendor": {"x": 1}}


def test_canonical_bodies_are_left_as_they_are():
    payload = _body(CHAT_PATH, n=2, max_tokens=5, stream=True, stream_options={"include_usage": True})
    before = json.dumps(payload)
    assert check_fields(CHAT_PATH, payload)[1] is False
    assert json.dumps(payload) == before


@pytest.mark.parametrize(
    "path, fields, param",
    [
        (CHAT_PATH, {"n": 20.5}, "n"),
        (CHAT_PATH, {"n": "twenty"}, "n"),
        (CHAT_PATH, {"n": 0}, "n"),
        (CHAT_PATH, {"n": -1}, "n"),
        (CHAT_PATH, {"n": 2**64}, "n"),
        (CHAT_PATH, {"max_tokens": -5}, "max_tokens"),
        (CHAT_PATH, {"max_completion_tokens": [1]}, "max_completion_tokens"),
        (CHAT_PATH, {"stream": 2}, "stream"),
        (CHAT_PATH, {"stream": True, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
        (CHAT_PATH, {"stream_options": "yes"}, "stream_options"),
        (CHAT_PATH, {"user": 7}, "user"),
        (CHAT_PATH, {"model": ["demo"]}, "model"),
        (CHAT_PATH, {"messages": "hello"}, "messages"),
        (CHAT_PATH, {"messages": [{"content": "hi"}]}, "messages.0.role"),
        (CHAT_PATH, {"messages": [{"role": ["user"], "content": "hi"}]}, "messages.0.role"),
        (CHAT_PATH, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (CHAT_PATH, {"messages": [{"role": "user", "content": ["ok", 5]}]}, "messages.0.content.1"),
        (CHAT_PATH, {"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        (COMPLETIONS_PATH, {"prompt": ["a", 1]}, "prompt"),
        (COMPLETIONS_PATH, {"prompt": [[1], "a"]}, "prompt"),
        (COMPLETIONS_PATH, {"prompt": 5}, "prompt"),
        (COMPLETIONS_PATH, {"prompt_embeds": 5}, "prompt_embeds"),
    ],
)
def test_a_field_keel_reads_of_the_wrong_type_is_a_400_naming_it(path, fields, param):
    body = _body(path, **fields)
    err = refused(check_fields, path, body)
    assert err.param == param
    assert f"`{param}`" in err.message


def test_chat_messages_are_required():
    assert refused(check_fields, CHAT_PATH, {"model": "demo"}).param == "messages"


@pytest.fixture(scope="module")
def vllm_models():
    chat = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    completion = pytest.importorskip("vllm.entrypoints.openai.completion.protocol")
    return {CHAT_PATH: chat.ChatCompletionRequest, COMPLETIONS_PATH: completion.CompletionRequest}


@pytest.mark.parametrize("path, field, sent, read", LAX_SPELLINGS)
def test_lax_spellings_match_what_vllm_reads(vllm_models, path, field, sent, read):
    """The table above is vLLM's own reading (the engine's request models, installed here)."""
    request = vllm_models[path].model_validate(_body(path, **{field: sent}))
    assert getattr(request, field) == read


@pytest.mark.parametrize(
    "path, fields",
    [
        (CHAT_PATH, {"n": 20.5}),
        (CHAT_PATH, {"n": "twenty"}),
        (CHAT_PATH, {"stream": 2}),
        (CHAT_PATH, {"user": 7}),
        (CHAT_PATH, {"messages": [{"content": "hi"}]}),
        (CHAT_PATH, {"messages": [{"role": "user", "content": 5}]}),
        (COMPLETIONS_PATH, {"prompt": ["a", 1]}),
        (COMPLETIONS_PATH, {"prompt": [[1], "a"]}),
        (CHAT_PATH, {"stream": True, "stream_options": {"include_usage": "maybe"}}),
    ],
)
def test_what_keel_refuses_as_a_type_vllm_refuses_too(vllm_models, path, fields):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        vllm_models[path].model_validate(_body(path, **fields))
    refused(check_fields, path, _body(path, **fields))


@pytest.mark.parametrize(
    "fields, prompts, embeds",
    [
        ({"prompt": "one"}, 1, 0),
        ({"prompt": [1, 2, 3]}, 1, 0),
        ({"prompt": ["a"] * 20}, 20, 0),
        ({"prompt": [[1], [2, 3]]}, 2, 0),
        ({"prompt": []}, 0, 0),
        ({"prompt": None, "prompt_embeds": "QUJD"}, 1, 1),
        ({"prompt": ["a", "b"], "prompt_embeds": ["QQ==", "Qg=="]}, 4, 2),
        ({"prompt": [1.0, 2.0]}, 1, 0),
    ],
)
def test_every_prompt_the_engine_runs_is_counted(fields, prompts, embeds):
    gen, _ = check_fields(COMPLETIONS_PATH, {"model": "demo", **fields})
    assert (gen.prompts, gen.embeds) == (prompts, embeds)


@pytest.mark.parametrize(
    "path, fields, max_output, param",
    [
        (CHAT_PATH, {"max_tokens": 50}, 50, "max_tokens"),
        (CHAT_PATH, {"max_tokens": 50, "max_completion_tokens": 7}, 7, "max_completion_tokens"),
        (CHAT_PATH, {"max_tokens": 50, "max_completion_tokens": None}, 50, "max_tokens"),
        (CHAT_PATH, {}, None, "max_tokens"),
        (COMPLETIONS_PATH, {}, 16, "max_tokens"),  # vLLM's default for completions
        (COMPLETIONS_PATH, {"max_tokens": None}, 16, "max_tokens"),
        # /v1/completions has no max_completion_tokens: the engine ignores it, so does the quota
        (COMPLETIONS_PATH, {"max_tokens": 300, "max_completion_tokens": 1}, 300, "max_tokens"),
    ],
)
def test_the_output_limit_is_the_field_the_engine_uses(path, fields, max_output, param):
    gen, _ = check_fields(path, _body(path, **fields))
    assert (gen.max_output, gen.output_param) == (max_output, param)


def test_a_string_false_stream_is_not_streamed_and_gets_no_stream_options(tmp_path):
    async def go():
        async with Harness(quota_policy(tmp_path, tokens_per_minute=100_000), {"demo": FakeEngine(tokens=["ok"])}) as h:
            r = await h.post({**CHAT, "stream": "false"})
            return r, json.loads(h.engines["demo"].requests[0][2])

    r, sent = run(go())
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert sent["stream"] is False and "stream_options" not in sent  # vLLM refuses stream_options without a stream


# -- what a request may cost ----------------------------------------------------------------------


def test_each_prompt_reserves_n_choices_capped_by_what_its_context_leaves():
    gen = Generation(prompts=3, n=2, max_output=100)
    # the third prompt leaves only 12 tokens of a 512 context for each choice
    assert gen.reservation([10, 20, 500], 512) == (530, 2 * (100 + 100 + 12))
    assert gen.reservation(None, 512) == (0, 2 * 3 * 100)  # uncounted prompts: their outputs still count
    assert gen.reservation([10, 20, 500], None) == (530, 2 * 3 * 100)


def test_without_max_tokens_a_choice_may_fill_the_context():
    assert Generation(prompts=2, n=3).reservation([12, 2], 512) == (14, 3 * (500 + 510))


def test_an_embeddings_prompt_is_reserved_as_the_most_it_can_cost():
    # its length is unknown: prompt p and n choices of min(m, L - p) cost at most L - m + n * m
    gen = Generation(prompts=2, embeds=1, n=4, max_output=100)
    prompt, output = gen.reservation([30], 512)
    assert (prompt, output) == (30 + 412, 4 * (100 + 100))
    assert all(p + 4 * min(100, 512 - p) <= 412 + 4 * 100 for p in range(513))


def test_truncation_to_the_context_is_counted_as_the_engine_truncates():
    gen = Generation(max_output=100, truncate=-1)
    assert gen.reservation([2000], 512) == (412, 100)
    assert gen.context_error([2000], 512, "prompt") is None


def test_the_context_check_names_the_field_that_overflows():
    assert Generation(max_output=600).context_error(None, 512, "messages").param == "max_tokens"
    err = Generation(max_output=100).context_error([413], 512, "messages")
    assert (err.code, err.param) == ("context_length_exceeded", "messages")
    assert Generation(max_output=100).context_error([412], 512, "messages") is None
    assert Generation(max_output=None).context_error([512], 512, "prompt") is None
    assert Generation(max_output=10**6).context_error([1], None, "prompt") is None  # unknown context


@pytest.mark.parametrize("n", [20, "20", 20.0, "20.0"])
def test_n_reserves_for_n_choices_however_it_is_spelt(tmp_path, n):
    async def go():
        async with Harness(quota_policy(tmp_path, tokens_per_minute=100_000), {"demo": FakeEngine(tokens=["ok"])}) as h:
            r = await h.post({**CHAT, "n": n, "max_tokens": 10})
            counted = h.infos["demo"].counter.count(CHAT_PATH, CHAT)
            return r, h.audit_records()[-1], json.loads(h.engines["demo"].requests[0][2]), counted

    r, record, sent, prompt = run(go())
    assert r.status_code == 200
    assert record["reserved_tokens"] == prompt + 20 * 10
    assert sent["n"] == 20 and type(sent["n"]) is int  # the engine runs what the quota counted


def test_n_spelt_as_a_string_cannot_take_more_than_the_quota(tmp_path):
    async def go():
        async with Harness(quota_policy(tmp_path, tokens_per_minute=4000), {"demo": FakeEngine(tokens=["ok"])}) as h:
            return await h.post({**CHAT, "n": "20", "max_tokens": 400}), h.engines["demo"].requests

    r, engine_requests = run(go())
    assert r.status_code == 429 and error_of(r)["code"] == "request_too_large"
    assert "20 choice" in error_of(r)["message"]
    assert engine_requests == []


def test_every_prompt_of_a_completions_request_is_reserved(tmp_path):
    prompts = [f"prompt number {i} about licences" for i in range(20)]

    async def go():
        async with Harness(quota_policy(tmp_path, tokens_per_minute=100_000), {"demo": FakeEngine(tokens=["ok"])}) as h:
            counter = h.infos["demo"].counter
            as_text = await h.post(
                {"model": "demo", "prompt": prompts, "max_tokens": 10, "n": 2}, path=COMPLETIONS_PATH
            )
            ids = [[1, 2, 3]] * 20
            as_ids = await h.post({"model": "demo", "prompt": ids, "max_tokens": 10}, path=COMPLETIONS_PATH)
            default = await h.post({"model": "demo", "prompt": prompts[:3]}, path=COMPLETIONS_PATH)
            each = [counter.count(COMPLETIONS_PATH, {"prompt": p}) for p in prompts]
            return [as_text, as_ids, default], h.audit_records(), each

    rs, records, each = run(go())
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert records[0]["reserved_tokens"] == sum(each) + 20 * 2 * 10
    assert records[1]["reserved_tokens"] == 20 * 3 + 20 * 10
    assert records[2]["reserved_tokens"] == sum(each[:3]) + 3 * 16  # the engine's default max_tokens, per prompt


def test_max_tokens_beyond_the_context_is_a_400_before_the_quota(tmp_path):
    async def go():
        async with Harness(quota_policy(tmp_path, tokens_per_day=100_000), {"demo": FakeEngine(tokens=["ok"])}) as h:
            too_many = await h.post({**CHAT, "max_tokens": 100_000})
            too_many_completion = await h.post({**CHAT, "max_completion_tokens": 513})
            long = {**CHAT, "messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 10}
            too_long = await h.post(long)
            after = await h.post({**CHAT, "max_tokens": 1})
            return too_many, too_many_completion, too_long, after, h.audit_records()

    too_many, too_many_completion, too_long, after, records = run(go())
    for r, param in ((too_many, "max_tokens"), (too_many_completion, "max_completion_tokens"), (too_long, "messages")):
        assert r.status_code == 400
        err = error_of(r)
        assert err["code"] == "context_length_exceeded" and err["param"] == param
        assert "x-ratelimit-remaining-tokens" not in r.headers  # no quota was looked at
    assert "512" in error_of(too_long)["message"]
    assert [rec["quota"] for rec in records[:3]] == [None, None, None]
    # nothing was taken: the next request sees the whole day's tokens but its own reservation
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 100_000 - records[3]["reserved_tokens"]


# -- a client that leaves -------------------------------------------------------------------------


class SlowEngine(FakeEngine):
    """Answers only after `think_s`, as an engine busy generating a long answer does."""

    def __init__(self, think_s: float, **kw):
        super().__init__(**kw)
        self.think_s = think_s

    async def _answer_like_vllm(self, reader, writer, req, line):
        await asyncio.sleep(self.think_s)
        await super()._answer_like_vllm(reader, writer, req, line)


async def _send_and_leave(h: Harness, body: dict) -> None:
    """Send a request on a raw connection, and hang up once the engine has it."""
    engine = h.engines["demo"]
    seen = len(engine.requests)
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", h.gw.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer " + APP_KEY.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload
    )
    await writer.drain()
    for _ in range(200):
        if len(engine.requests) > seen:
            break
        await asyncio.sleep(0.01)
    writer.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_is_charged_for_what_the_engine_started(tmp_path, stream):
    """Non-streamed: the engine never says what it generated for a client that left, so the
    reservation is charged. Streamed, gone before the first token: at least the prompt."""

    async def go():
        engine = SlowEngine(0.5, tokens=["ok"], prompt_tokens=9)
        # 10,000 a day: a token comes back every 8.6 s, so the figures below are not blurred by refill
        async with Harness(quota_policy(tmp_path, tokens_per_day=10_000), {"demo": engine}) as h:
            await _send_and_leave(h, {**CHAT, "max_tokens": 400, "stream": stream})
            reserved = await h.reserved_after_settling("acme")
            after = await h.post({**CHAT, "max_tokens": 1})
            return reserved, after, h.audit_records()

    reserved, after, records = run(go())
    left, follow = records
    assert left["status"] == 499 and reserved == 0
    charged = 10_000 - follow["reserved_tokens"] - int(after.headers["x-ratelimit-remaining-tokens"])
    prompt = left["prompt_tokens"]
    assert prompt > 0
    assert charged == (left["reserved_tokens"] if not stream else prompt)
    assert left["reserved_tokens"] == prompt + 400
