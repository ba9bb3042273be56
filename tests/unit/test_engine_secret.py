"""Engines answer only the gateway: the gateway sends the stack's secret, never the client's key;
the engine's server refuses every route but /health and /metrics without it; the secret reaches
the engine by environment, not on its command line."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI, WebSocket

from serving.engine.auth import KEY_ENV, MIDDLEWARE, EngineAuth
from serving.engine.replica import EngineReplica, EngineSpec
from serving.gateway.server import Gateway, GatewaySettings
from serving.gateway.stages import Pipeline, default_stages
from tests.unit.fake_engine import FakeEngine
from tests.unit.test_policy_gateway import APP_KEY, CHAT, Harness, policy

SECRET = "stack-secret-0123456789abcdefghijklmnopqrstuvwxyz"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


class HeadRecorder:
    """An engine stand-in that keeps each request's raw header lines and answers one completion."""

    def __init__(self):
        self.heads: list[list[str]] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[1:-2]
        self.heads.append(head)
        length = next(int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length:"))
        await reader.readexactly(length)
        body = json.dumps(
            {
                "id": "c1",
                "object": "chat.completion",
                "model": "demo",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            }
        ).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        )
        await writer.drain()
        writer.close()


def test_the_gateway_sends_the_stack_secret_to_the_engine_and_never_the_clients_key():
    async def go():
        engine = HeadRecorder()
        port = await engine.start()
        gw = Gateway(GatewaySettings(port=0, engine_api_key=SECRET), ["demo"], Pipeline(default_stages(["demo"])))
        gw.update_endpoints({"demo": [{"model": "demo", "replica_id": "r1", "host": "127.0.0.1", "port": port}]})
        await gw.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
                return await c.post(
                    "/v1/chat/completions",
                    json={**CHAT, "stream": False},
                    headers={"authorization": "Bearer client-own-key"},
                ), engine
        finally:
            await gw.stop()
            await engine.stop()

    r, engine = run(go())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    (head,) = engine.heads
    assert [h for h in head if h.lower().startswith("authorization:")] == [f"authorization: Bearer {SECRET}"]
    assert not any("client-own-key" in h for h in head)


def test_shadow_copies_carry_the_secret_too(tmp_path):
    pol = policy(
        tmp_path, experiments={"chat": {"variants": {"demo": 1}, "shadow": {"variant": "demo-b", "percent": 100}}}
    )

    async def go():
        engines = {"demo": FakeEngine(tokens=["primary"]), "demo-b": FakeEngine(tokens=["shadow"])}
        async with Harness(pol, engines) as h:
            h.gw.settings.engine_api_key = SECRET
            r = await h.post({**CHAT, "model": "chat"})
            for _ in range(100):
                if engines["demo-b"].requests:
                    break
                await asyncio.sleep(0.02)
            return r, engines

    r, engines = run(go())
    assert r.status_code == 200
    for model in ("demo", "demo-b"):
        ((_, headers, _),) = engines[model].requests
        assert headers["authorization"] == f"Bearer {SECRET}"  # the tenant's APP_KEY went nowhere
    assert APP_KEY not in repr(engines["demo"].requests + engines["demo-b"].requests)


def test_settings_and_engine_spec_never_show_the_secret():
    assert SECRET not in repr(GatewaySettings(engine_api_key=SECRET))
    assert SECRET not in repr(EngineSpec("demo", "/w", [], api_key=SECRET))


# -- the engine's side -----------------------------------------------------------------------------


@pytest.fixture
def engine_app(monkeypatch):
    """Routes like vLLM's, with middleware added by vLLM's own code from the flags the replica passes."""
    from starlette.testclient import TestClient
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.setenv(KEY_ENV, SECRET)
    app = FastAPI()
    for path in ("/v1/chat/completions", "/v1/completions", "/invocations", "/tokenize", "/abort_requests"):
        app.post(path)(lambda: {"ok": True})
    for path in ("/health", "/metrics", "/v1/models", "/version", "/load"):
        app.get(path)(lambda: {"ok": True})

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--middleware", MIDDLEWARE])
    init_entrypoints_middleware(args, app, ())
    return TestClient(app)


