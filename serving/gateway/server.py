"""The gateway: decide once per request, then relay the engine's response as raw bytes.

What costs throughput on the generation path is work per streamed chunk (see
docs/architecture.md). So this server does its work where it is per request: it parses the
request head and JSON body once, runs the request-path stages, picks an engine replica, opens
a connection to that replica's own HTTP port and, once the engine's response head is read and
rewritten, copies every further byte to the client unparsed (`_Upstream.data_received`).
Nothing in the gateway runs per token.

Built on asyncio protocols (uvloop in production) and httptools, not on an ASGI framework: an
ASGI app turns every chunk into a message and an `await`, the per-chunk cost we avoid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass

import httptools

from serving.errors import GatewayError, error_body, reshape_upstream_error, status_phrase
from serving.gateway.endpoints import Endpoint, EndpointPool
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.stages import Outcome, Pipeline, RequestContext
from serving.httpraw import decode_chunked, http_get, parse_head

log = logging.getLogger("keel.gateway")

PROXIED_PATHS = {"/v1/chat/completions", "/v1/completions"}
# Hop-by-hop and gateway-owned headers: not forwarded to the engine.
_DROP_REQUEST_HEADERS = {
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade",
    "host", "content-length", "authorization", "x-request-id", "expect", "trailer",
}
_DROP_RESPONSE_HEADERS = {"connection", "keep-alive", "server", "x-request-id"}
MAX_ERROR_BODY = 1 << 20
RETRY_AFTER_S = 5


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    connect_timeout_s: float = 5.0
    reuse_port: bool = False  # only replicas of one stack may share a port


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        models: list[str],
        pipeline: Pipeline,
        pool: EndpointPool | None = None,
        metrics: GatewayMetrics | None = None,
        model_info: dict[str, dict] | None = None,
    ):
        self.settings = settings
        self.models = list(models)
        self.pipeline = pipeline
        self.pool = pool or EndpointPool()
        self.metrics = metrics or GatewayMetrics()
        self.model_info = model_info or {}
        self._server: asyncio.AbstractServer | None = None
        self._created = int(time.time())

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.settings.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            # Several gateway replicas on one node share the port; the kernel spreads connections.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.settings.host, self.settings.port))
        sock.listen(2048)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Client(self), sock=sock)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def update_endpoints(self, snapshot: dict[str, list[dict]]) -> None:
        self.pool.update(snapshot)
        for model in self.models:
            self.metrics.endpoints.labels(model).set(self.pool.count(model))

    # -- request handling ------------------------------------------------------------------

    async def handle(self, client: "_Client", req: "_Request") -> None:
        rid = req.headers.get("x-request-id") or uuid.uuid4().hex
        path = req.path
        try:
            if path in PROXIED_PATHS:
                if req.method != "POST":
                    raise GatewayError(405, f"Use POST for {path}.")
                await self._proxy(client, req, rid)
                return
            if path == "/v1/models" and req.method == "GET":
                client.respond(200, json.dumps(self._models_body()).encode(), rid)
            elif path.startswith("/v1/models/") and req.method == "GET":
                name = path[len("/v1/models/"):]
                card = next((m for m in self._models_body()["data"] if m["id"] == name), None)
                if card is None:
                    raise GatewayError(404, f"The model `{name}` does not exist.", code="model_not_found")
                client.respond(200, json.dumps(card).encode(), rid)
            elif path == "/health" and req.method == "GET":
                ready = {m: self.pool.count(m) for m in self.models}
                ok = all(ready.values())
                body = json.dumps({"status": "ok" if ok else "starting", "replicas": ready}).encode()
                headers = {} if ok else {"retry-after": str(RETRY_AFTER_S)}
                client.respond(200 if ok else 503, body, rid, headers)
            elif path == "/metrics" and req.method == "GET":
                text = await self.metrics.render(self.pool.all())
                client.respond(200, text, rid, content_type=GatewayMetrics.CONTENT_TYPE)
            else:
                raise GatewayError(404, f"No route {req.method} {path}.", code="unknown_route")
        except GatewayError as e:
            client.respond(e.status, e.body(rid), rid, e.headers)
        except Exception:  # never a stack trace to the client; the log has it
            log.exception("request %s failed", rid)
            client.respond(500, error_body(500, "Internal gateway error.", request_id=rid), rid)

    async def _proxy(self, client: "_Client", req: "_Request", rid: str) -> None:
        ctx = RequestContext(rid, req.method, req.path, req.headers, req.body, received_at=req.received_at)
        if "x-request-id" in req.headers:
            # The engine needs ids unique among requests in flight; a client's may repeat.
            ctx.upstream_headers["x-request-id"] = f"{rid}-{uuid.uuid4().hex[:8]}"
        outcome: Outcome | None = None
        try:
            await self.pipeline.admit(ctx)
            outcome = await self._relay(client, ctx)
        except GatewayError as e:
            client.respond(e.status, e.body(rid), rid, {**ctx.response_headers, **e.headers})
            outcome = Outcome(e.status, error=e.message)
        except asyncio.CancelledError:  # the client went away during admission
            outcome = Outcome(499, error="client disconnected")
            raise
        finally:
            if outcome is None:  # an unexpected error: the caller answers 500
                outcome = Outcome(500, error="internal error")
            self.pipeline.complete(ctx, outcome)
            self.metrics.observe(ctx.model, ctx.received_at, outcome)

    async def _relay(self, client: "_Client", ctx: RequestContext) -> Outcome:
        model = ctx.model
        assert model is not None
        tried: tuple[Endpoint, ...] = ()
        loop = asyncio.get_running_loop()
        while True:
            ep = self.pool.pick(model, exclude=tried)
            if ep is None:
                raise GatewayError(
                    503,
                    f"No replica of `{model}` is ready yet; retry shortly.",
                    code="model_not_ready",
                    headers={"retry-after": str(RETRY_AFTER_S)},
                )
            ep.in_flight += 1  # counted from the pick, so concurrent picks spread while connecting
            upstream = _Upstream(client, ctx, loop)
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: upstream, ep.host, ep.port),
                    self.settings.connect_timeout_s,
                )
                break
            except (OSError, asyncio.TimeoutError):
                ep.in_flight -= 1
                log.warning("replica %s of %s at %s:%s unreachable", ep.replica_id, model, ep.host, ep.port)
                self.pool.mark_down(ep)
                tried += (ep,)
            except asyncio.CancelledError:
                ep.in_flight -= 1
                raise
        self.metrics.in_flight.labels(model).inc()
        try:
            if client.closed:
                upstream.transport.abort()
                return Outcome(499, error="client disconnected")
            client.upstream = upstream
            upstream.transport.write(_request_bytes(ctx, ep))
            return await upstream.done
        finally:
            client.upstream = None
            ep.in_flight -= 1
            self.metrics.in_flight.labels(model).dec()

    def _models_body(self) -> dict:
        data = []
        for m in self.models:
            card = {"id": m, "object": "model", "created": self._created, "owned_by": "keel"}
            card.update(self.model_info.get(m, {}))
            data.append(card)
        return {"object": "list", "data": data}


def _request_bytes(ctx: RequestContext, ep: Endpoint) -> bytes:
    lines = [
        f"{ctx.method} {ctx.path} HTTP/1.1",
        f"host: {ep.host}:{ep.port}",
        f"content-length: {len(ctx.body)}",
        "connection: close",  # the response then ends at EOF: no framing to track per chunk
        f"x-request-id: {ctx.upstream_headers.get('x-request-id') or ctx.request_id}",
    ]
    for k, v in ctx.headers.items():
        if k not in _DROP_REQUEST_HEADERS and k not in ctx.upstream_headers:
            lines.append(f"{k}: {v}")
    for k, v in ctx.upstream_headers.items():
        if k != "x-request-id":
            lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + ctx.body


# ---------------------------------------------------------------------------------------------
# Engine side of one relayed request


class _Upstream(asyncio.Protocol):
    def __init__(self, client: "_Client", ctx: RequestContext, loop: asyncio.AbstractEventLoop):
        self.client = client
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future = loop.create_future()
        self.relaying = False  # past the head: bytes go straight to the client
        self.buf = bytearray()
        self.status = 0
        self.head_sent = False
        self.is_error = False
        self.first_byte_at: float | None = None
        self.bytes_out = 0
        self.last = b""
        self.body_length: int | None = None  # content-length, when the engine sent one
        self.chunked = False

    def body_complete(self) -> bool:
        """Did the client get the whole body? (It may close before the engine's EOF reaches us.)"""
        if self.chunked:
            return self.last.endswith(b"0\r\n\r\n")
        return self.body_length is not None and self.bytes_out >= self.body_length

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.relaying:  # the hot path: one branch and a write per chunk
            self.client.transport.write(data)
            self.bytes_out += len(data)
            self.last = data
            if self.first_byte_at is None:
                self.first_byte_at = time.monotonic()
            return
        self.buf += data
        if self.is_error:
            if len(self.buf) > MAX_ERROR_BODY:
                self.transport.abort()
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65536:
                self.transport.abort()
            return
        status, headers = parse_head(bytes(self.buf[:end]))
        rest = bytes(self.buf[end + 4:])
        self.status = status
        self.headers = headers
        if status >= 400:
            self.is_error = True
            self.buf = bytearray(rest)
            return
        for k, v in headers:
            if k == "content-length" and v.isdigit():
                self.body_length = int(v)
            elif k == "transfer-encoding" and "chunked" in v.lower():
                self.chunked = True
        if self.body_length is None and not self.chunked:
            self.client.keep_alive = False  # body ends when the connection does
        out = [k + ": " + v for k, v in headers if k not in _DROP_RESPONSE_HEADERS]
        self.client.write_head(status, out, self.ctx.request_id, self.ctx.response_headers)
        self.head_sent = True
        self.relaying = True
        self.buf = bytearray()
        if rest:
            self.data_received(rest)

    def pause_client_reads(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_client_reads(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        if self.done.done():
            return
        rid = self.ctx.request_id
        if self.client.closed and not (self.head_sent and self.body_complete()):
            outcome = Outcome(499, error="client disconnected", first_byte_at=self.first_byte_at, bytes_out=self.bytes_out)
        elif self.is_error:
            body = bytes(self.buf)
            if any(k == "transfer-encoding" and "chunked" in v.lower() for k, v in self.headers):
                body = decode_chunked(body)
            payload = reshape_upstream_error(self.status, body, rid)
            msg = json.loads(payload)["error"]["message"]
            self.client.respond(self.status, payload, rid, self.ctx.response_headers)
            outcome = Outcome(self.status, error=msg)
        elif not self.head_sent:
            msg = "The model replica closed the connection before answering."
            self.client.respond(502, error_body(502, msg, request_id=rid), rid)
            outcome = Outcome(502, error=msg)
        else:
            if exc is not None:  # cut mid-body: the client must not read a truncated body as whole
                self.client.keep_alive = False
            outcome = Outcome(self.status, first_byte_at=self.first_byte_at, bytes_out=self.bytes_out)
        self.done.set_result(outcome)


# ---------------------------------------------------------------------------------------------
# Client side: one connection, HTTP/1.1 with keep-alive, requests answered in order


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    received_at: float


class _Client(asyncio.Protocol):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Request] = deque()
        self.task: asyncio.Task | None = None
        self.upstream: _Upstream | None = None
        self.closed = False
        self.keep_alive = True
        self.reading_paused = False
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_len = 0
        self._too_large = False
        self._started = time.monotonic()

    # asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fatal(400, "Protocol upgrades are not supported.")
        except httptools.HttpParserError as e:
            self._fatal(400, f"Malformed HTTP request: {e}")

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()  # the engine sees the disconnect and aborts the request
        elif self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_client_reads()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_client_reads()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length and length.isdigit() and int(length) > self.gateway.settings.max_body_bytes:
            self._too_large = True
        elif self._headers.get("expect", "").lower() == "100-continue":
            # curl sends this for bodies over 1 KiB and waits a second for it otherwise.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return
        self._body_len += len(body)
        if self._body_len > self.gateway.settings.max_body_bytes:
            self._too_large = True
            self._body = []
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        req = _Request(
            method=self.parser.get_method().decode(),
            path=url.path.decode("latin-1"),
            headers=self._headers,
            body=b"".join(self._body),
            keep_alive=self.parser.should_keep_alive(),
            received_at=self._started,
        )
        if self._too_large:
            limit = self.gateway.settings.max_body_bytes
            rid = self._headers.get("x-request-id") or uuid.uuid4().hex
            self.keep_alive = False
            self.respond(413, error_body(413, f"The request body exceeds {limit} bytes.", request_id=rid), rid)
            self.gateway.metrics.observe(None, self._started, Outcome(413, error="too large"))
            self.transport.close()
            return
        self.queue.append(req)
        if len(self.queue) > 64:
            self._fatal(400, "Too many pipelined requests.")
            return
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._serve_queue())

    async def _serve_queue(self) -> None:
        while self.queue and not self.closed:
            req = self.queue.popleft()
            self.keep_alive = req.keep_alive
            await self.gateway.handle(self, req)
            if not self.keep_alive:
                self.transport.close()
                return

    # writing
    def write_head(self, status: int, header_lines: list[str], rid: str, extra: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {status_phrase(status)}", *header_lines, f"x-request-id: {rid}"]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        lines.append("connection: keep-alive" if self.keep_alive else "connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def respond(
        self,
        status: int,
        body: bytes,
        rid: str,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        if self.closed:
            return
        lines = [f"content-type: {content_type}", f"content-length: {len(body)}"]
        self.write_head(status, lines, rid, headers or {})
        self.transport.write(body)

    def _fatal(self, status: int, message: str) -> None:
        rid = uuid.uuid4().hex
        self.keep_alive = False
        self.respond(status, error_body(status, message, request_id=rid), rid)
        self.transport.close()

