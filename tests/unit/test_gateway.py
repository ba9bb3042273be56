"""The gateway's request path and byte relay, against a stand-in engine (no Ray, no vLLM)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serving.errors import GatewayError
from serving.gateway.limits import HttpLimits
from serving.gateway.server import Gateway, GatewaySettings
from serving.gateway.stages import Pipeline, default_stages
from tests.unit.fake_engine import FakeEngine

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def start_gateway(engine: FakeEngine | None, models=("demo",), stages=None, **settings):
    gw = Gateway(
        GatewaySettings(port=0, reuse_port=False, **settings),
        list(models),
        Pipeline(stages if stages is not None else default_stages(list(models))),
    )
    if engine is not None:
        port = await engine.start()
        gw.update_endpoints({"demo": [{"model": "demo", "replica_id": "r1", "host": "127.0.0.1", "port": port}]})
    await gw.start()
    return gw, f"http://127.0.0.1:{gw.port}"


async def post_once(engine: FakeEngine, body: dict = CHAT, **settings) -> httpx.Response:
    """One POST /v1/chat/completions through a fresh gateway in front of engine."""
    gw, url = await start_gateway(engine, **settings)
    try:
        async with httpx.AsyncClient(base_url=url) as c:
            return await c.post("/v1/chat/completions", json=body)
    finally:
        await gw.stop()
        await engine.stop()


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    return body["error"]


def test_stream_is_relayed_byte_for_byte_with_request_id():
    async def go():
        engine = FakeEngine(chunks=5)
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
        await gw.stop()
        await engine.stop()
        return r, engine

    r, engine = run(go())
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert "server" not in r.headers  # engine internals are not advertised
    events = [e for e in r.text.split("\n\n") if e]
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]] == [f"t{i}" for i in range(5)]
    assert events[-1] == "data: [DONE]"
    assert len(r.headers["x-request-id"]) == 32
    # the engine got the body unchanged and the same request id
    line, headers, body = engine.requests[0]
    assert line == "POST /v1/chat/completions HTTP/1.1"
    assert json.loads(body) == CHAT
    assert headers["x-request-id"] == r.headers["x-request-id"]


def test_client_request_id_is_echoed_and_authorization_not_forwarded():
    async def go():
        engine = FakeEngine()
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post(
                "/v1/chat/completions",
                json={**CHAT, "stream": False},
                headers={"x-request-id": "abc-123", "authorization": "Bearer secret"},
            )
        await gw.stop()
        await engine.stop()
        return r, engine

    r, engine = run(go())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    assert r.headers["x-request-id"] == "abc-123"
    _, headers, _ = engine.requests[0]
    assert headers["x-request-id"].startswith("abc-123-")  # unique per request inside the engine
    assert "authorization" not in headers


def test_keep_alive_serves_several_requests_on_one_connection():
    async def go():
        engine = FakeEngine(chunks=2)
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            rs = [await c.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
            rs.append(await c.post("/v1/chat/completions", json={**CHAT, "stream": False}))
        await gw.stop()
        await engine.stop()
        return rs

    rs = run(go())
    assert [r.status_code for r in rs] == [200] * 4
    assert all(r.text.endswith("data: [DONE]\n\n") for r in rs[:3])
    assert len({r.headers["x-request-id"] for r in rs}) == 4


@pytest.mark.parametrize(
    "body,status,code",
    [
        (b'{"model": "demo", "messages": [', 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"", 400, None),
        (b'{"messages": []}', 400, None),
        (b'{"model": "nope", "messages": []}', 404, "model_not_found"),
    ],
)
def test_bad_requests_get_openai_errors_and_never_reach_the_engine(body, status, code):
    async def go():
        engine = FakeEngine()
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            metrics = (await c.get("/metrics")).text
        await gw.stop()
        await engine.stop()
        return r, engine, metrics

    r, engine, metrics = run(go())
    assert r.status_code == status
    err = error_of(r)
    assert err["code"] == code
    assert "Traceback" not in err["message"]
    assert engine.requests == []
    assert f'keel_requests_total{{model="-",status="{status}",tenant="-",variant="-"}} 1.0' in metrics


def test_no_ready_replica_is_503_with_retry_after_and_health_says_starting():
    async def go():
        gw, url = await start_gateway(None)
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            h = await c.get("/health")
        await gw.stop()
        return r, h

    r, h = run(go())
    assert r.status_code == 503 and r.headers["retry-after"]
    assert error_of(r)["code"] == "model_not_ready"
    assert h.status_code == 503 and h.json()["replicas"] == {"demo": 0}


def test_unreachable_replica_is_skipped_for_a_live_one():
    async def go():
        engine = FakeEngine()
        gw, url = await start_gateway(engine)
        live = gw.pool.all()[0]
        dead = {"model": "demo", "replica_id": "r0", "host": "127.0.0.1", "port": 1}
        gw.update_endpoints(
            {"demo": [dead, {"model": "demo", "replica_id": live.replica_id, "host": live.host, "port": live.port}]}
        )
        async with httpx.AsyncClient(base_url=url) as c:
            rs = [await c.post("/v1/chat/completions", json={**CHAT, "stream": False}) for _ in range(4)]
        await gw.stop()
        await engine.stop()
        return rs

    assert [r.status_code for r in run(go())] == [200] * 4


def test_engine_errors_are_reshaped_keeping_status_and_message():
    vllm_body = json.dumps(
        {
            "error": {
                "message": "max_tokens=9000 cannot be greater than max_model_len=512.",
                "type": "BadRequestError",
                "param": "max_tokens",
                "code": 400,
            }
        }
    ).encode()

    r = run(post_once(FakeEngine(error_status=400, error_body=vllm_body)))
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == "max_tokens"
    assert "max_model_len=512" in err["message"]


def test_engine_500_does_not_leak_internals():
    engine = FakeEngine(error_status=500, error_body=b'{"error": {"message": "CUDA error at /src/kernel.cu:12"}}')
    r = run(post_once(engine))
    assert r.status_code == 500
    assert "kernel.cu" not in error_of(r)["message"]


async def hang_up_mid_stream(url: str, engine: FakeEngine) -> None:
    """Read one piece of a stream, hang up, and wait (at most 2 s) for the engine to see it."""
    async with httpx.AsyncClient(base_url=url) as c, c.stream("POST", "/v1/chat/completions", json=CHAT) as r:
        async for _ in r.aiter_bytes():
            break
    for _ in range(100):
        if engine.disconnects:
            break
        await asyncio.sleep(0.02)


def test_client_disconnect_mid_stream_closes_the_engine_connection():
    async def go():
        engine = FakeEngine(chunks=200, delay=0.01)
        gw, url = await start_gateway(engine)
        await hang_up_mid_stream(url, engine)
        async with httpx.AsyncClient(base_url=url) as c:
            metrics = (await c.get("/metrics")).text
        await gw.stop()
        await engine.stop()
        return engine, metrics, gw

    engine, metrics, gw = run(go())
    assert engine.disconnects == 1 and engine.completed == 0
    assert 'keel_requests_total{model="demo",status="499",tenant="-",variant="demo"} 1.0' in metrics
    assert gw.pool.all()[0].in_flight == 0


def test_oversized_body_is_413():
    engine = FakeEngine()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = run(post_once(engine, big, limits=HttpLimits(max_body_bytes=2048)))
    assert r.status_code == 413 and error_of(r)["type"] == "invalid_request_error"
    assert engine.requests == []


def test_models_health_and_unknown_routes():
    async def go():
        engine = FakeEngine()
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            out = [
                await c.get("/v1/models"),
                await c.get("/v1/models/demo"),
                await c.get("/v1/models/x"),
                await c.get("/health"),
                await c.get("/v1/nothing"),
                await c.get("/v1/chat/completions"),
            ]
        await gw.stop()
        await engine.stop()
        return out

    models, card, missing, health, nothing, wrong_method = run(go())
    assert [m["id"] for m in models.json()["data"]] == ["demo"]
    assert card.json()["id"] == "demo"
    assert missing.status_code == 404
    assert health.status_code == 200 and health.json()["replicas"] == {"demo": 1}
    assert nothing.status_code == 404 and error_of(nothing)
    assert wrong_method.status_code == 405


def test_metrics_count_requests_by_model_and_status():
    async def go():
        engine = FakeEngine()
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            for _ in range(3):
                await c.post("/v1/chat/completions", json=CHAT)
            await c.post("/v1/chat/completions", json={**CHAT, "model": "other"})
            text = (await c.get("/metrics")).text
        await gw.stop()
        await engine.stop()
        return text

    text = run(go())
    assert 'keel_requests_total{model="demo",status="200",tenant="-",variant="demo"} 3.0' in text
    assert 'keel_requests_total{model="-",status="404",tenant="-",variant="-"} 1.0' in text
    assert 'keel_request_duration_seconds_count{model="demo"} 3.0' in text
    assert 'keel_time_to_first_byte_seconds_count{model="demo"} 3.0' in text


class _RejectEverything:
    name = "reject"

    def __init__(self):
        self.completed = []

    async def on_request(self, ctx):
        ctx.response_headers["x-why"] = "policy"
        raise GatewayError(403, "not today", code="forbidden")

    def on_complete(self, ctx, outcome):
        self.completed.append(outcome.status)


def test_a_stage_can_reject_and_every_entered_stage_sees_completion():
    stage = _RejectEverything()

    async def go():
        engine = FakeEngine()
        gw, url = await start_gateway(engine, stages=[*default_stages(["demo"]), stage])
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            bad = await c.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
        await gw.stop()
        await engine.stop()
        return r, bad, engine

    r, bad, engine = run(go())
    assert r.status_code == 403 and r.headers["x-why"] == "policy" and error_of(r)["code"] == "forbidden"
    assert bad.status_code == 400
    assert stage.completed == [403]  # the malformed request never reached this stage
    assert engine.requests == []


def test_metrics_include_engine_metrics_labelled_by_replica():
    async def go():
        engine = FakeEngine()
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            text = (await c.get("/metrics")).text
        await gw.stop()
        await engine.stop()
        return text

    text = run(go())
    assert 'vllm:num_requests_running{engine="0",model_name="demo",replica="r1"} 2.0' in text
    assert "python_gc_objects_collected_total{" not in text.split("vllm:")[-1]


def test_one_base_url_routes_each_model_to_its_own_replicas():
    async def go():
        a, b = FakeEngine(chunks=1), FakeEngine(chunks=1)
        pa, pb = await a.start(), await b.start()
        gw = Gateway(
            GatewaySettings(port=0, reuse_port=False), ["alpha", "beta"], Pipeline(default_stages(["alpha", "beta"]))
        )
        gw.update_endpoints(
            {
                "alpha": [{"model": "alpha", "replica_id": "a1", "host": "127.0.0.1", "port": pa}],
                "beta": [{"model": "beta", "replica_id": "b1", "host": "127.0.0.1", "port": pb}],
            }
        )
        await gw.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            for model in ("alpha", "beta", "beta"):
                assert (await c.post("/v1/completions", json={"model": model, "prompt": "x"})).status_code == 200
            models = (await c.get("/v1/models")).json()
        await gw.stop()
        await a.stop()
        await b.stop()
        return a, b, models

    a, b, models = run(go())
    assert [json.loads(body)["model"] for _, _, body in a.requests] == ["alpha"]
    assert [json.loads(body)["model"] for _, _, body in b.requests] == ["beta", "beta"]
    assert [m["id"] for m in models["data"]] == ["alpha", "beta"]


def test_expect_100_continue_is_answered_at_once():
    async def go():
        engine = FakeEngine()
        gw, url = await start_gateway(engine)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        body = json.dumps({**CHAT, "stream": False}).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)  # curl would wait 1 s
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        await gw.stop()
        await engine.stop()
        return interim, final

    interim, final = run(go())
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert final.startswith(b"HTTP/1.1 200 OK")


def test_a_draining_gateway_refuses_new_connections_and_finishes_its_streams():
    async def go():
        engine = FakeEngine(chunks=20, delay=0.05)  # about a second of answer
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            in_flight = asyncio.ensure_future(c.post("/v1/chat/completions", json=CHAT))
            while gw.requests_in_flight == 0:
                await asyncio.sleep(0.01)
            drained = asyncio.ensure_future(gw.drain(30))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.ConnectError):  # a new client: the port no longer listens
                async with httpx.AsyncClient(base_url=url) as fresh:
                    await fresh.get("/health")
            r = await in_flight
            left = await drained
        await gw.stop()
        await engine.stop()
        return r, left

    r, left = run(go())
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")  # the stream ran to its end
    assert left == 0


def test_the_drain_gives_up_after_its_timeout():
    async def go():
        engine = FakeEngine(chunks=200, delay=0.05)  # ten seconds of answer
        gw, url = await start_gateway(engine)
        async with httpx.AsyncClient(base_url=url) as c:
            in_flight = asyncio.ensure_future(c.post("/v1/chat/completions", json=CHAT))
            while gw.requests_in_flight == 0:
                await asyncio.sleep(0.01)
            left = await gw.drain(0.3)
            in_flight.cancel()
        await gw.stop()
        await engine.stop()
        return left

    assert run(go()) == 1


def test_models_change_live_on_the_gateway():
    async def go():
        engine = FakeEngine()
        gw, url = await start_gateway(engine, models=("demo",))
        async with httpx.AsyncClient(base_url=url) as c:
            gw.set_models(["demo", "demo-b"], {"demo-b": {"max_model_len": 256}})
            listed = (await c.get("/v1/models")).json()
            gw.set_models(["demo-b"], {})
            after = (await c.get("/v1/models")).json()
        await gw.stop()
        await engine.stop()
        return listed, after, gw.metrics

    listed, after, metrics = run(go())
    assert [m["id"] for m in listed["data"]] == ["demo", "demo-b"]
    assert {m["id"]: m.get("max_model_len") for m in listed["data"]}["demo-b"] == 256
    assert [m["id"] for m in after["data"]] == ["demo-b"]
    # The removed model's endpoint gauge goes with it, not frozen at its last value.
    gauged = {tuple(s.labels.values()) for m in metrics.endpoints.collect() for s in m.samples}
    assert gauged == {("demo-b",)}


def test_kuberay_health_paths_say_success_only_once_every_model_has_a_replica():
    """KubeRay labels the head as serving from `GET :8000/-/healthz` (200) and its exec probes
    grep the body for "success", as Ray's own proxy answers."""

    async def go():
        gw, url = await start_gateway(None)
        async with httpx.AsyncClient(base_url=url) as c:
            before = [await c.get("/-/healthz"), await c.get("/-/routes")]
            engine = FakeEngine()
            port = await engine.start()
            gw.update_endpoints({"demo": [{"model": "demo", "replica_id": "r1", "host": "127.0.0.1", "port": port}]})
            after = [await c.get("/-/healthz"), await c.get("/-/routes"), await c.post("/-/healthz")]
        await gw.stop()
        await engine.stop()
        return before, after

    (h0, r0), (h1, r1, post) = run(go())
    assert h0.status_code == 503 and h0.headers["retry-after"] and b"success" not in h0.content
    assert r0.status_code == 503
    assert h1.status_code == 200 and h1.text == "success"
    assert r1.status_code == 200 and r1.json() == {"/": "keel"}
    assert post.status_code == 405
