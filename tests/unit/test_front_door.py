"""The front door under hostile clients: limits, timeouts, pipelining, HTTP/1.0, cut streams.

A raw-socket client, so that what goes on the wire is exactly what an attacker sends; limits
and timeouts are set small so each case takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.gateway.limits import HttpLimits
from serving.gateway.server import Gateway, GatewaySettings
from serving.gateway.stages import Pipeline, default_stages
from tests.unit.fake_engine import FakeEngine

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def fast_limits(**over) -> HttpLimits:
    base = dict(header_timeout_s=0.3, body_timeout_s=0.3, keepalive_timeout_s=0.3)
    return HttpLimits(**{**base, **over})


async def gateway(engine: FakeEngine | None = None, **limits) -> Gateway:
    gw = Gateway(GatewaySettings(port=0, limits=fast_limits(**limits)), ["demo"], Pipeline(default_stages(["demo"])))
    if engine is not None:
        port = await engine.start()
        gw.update_endpoints({"demo": [{"model": "demo", "replica_id": "r1", "host": "127.0.0.1", "port": port}]})
    await gw.start()
    return gw


def post(body: dict | bytes = CHAT, path: str = "/v1/chat/completions", version: str = "1.1", extra: str = "") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (
        f"POST {path} HTTP/{version}\r\nhost: x\r\ncontent-type: application/json\r\n{extra}"
        f"content-length: {len(data)}\r\n\r\n"
    ).encode() + data


async def read_all(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    """Everything until the gateway closes the connection."""
    return await asyncio.wait_for(reader.read(-1), timeout)


def responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split a byte stream of HTTP/1.1 responses (content-length or chunked) into (status, headers, body)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, data = rest[:n], rest[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    rest = rest[2:]
                    break
                body += rest[:size]
                rest = rest[size + 2 :]
            data = rest
        else:
            body, data = rest, b""
        out.append((status, headers, body))
    return out


def requests_total(gw: Gateway, status: str) -> float:
    for fam in gw.metrics.registry.collect():
        for s in fam.samples:
            if s.name == "keel_requests_total" and s.labels["status"] == status:
                return s.value
    return 0.0


# -- times ---------------------------------------------------------------------------------------


def test_a_head_sent_a_byte_at_a_time_gets_408_and_the_connection_closes():
    async def go():
        gw = await gateway()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        started = asyncio.get_running_loop().time()
        for ch in b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ":
            writer.write(bytes([ch]))
            await asyncio.sleep(0.02)
            if reader.at_eof():
                break
        data = await read_all(reader)
        elapsed = asyncio.get_running_loop().time() - started
        await gw.stop()
        return data, elapsed, gw

    data, elapsed, gw = run(go())
    [(status, headers, body)] = responses(data)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert headers["connection"] == "close"
    assert requests_total(gw, "408") == 1


def test_a_body_that_trickles_gets_408():
    async def go():
        gw = await gateway(FakeEngine())
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
        data = await read_all(reader)
        await gw.stop()
        return data

    [(status, _, body)] = responses(run(go()))
    assert status == 408 and "body" in json.loads(body)["error"]["message"]


def test_idle_connections_are_closed_after_the_keepalive_timeout():
    async def go():
        engine = FakeEngine()
        gw = await gateway(engine)
        silent_r, _ = await asyncio.open_connection("127.0.0.1", gw.port)  # never sends a byte
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(post({**CHAT, "stream": False}))
        first = await asyncio.wait_for(reader.readuntil(b'"ok"}}]}'), 5)
        rest = await read_all(reader)  # the gateway closes it, idle after its answer
        silent = await read_all(silent_r)
        count = gw.connections
        await gw.stop()
        await engine.stop()
        return first, rest, silent, count

    first, rest, silent, count = run(go())
    assert first.startswith(b"HTTP/1.1 200")
    assert rest == b"" and silent == b""  # closed without a word, as uvicorn does
    assert count == 0


# -- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head,status",
    [
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n", 414),
        (b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 40_000 + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(200)) + b"\r\n", 431),
        (b"GET /health HTTP/1.1\r\nx-big: " + b"a" * 2_000_000, 431),  # never ends: refused as it grows
    ],
)
def test_oversized_heads_are_refused(head, status):
    async def go():
        gw = await gateway()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(head)
        data = await read_all(reader)
        await gw.stop()
        return data, gw

    data, gw = run(go())
    [(got, headers, body)] = responses(data)
    assert got == status and headers["connection"] == "close"
    assert json.loads(body)["error"]["request_id"]
    assert requests_total(gw, str(status)) == 1


def test_a_body_over_the_limit_is_413_before_it_is_sent():
    async def go():
        engine = FakeEngine()
        gw = await gateway(engine, max_body_bytes=4096)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # answered with no body sent
        await gw.stop()
        await engine.stop()
        return head, engine

    head, engine = run(go())
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head
    assert engine.requests == []


def test_a_chunked_body_over_the_limit_is_413():
    async def go():
        gw = await gateway(FakeEngine(), max_body_bytes=4096)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(10):
            writer.write(b"400\r\n" + b"a" * 1024 + b"\r\n")
        data = await read_all(reader)
        held = gw.body_bytes
        await gw.stop()
        return data, held

    data, held = run(go())
    assert responses(data)[0][0] == 413
    assert held == 0


# -- capacity ------------------------------------------------------------------------------------


def test_connections_past_the_cap_get_503_and_a_closed_socket_then_room_again():
    async def go():
        gw = await gateway(keepalive_timeout_s=5)
        gw.max_connections = 2
        held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        r3, _ = await asyncio.open_connection("127.0.0.1", gw.port)
        refused = await read_all(r3)
        held[0][1].close()
        await asyncio.sleep(0.1)
        r4, w4 = await asyncio.open_connection("127.0.0.1", gw.port)
        w4.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        again = await asyncio.wait_for(r4.readuntil(b"\r\n\r\n"), 5)
        await gw.stop()
        return refused, again

    refused, again = run(go())
    [(status, headers, _)] = responses(refused)
    assert status == 503 and headers["retry-after"] == "1"
    assert again.split(b"\r\n")[0] in (b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Service Unavailable")


def test_requests_past_the_in_flight_cap_get_503_without_their_body_being_read():
    async def go():
        engine = FakeEngine(chunks=30, delay=0.02)
        gw = await gateway(engine, max_requests_in_flight=1, body_timeout_s=5)
        r1, w1 = await asyncio.open_connection("127.0.0.1", gw.port)
        w1.write(post())
        await asyncio.wait_for(r1.readuntil(b"data: "), 5)  # streaming now
        r2, w2 = await asyncio.open_connection("127.0.0.1", gw.port)
        w2.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5000000\r\n\r\n")
        refused = await asyncio.wait_for(r2.readuntil(b"\r\n\r\n"), 5)
        rest = await read_all(r1)
        await gw.stop()
        await engine.stop()
        return refused, rest, engine

    refused, rest, engine = run(go())
    assert refused.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in refused
    assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the first stream was not disturbed
    assert len(engine.requests) == 1


def test_the_body_budget_refuses_what_would_pass_it_and_comes_back():
    async def go():
        engine = FakeEngine()
        gw = await gateway(
            engine, max_buffered_body_bytes=2 * 1024 * 1024, max_body_bytes=1536 * 1024, body_timeout_s=5
        )
        r1, w1 = await asyncio.open_connection("127.0.0.1", gw.port)
        w1.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1500000\r\n\r\n{")
        await asyncio.sleep(0.1)  # its 1.5 MB are held from its head on
        r2, w2 = await asyncio.open_connection("127.0.0.1", gw.port)
        w2.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n")
        refused = await asyncio.wait_for(r2.readuntil(b"\r\n\r\n"), 5)
        w1.close()
        await asyncio.sleep(0.1)
        held = gw.body_bytes
        r3, w3 = await asyncio.open_connection("127.0.0.1", gw.port)
        w3.write(post({**CHAT, "stream": False}))
        ok = await asyncio.wait_for(r3.readuntil(b"\r\n\r\n"), 5)
        await gw.stop()
        await engine.stop()
        return refused, held, ok

    refused, held, ok = run(go())
    assert refused.startswith(b"HTTP/1.1 503")
    assert held == 0
    assert ok.startswith(b"HTTP/1.1 200")


# -- pipelining ----------------------------------------------------------------------------------


def test_a_malformed_request_pipelined_behind_a_stream_is_answered_after_it():
    async def go():
        engine = FakeEngine(chunks=10, delay=0.01)
        gw = await gateway(engine)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(post() + b"GARBAGE / HTTP/1.1\r\n\r\n")
        data = await read_all(reader)
        await gw.stop()
        await engine.stop()
        return data

    first, second = responses(run(go()))
    assert first[0] == 200 and first[2].endswith(b"data: [DONE]\n\n")
    assert second[0] == 400 and json.loads(second[2])["error"]["code"] == "malformed_request"


def test_pipelined_requests_are_answered_in_order_and_read_only_when_their_turn_nears():
    async def go():
        engine = FakeEngine(chunks=5, delay=0.02)
        gw = await gateway(engine)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        pad = "x" * 200_000  # each request is many reads long
        writer.write(
            b"".join(post({**CHAT, "user": pad, "messages": [{"role": "user", "content": f"n{i}"}]}) for i in range(6))
        )
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        held = []
        task = asyncio.ensure_future(read_all(reader))
        while not task.done():
            held.append((gw.requests_in_flight, gw.body_bytes))
            await asyncio.sleep(0.005)
        data = task.result()
        await gw.stop()
        await engine.stop()
        return data, held, engine

    data, held, engine = run(go())
    assert [s for s, _, _ in responses(data)] == [200] * 7
    prompts = [json.loads(b)["messages"][0]["content"] for _, _, b in engine.requests]
    assert prompts == [f"n{i}" for i in range(6)]
    # the one being answered, the one waiting, and at most the head of the next: never all six
    assert max(n for n, _ in held) <= 3
    assert max(b for _, b in held) <= 3 * 201_000


# -- HTTP/1.0 ------------------------------------------------------------------------------------


def test_http10_clients_get_a_stream_without_chunked_framing():
    async def go():
        engine = FakeEngine(chunks=3)
        gw = await gateway(engine)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(post(version="1.0"))
        data = await read_all(reader)
        await gw.stop()
        await engine.stop()
        return data

    data = run(go())
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) == 4
    assert all(e.startswith("data: ") for e in events)  # no chunk-size lines in the body


# -- engine faults -------------------------------------------------------------------------------


def test_a_stream_cut_by_an_engine_death_ends_with_an_error_event_and_a_clean_end():
    async def go():
        engine = FakeEngine(chunks=10, die_after=3)
        gw = await gateway(engine)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(post())
        first = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 5)
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        after = await read_all(reader)  # the connection is still good for the next request
        await gw.stop()
        await engine.stop()
        return first, after, gw

    first, after, gw = run(go())
    [(status, _, body)] = responses(first)
    events = [e for e in body.decode().split("\n\n") if e]
    assert status == 200 and len(events) == 4
    err = json.loads(events[-1][6:])["error"]
    assert err["code"] == "engine_failure" and err["type"] == "server_error"
    assert responses(after)[0][0] == 200
    assert requests_total(gw, "502") == 1


def test_an_engine_that_goes_silent_is_given_up_on_with_504():
    async def go():
        engine = FakeEngine(chunks=3, delay=30)  # one event, then nothing for half a minute
        gw = await gateway(engine, engine_idle_timeout_s=0.4)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(post())
        streamed = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 10)
        # an engine that takes the request and never answers at all
        mute = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        gw.update_endpoints(
            {
                "demo": [
                    {
                        "model": "demo",
                        "replica_id": "mute",
                        "host": "127.0.0.1",
                        "port": mute.sockets[0].getsockname()[1],
                    }
                ]
            }
        )
        writer.write(post({**CHAT, "stream": False}))
        silent = await asyncio.wait_for(reader.readuntil(b"}}"), 10)
        await gw.stop()
        await engine.stop()
        mute.close()
        return streamed, silent, gw

    streamed, silent, gw = run(go())
    events = [e for e in responses(streamed)[0][2].decode().split("\n\n") if e]
    assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == "t0"
    assert json.loads(events[-1][6:])["error"]["code"] == "engine_timeout"
    status, _, body = responses(silent)[0]
    assert status == 504 and json.loads(body)["error"]["code"] == "engine_timeout"
    assert requests_total(gw, "504") == 2
