"""Keep-alive connections from the gateway to engines (serving/gateway/engine_conns.py): reused
only after a whole response, never after a client left or an error, dropped with their replica,
and a request the engine dropped on a reused connection is sent again on a fresh one."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import yaml

from serving.config import REPO_ROOT, ConfigError, parse_config
from serving.gateway.engine_conns import EngineConnections
from serving.gateway.limits import HttpLimits
from tests.unit.fake_engine import FakeEngine
from tests.unit.test_gateway import CHAT, error_of, hang_up_mid_stream, run, start_gateway
from tests.unit.test_policy_gateway import Harness, policy, sse_text

PLAIN = {**CHAT, "stream": False}
LOCAL = REPO_ROOT / "configs" / "local.yaml"


def events(text: str) -> list[str]:
    return [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]


def test_sequential_requests_share_one_engine_connection():
    async def go():
        engine = FakeEngine(chunks=5, keep_alive=True)
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            answers = [await c.post("/v1/chat/completions", json=CHAT if i % 2 else PLAIN) for i in range(6)]
            connections = engine.connections
            metrics = (await c.get("/metrics")).text  # (its engine metrics come on another connection)
        await gw.stop()
        await engine.stop()
        return engine, answers, metrics, connections

    engine, answers, metrics, connections = run(go())
    assert 'keel_engine_connections_opened_total{model="demo"} 1.0' in metrics
    assert [r.status_code for r in answers] == [200] * 6
    for i, r in enumerate(answers):
        if i % 2:  # streamed: every event and the end, in order
            assert events(r.text) == [json.dumps({"choices": [{"delta": {"content": f"t{j}"}}]}) for j in range(5)] + [
                "[DONE]"
            ]
        else:
            assert r.json()["choices"][0]["message"]["content"] == "ok"
    assert engine.completed == 6
    assert connections == 1
    assert all(h.get("connection") != "close" for _, h, _ in engine.requests)


def test_concurrent_requests_reuse_at_most_as_many_connections_as_were_in_flight():
    async def go():
        engine = FakeEngine(chunks=20, delay=0.002, keep_alive=True)
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            for _ in range(3):
                rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT) for _ in range(8)))
                assert all(r.status_code == 200 and events(r.text)[-1] == "[DONE]" for r in rs)
        idle = gw.engine_conns.idle_count()
        await gw.stop()
        await engine.stop()
        return engine, idle

    engine, idle = run(go())
    assert engine.completed == 24
    assert engine.connections <= 8
    assert idle == engine.connections


def test_a_client_that_leaves_aborts_its_engine_connection_which_is_not_reused():
    async def go():
        engine = FakeEngine(chunks=200, delay=0.01, keep_alive=True)
        gw, url = await start_gateway(engine)
        await hang_up_mid_stream(url, engine)
        idle = gw.engine_conns.idle_count()
        engine.chunks = 2
        async with httpx.AsyncClient(base_url=url) as c:
            after = await c.post("/v1/chat/completions", json=CHAT)
        await gw.stop()
        await engine.stop()
        return engine, idle, after

    engine, idle, after = run(go())
    assert engine.disconnects == 1  # the engine saw the hang-up: it stops generating
    assert idle == 0
    assert after.status_code == 200 and events(after.text)[-1] == "[DONE]"
    assert engine.connections == 2  # the next request did not get the aborted connection


def test_a_request_the_engine_drops_on_a_reused_connection_is_sent_again_on_a_fresh_one():
    async def go():
        engine = FakeEngine(chunks=3, keep_alive=True, drop_reused=1)
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            first = await c.post("/v1/chat/completions", json=CHAT)
            second = await c.post("/v1/chat/completions", json=CHAT)
            connections = engine.connections
            metrics = (await c.get("/metrics")).text  # (its engine metrics come on another connection)
        await gw.stop()
        await engine.stop()
        return engine, first, second, metrics, connections

    engine, first, second, metrics, connections = run(go())
    assert first.status_code == second.status_code == 200
    assert events(second.text)[-1] == "[DONE]"
    assert engine.dropped == 1
    assert connections == 2
    assert engine.completed == 2  # the dropped request was generated once, on the fresh connection
    assert 'keel_requests_total{model="demo",status="200",tenant="-",variant="demo"} 2.0' in metrics


def test_an_engine_error_is_answered_at_its_end_and_its_connection_is_not_reused():
    async def go():
        engine = FakeEngine(error_status=400, error_body=b'{"error": {"message": "bad n"}}', keep_alive=True)
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url, timeout=5) as c:
            first = await c.post("/v1/chat/completions", json=CHAT)
            engine.error_status = None
            second = await c.post("/v1/chat/completions", json=CHAT)
        await gw.stop()
        await engine.stop()
        return engine, first, second

    engine, first, second = run(go())
    assert first.status_code == 400 and "bad n" in error_of(first)["message"]
    assert second.status_code == 200
    assert engine.connections == 2


def test_an_engine_that_says_close_gets_a_connection_per_request():
    async def go():
        # Answers `connection: close` (as a draining uvicorn does) but would serve another
        # request on the connection: only the header can keep the gateway from reusing it.
        engine = FakeEngine(chunks=2, keep_alive=True, says_close=True)
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            rs = [await c.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
        idle = gw.engine_conns.idle_count()
        await gw.stop()
        await engine.stop()
        return engine, rs, idle

    engine, rs, idle = run(go())
    assert [r.status_code for r in rs] == [200] * 3
    assert engine.connections == 3 and idle == 0


def test_pool_size_zero_tells_the_engine_to_close():
    async def go():
        engine = FakeEngine(chunks=2, keep_alive=True)
        gw, url = await start_gateway(engine, limits=HttpLimits(engine_keepalive_connections=0))
        async with httpx.AsyncClient(base_url=url) as c:
            rs = [await c.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
        await gw.stop()
        await engine.stop()
        return engine, rs

    engine, rs = run(go())
    assert [r.status_code for r in rs] == [200] * 3
    assert engine.connections == 3
    assert all(h.get("connection") == "close" for _, h, _ in engine.requests)


def test_a_replica_that_leaves_the_registry_takes_its_idle_connections():
    async def go():
        engine, other = FakeEngine(chunks=2, keep_alive=True), FakeEngine(chunks=2, keep_alive=True)
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
            before = gw.engine_conns.idle_count()
            port = await other.start()
            gw.update_endpoints({"demo": [{"model": "demo", "replica_id": "r2", "host": "127.0.0.1", "port": port}]})
            after = gw.engine_conns.idle_count()
            r = await c.post("/v1/chat/completions", json=CHAT)
        await gw.stop()
        for e in (engine, other):
            await e.stop()
        return before, after, r, other

    before, after, r, other = run(go())
    assert (before, after) == (1, 0)
    assert r.status_code == 200 and other.completed == 1


def test_inspected_streams_reuse_connections_and_keep_their_policies(tmp_path):
    tokens = ["Write to ", "jo", "hn.", "smith", "@", "exam", "ple", ".org", " today", "."]

    async def go():
        engine = FakeEngine(tokens=tokens, keep_alive=True)
        async with Harness(policy(tmp_path), {"demo": engine}) as h:
            rs = [await h.post({**CHAT, "stream": stream}) for stream in (True, False, True)]
            return engine, rs, h.audit_records()

    engine, rs, records = run(go())
    assert [r.status_code for r in rs] == [200] * 3
    assert sse_text(rs[0])[0] == sse_text(rs[2])[0] == "Write to [EMAIL] today."
    assert rs[1].json()["choices"][0]["message"]["content"] == "Write to [EMAIL] today."
    assert [r["completion_tokens"] for r in records] == [len(tokens)] * 3
    assert engine.connections == 1


@pytest.mark.parametrize(
    "key, value",
    [
        ("engine_keepalive_connections", -1),
        ("engine_keepalive_connections", 5000),
        ("engine_keepalive_s", 0),
        ("engine_keepalive_s", 61),
    ],
)
def test_pool_limits_out_of_range_are_refused_naming_the_key(key, value):
    doc = yaml.safe_load(LOCAL.read_text())
    doc["server"]["limits"] = {key: value}
    with pytest.raises(ConfigError, match=f"server.limits.{key}"):
        parse_config(doc, check_engine_args=False)


# -- the pool on its own (a stand-in transport and clock) ----------------------------------------


class FakeTransport:
    def __init__(self):
        self.closed = False
        self.protocol = None

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def is_reading(self):
        return True

    def set_protocol(self, protocol):
        self.protocol = protocol


def test_the_pool_is_bounded_per_replica_and_takes_newest_first():
    pool = EngineConnections(per_replica=2, keepalive_s=3.0, clock=lambda: 0.0)
    a, b, c = FakeTransport(), FakeTransport(), FakeTransport()
    for t in (a, b, c):
        pool.give("r1", t)
    assert c.closed and not a.closed and not b.closed  # past the bound: closed
    assert pool.take("r1") is b
    assert pool.take("r1") is a
    assert pool.take("r1") is None


def test_a_connection_idle_past_keepalive_is_closed_not_used():
    now = [0.0]
    pool = EngineConnections(per_replica=4, keepalive_s=3.0, clock=lambda: now[0])
    old, new = FakeTransport(), FakeTransport()
    pool.give("r1", old)
    now[0] = 2.0
    pool.give("r1", new)
    now[0] = 4.0  # old is 4 s idle, new 2 s
    pool.sweep()
    assert old.closed and not new.closed
    now[0] = 5.5
    assert pool.take("r1") is None and new.closed


def test_an_idle_connection_the_engine_closes_leaves_the_pool():
    pool = EngineConnections(per_replica=4, keepalive_s=3.0, clock=lambda: 0.0)
    t = FakeTransport()
    pool.give("r1", t)
    t.protocol.eof_received()
    t.protocol.connection_lost(None)
    assert pool.idle_count("r1") == 0 and pool.take("r1") is None


class EmptyAnswers(FakeEngine):
    """Answers every request with a 200 and an empty body (content-length: 0)."""

    async def _answer_plain(self, reader, writer, stream: bool) -> None:
        writer.write(self._head(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"))


def test_an_empty_answer_read_by_the_policies_ends_at_once_and_keeps_its_connection(tmp_path):
    """No read follows an empty body: the response must end at its head, not at an EOF the
    engine never sends on a kept-alive connection."""

    async def go():
        engine = EmptyAnswers(keep_alive=True)
        async with Harness(policy(tmp_path), {"demo": engine}) as h:
            rs = [await asyncio.wait_for(h.post(PLAIN), 3) for _ in range(2)]
            return engine, rs

    engine, rs = run(go())
    assert [(r.status_code, r.content) for r in rs] == [(200, b"")] * 2
    assert engine.connections == 1
