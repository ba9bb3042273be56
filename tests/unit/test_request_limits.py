"""Hostile request bodies: a 400 naming the field, never a 500.

Each part checks serving/gateway/request_body.py directly, then drives the gateway over HTTP in
front of a stand-in engine (the Harness of test_policy_gateway.py).
"""

from __future__ import annotations

import orjson
import pytest

from serving.errors import GatewayError
from serving.gateway.request_body import MAX_JSON_DEPTH, parse
from tests.unit.fake_engine import FakeEngine
from tests.unit.test_policy_gateway import APP_KEY, Harness, error_of, policy, run

CHAT_PATH = "/v1/chat/completions"


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


@pytest.mark.parametrize("raw, param", [
    (b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', "messages.0.content"),
    (b'{"user": "\\udc00"}', "user"),
    (b'{"extra": {"deep": ["ok", "\\ud83d"]}}', "extra.deep.1"),
    (b'{"\\ud800": 1}', "\\ud800"),
])
def test_a_lone_surrogate_is_a_400_naming_its_field(raw, param):
    err = refused(parse, raw)
    assert err.param == param and "surrogate" in err.message
    err.message.encode("utf-8")  # the error itself is valid text (it goes to the audit log)


@pytest.mark.parametrize("raw, param", [
    (b'{"temperature": NaN}', "temperature"),
    (b'{"logit_bias": {"7": Infinity}}', "logit_bias.7"),
    (b'{"x": [1, -Infinity]}', "x.1"),
    (b'{"top_p": 1e400}', "top_p"),
])
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
    }

    async def go():
        async with Harness(quota_policy(tmp_path, tokens_per_minute=100_000), {"demo": FakeEngine(tokens=["ok"])}) as h:
            out = {name: await h.client.post(CHAT_PATH, content=body, headers=headers) for name, body in bodies.items()}
            big = b"{" + stream + b', "extra": 18446744073709551616}'  # orjson.dumps refused it: a 500
            out["big_int"] = await h.client.post(CHAT_PATH, content=big, headers=headers)
            return out, h.engines["demo"].requests, h.audit_records()

    out, engine_requests, records = run(go())
    assert {name: (r.status_code, error_of(r)["param"]) for name, r in out.items() if name != "big_int"} == {
        "deep": (400, "extra"), "deep_300": (400, "extra"), "surrogate": (400, "messages.0.content")}
    assert out["big_int"].status_code == 200
    assert len(engine_requests) == 1  # only the big integer reached the engine
    assert [r["status"] for r in records] == [400, 400, 400, 200]