GUARDED = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/invocations"),
    ("POST", "/tokenize"),
    ("POST", "/abort_requests"),
    ("GET", "/v1/models"),
    ("GET", "/version"),
    ("GET", "/load"),
    ("GET", "/no/such/route"),
]


@pytest.mark.parametrize("method, path", GUARDED)
@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {APP_KEY}", "Bearer wrong", SECRET, f"Basic {SECRET}"],
    ids=["none", "a tenant key", "wrong", "no scheme", "basic"],
)
def test_the_engine_refuses_every_route_without_the_secret(engine_app, method, path, authorization):
    headers = {"authorization": authorization} if authorization else {}
    r = engine_app.request(method, path, headers=headers, json={})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("method, path", GUARDED[:-1])
def test_the_engine_answers_the_gateway(engine_app, method, path):
    assert engine_app.request(method, path, headers={"authorization": f"bearer {SECRET}"}, json={}).status_code == 200


def test_health_and_metrics_stay_open_for_the_replica_and_the_gateway(engine_app):
    assert engine_app.get("/health").status_code == 200
    assert engine_app.get("/metrics").status_code == 200


def test_two_authorization_headers_are_refused_even_if_one_is_right(engine_app):
    r = engine_app.post(
        "/v1/chat/completions", json={}, headers=[("authorization", f"Bearer {SECRET}"), ("authorization", "Bearer x")]
    )
    assert r.status_code == 401


def test_a_websocket_without_the_secret_is_closed(engine_app):
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as e, engine_app.websocket_connect("/v1/realtime") as ws:
        ws.receive_text()
    assert (e.value.code, e.value.reason) == (1008, "")  # closed before the route ran
    with engine_app.websocket_connect("/v1/realtime", headers={"authorization": f"Bearer {SECRET}"}) as ws:
        assert ws.receive_text() == "hello"


def test_an_engine_without_its_secret_refuses_to_start(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=KEY_ENV):
        EngineAuth(lambda *a: None)


def started_engine(monkeypatch, api_key):
    """The command and environment the replica starts its engine with."""
    from serving.engine import replica

    seen = {}

    def popen(cmd, env=None, **kw):
        seen.update(cmd=cmd, env=env)
        return None

    monkeypatch.setattr(replica.subprocess, "Popen", popen)
    monkeypatch.delenv(KEY_ENV, raising=False)
    bare = EngineReplica.__new__(EngineReplica)
    bare.spec, bare.port = EngineSpec("demo", "/weights", ["--max-model-len", "512"], api_key=api_key), 8123
    bare.engine_tree = "tree-id"
    bare._start_engine()
    return seen["cmd"], seen["env"]


def test_the_replica_gives_the_engine_its_secret_by_environment_not_on_the_command_line(monkeypatch):
    cmd, env = started_engine(monkeypatch, SECRET)
    assert env[KEY_ENV] == SECRET
    assert not any(SECRET in arg for arg in cmd)  # `ps` shows every local user the command line
    assert cmd[cmd.index("--middleware") + 1] == MIDDLEWARE
    cmd, env = started_engine(monkeypatch, None)
    assert KEY_ENV not in env and "--middleware" not in cmd


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own, on import
def test_every_replica_gets_the_secret_the_first_one_made(monkeypatch):
    from ray.experimental import internal_kv

    from serving import app

    store = {}

    def put(key, value, overwrite=True, *, namespace=None):
        exists = (namespace, key) in store
        if overwrite or not exists:
            store[(namespace, key)] = value.encode() if isinstance(value, str) else value
        return exists

    monkeypatch.setattr(internal_kv, "_internal_kv_put", put)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, *, namespace=None: store[(namespace, key)])
    first = app.stack_secret()
    assert len(first) >= 40 and [app.stack_secret() for _ in range(3)] == [first] * 3
