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
import re
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass

import httptools

from serving.errors import GatewayError, error_body, reshape_upstream_error, status_phrase
from serving.gateway.endpoints import Endpoint, EndpointPool
from serving.gateway.inspect import StreamInspector, blocked_event, inspect_json
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.stages import Outcome, Pipeline, RequestContext
from serving.httpraw import decode_chunked, parse_head
from serving.policy.guardrails import GuardrailBlocked

log = logging.getLogger("keel.gateway")

PROXIED_PATHS = {"/v1/chat/completions", "/v1/completions"}
# Hop-by-hop and gateway-owned headers: not forwarded to the engine.
_DROP_REQUEST_HEADERS = {
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade",
    "host", "content-length", "authorization", "x-request-id", "expect", "trailer",
}
_DROP_RESPONSE_HEADERS = {"connection", "keep-alive", "server", "x-request-id"}
MAX_ERROR_BODY = 1 << 20
MAX_SHADOWS_IN_FLIGHT = 32  # past this, shadow copies are dropped (counted), never queued
SHADOW_TIMEOUT_S = 300
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
        self.runtime = None  # serving.gateway.policy.PolicyRuntime, once a policy is set
        self._shadows_in_flight = 0
        self._shadow_tasks: set[asyncio.Task] = set()
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

    def set_policy(self, runtime) -> None:
        """Swap in a new policy version; requests in flight finish on the one they started with."""
        # The new version closed what of the old one it does not carry over (PolicyRuntime).
        self.runtime = runtime
        self.pipeline = runtime.pipeline

    async def handle(self, client: "_Client", req: "_Request") -> None:
        rid = req.headers.get("x-request-id") or uuid.uuid4().hex
        path = req.path
        try:
            if path in PROXIED_PATHS:
                if req.method != "POST":
                    self._audit_refused(req, rid, 405, "method not allowed")
                    raise GatewayError(405, f"Use POST for {path}.")
                await self._proxy(client, req, rid)
                return
            if path == "/v1/models" and req.method == "GET":
                client.respond(200, json.dumps(self._models_body(req)).encode(), rid)
            elif path.startswith("/v1/models/") and req.method == "GET":
                name = path[len("/v1/models/"):]
                card = next((m for m in self._models_body(req)["data"] if m["id"] == name), None)
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
            elif path.startswith("/v1/admin/"):
                body = self._admin(req, rid)
                client.respond(200, json.dumps(body).encode(), rid)
            else:
                raise GatewayError(404, f"No route {req.method} {path}.", code="unknown_route")
        except GatewayError as e:
            client.respond(e.status, e.body(rid), rid, e.headers)
        except Exception:  # never a stack trace to the client; the log has it
            log.exception("request %s failed", rid)
            client.respond(500, error_body(500, "Internal gateway error.", request_id=rid), rid)

    def _principal(self, req: "_Request"):
        """The caller's identity when tenants are configured (401 otherwise); None in open mode."""
        rt = self.runtime
        if rt is None or rt.open:
            return None
        return rt.keyring.authenticate(req.headers.get("authorization"))  # AuthError: a 401

    def _admin(self, req: "_Request", rid: str) -> dict:
        p = self._principal(req)
        status, error = 200, None
        try:
            if p is not None and p.role != "admin":
                raise GatewayError(403, "The admin API needs an admin key.", code="admin_only")
            if req.method != "GET" or req.path != "/v1/admin/policy":
                raise GatewayError(404, f"No admin route {req.method} {req.path}; try GET /v1/admin/policy.",
                                   code="unknown_route")
            return policy_summary(self.runtime)
        except GatewayError as e:
            status, error = e.status, e.message
            raise
        finally:
            if self.runtime is not None:
                self.runtime.audit_plain(rid, req.method, req.path, status, error, req.received_at,
                                         tenant=p.tenant if p else None, key_id=p.key_id if p else None)

    def _audit_refused(self, req: "_Request", rid: str, status: int, error: str) -> None:
        if self.runtime is not None:
            self.runtime.audit_plain(rid, req.method, req.path, status, error, req.received_at)

    async def _proxy(self, client: "_Client", req: "_Request", rid: str) -> None:
        ctx = RequestContext(rid, req.method, req.path, req.headers, req.body, received_at=req.received_at)
        if "x-request-id" in req.headers:
            # The engine needs ids unique among requests in flight; a client's may repeat.
            ctx.upstream_headers["x-request-id"] = f"{rid}-{uuid.uuid4().hex[:8]}"
        pipeline = self.pipeline  # a reload mid-request must not change who sees on_complete
        outcome: Outcome | None = None
        try:
            await pipeline.admit(ctx)
            if ctx.shadow is not None:
                self._spawn_shadow(ctx)
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
            pipeline.complete(ctx, outcome)
            self.metrics.observe_request(ctx, outcome)

    async def _relay(self, client: "_Client", ctx: RequestContext) -> Outcome:
        model = ctx.target
        assert model is not None
        tried: tuple[Endpoint, ...] = ()
        loop = asyncio.get_running_loop()
        while True:
            ep = self.pool.pick(model, exclude=tried)
            if ep is None:
                raise GatewayError(
                    503,
                    f"No replica of `{ctx.model}` is ready yet; retry shortly.",
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

    # -- shadow traffic ----------------------------------------------------------------------

    def _spawn_shadow(self, ctx: RequestContext) -> None:
        """Mirror the request to ctx.shadow; its answer is read, measured and dropped."""
        if self._shadows_in_flight >= MAX_SHADOWS_IN_FLIGHT:
            self.metrics.shadow_requests.labels(ctx.model, ctx.shadow, "dropped").inc()
            return
        ep = self.pool.pick(ctx.shadow)
        if ep is None:
            self.metrics.shadow_requests.labels(ctx.model, ctx.shadow, "no_replica").inc()
            return
        payload = dict(ctx.payload)
        payload["model"] = ctx.shadow
        if payload.get("stream"):
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        body = json.dumps(payload).encode()
        shadow_ctx = RequestContext(f"{ctx.request_id}-shadow", ctx.method, ctx.path, {}, body)
        shadow_ctx.upstream_headers["content-type"] = "application/json"
        self._shadows_in_flight += 1
        ep.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._shadow(shadow_ctx, ctx.model, ctx.shadow, ep))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, sctx: RequestContext, model: str, variant: str, ep: Endpoint) -> None:
        started = time.monotonic()
        status = "error"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ep.host, ep.port),
                                                    self.settings.connect_timeout_s)
            try:
                writer.write(_request_bytes(sctx, ep))
                data = await asyncio.wait_for(reader.read(-1), SHADOW_TIMEOUT_S)
            finally:
                writer.close()
            head, _, body = data.partition(b"\r\n\r\n")
            code, _ = parse_head(head)
            status = str(code)
            usage = _last_usage(body)
            if usage:
                self.metrics.shadow_tokens.labels(model, variant, "prompt").inc(usage.get("prompt_tokens") or 0)
                self.metrics.shadow_tokens.labels(model, variant, "completion").inc(usage.get("completion_tokens") or 0)
        except (OSError, asyncio.TimeoutError, ValueError):
            status = "error"
        finally:
            ep.in_flight -= 1
            self._shadows_in_flight -= 1
            self.metrics.shadow_requests.labels(model, variant, status).inc()
            self.metrics.shadow_duration.labels(model, variant).observe(time.monotonic() - started)

    def _models_body(self, req: "_Request") -> dict:
        p = self._principal(req)
        rt = self.runtime
        names = list(self.models) + (list(rt.policy.experiments) if rt is not None else [])
        if p is not None:
            names = [n for n in names if n in rt.allowed[p.tenant]]
        data = []
        for m in names:
            card = {"id": m, "object": "model", "created": self._created, "owned_by": "keel"}
            card.update(self.model_info.get(m, {}))
            if rt is not None and m in rt.policy.experiments:
                card["variants"] = list(rt.policy.experiments[m].variants)
            data.append(card)
        return {"object": "list", "data": data}


_USAGE_RE = re.compile(rb'"usage":(\{[^{}]*\})')


def _last_usage(body: bytes) -> dict | None:
    found = _USAGE_RE.findall(body)
    if not found:
        return None
    try:
        return json.loads(found[-1])
    except ValueError:
        return None


def policy_summary(rt) -> dict:
    """What GET /v1/admin/policy shows: the policy in force, without key digests."""
    if rt is None:
        return {"tenants": {}, "experiments": {}}
    pol = rt.policy.model_dump(mode="json")
    for t in pol["tenants"].values():
        for k in t["keys"]:
            k.pop("digest", None)
    pol["version"] = rt.version
    return pol


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
        self.inspecting = False
        self.cut = False  # an output guardrail ended the response
        self.complete = False  # inspect mode: the whole body reached the client
        self.blocked_status: int | None = None
        self.pending: list[bytes] = []  # inspect mode: stream body decoded from the current read
        self.out: list[bytes] = []  # inspect mode: chunks for the client from the current read

    def body_complete(self) -> bool:
        """Did the client get the whole body? (It may close before the engine's EOF reaches us.)"""
        if self.inspecting:
            return self.complete
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
        if self.inspecting:
            self._inspect(data)
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
        self.buf = bytearray()
        if self.ctx.inspect:
            self._start_inspecting(headers)
            if rest:
                self.data_received(rest)
            return
        if self.body_length is None and not self.chunked:
            self.client.keep_alive = False  # body ends when the connection does
        out = [k + ": " + v for k, v in headers if k not in _DROP_RESPONSE_HEADERS]
        self.client.write_head(status, out, self.ctx.request_id, self.ctx.response_headers)
        self.head_sent = True
        self.relaying = True
        if rest:
            self.data_received(rest)

    # -- inspect mode: a policy needs the response (usage, output guardrails, audit text) ----

    def _start_inspecting(self, headers: list[tuple[str, str]]) -> None:
        self.inspecting = True
        self.chat = self.ctx.path.endswith("/chat/completions")
        framing = b"transfer-encoding: chunked\r\n" if self.chunked else (
            b"content-length: %d\r\n" % self.body_length if self.body_length is not None else b"")
        self.decoder = httptools.HttpResponseParser(self)
        self.decoder.feed_data(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n")
        ctype = next((v for k, v in headers if k == "content-type"), "")
        self.out_headers = [k + ": " + v for k, v in headers
                            if k not in _DROP_RESPONSE_HEADERS and k not in ("content-length", "transfer-encoding")]
        if ctype.startswith("text/event-stream"):
            self.stream = StreamInspector(self.ctx, self.chat)
            self.client.write_head(self.status, [*self.out_headers, "transfer-encoding: chunked"],
                                   self.ctx.request_id, self.ctx.response_headers)
            self.head_sent = True
        else:
            self.stream = None
            self.body_parts: list[bytes] = []

    def _inspect(self, data: bytes) -> None:
        """One read of the engine's body: decoded, inspected in one pass, written in one write
        (a read often holds many token events when the gateway is behind the engine)."""
        if self.cut:
            return
        try:
            self.decoder.feed_data(data)
        except httptools.HttpParserError:
            log.warning("request %s: malformed response body from the engine", self.ctx.request_id)
            self.transport.abort()  # what decoded before the error still goes out
        self._drain()
        self._flush()

    # httptools callbacks of self.decoder
    def on_body(self, body: bytes) -> None:
        if self.stream is None:
            self.body_parts.append(body)
        else:
            self.pending.append(body)

    def _drain(self) -> None:
        """Inspect the stream's body decoded so far; its output waits in self.out for _flush."""
        if not self.pending or self.cut:
            return
        body = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending.clear()
        try:
            out = self.stream.feed(body)
        except GuardrailBlocked as e:
            self._cut(e)
            return
        self._send_chunk(out)

    def on_message_complete(self) -> None:
        if self.cut:
            return
        if self.stream is not None:
            self._drain()
            if self.cut:
                return
            try:
                out = self.stream.finish()
            except GuardrailBlocked as e:
                self._cut(e)
                return
            self._send_chunk(out)
            self.out.append(b"0\r\n\r\n")
            self.complete = True
            return
        rid = self.ctx.request_id
        try:
            body = inspect_json(self.ctx, b"".join(self.body_parts), self.chat)
        except GuardrailBlocked as e:
            self.ctx.blocked = e
            self.blocked_status = 400
            self.client.respond(400, error_body(400, e.message, code="content_policy_violation", request_id=rid),
                                rid, self.ctx.response_headers)
            self.complete = True
            return
        self.client.write_head(self.status, [*self.out_headers, f"content-length: {len(body)}"], rid,
                               self.ctx.response_headers)
        self.head_sent = True
        self.client.transport.write(body)
        self._count(body)
        self.complete = True

    def _send_chunk(self, out: bytes) -> None:
        if out:
            self.out.append(b"%x\r\n%b\r\n" % (len(out), out))

    def _flush(self) -> None:
        """Write what this read produced to the client, in one write."""
        if not self.out:
            return
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        self.out.clear()
        if not self.client.closed:
            self.client.transport.write(data)
            self._count(data)

    def _count(self, out: bytes) -> None:
        self.bytes_out += len(out)
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()

    def _cut(self, e: GuardrailBlocked) -> None:
        """An output guardrail blocked: end the stream with an error event and stop the engine."""
        self.cut = True
        self.pending.clear()
        self.ctx.blocked = e
        self.stream.note_all_actions()
        self._send_chunk(blocked_event(e, self.ctx.request_id))
        self.out.append(b"0\r\n\r\n")
        self._flush()
        self.complete = True
        self.transport.abort()

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
        elif self.blocked_status is not None:
            outcome = Outcome(self.blocked_status, error=self.ctx.blocked.message)
        else:
            if exc is not None or (self.inspecting and not self.complete):
                # cut mid-body: the client must not read a truncated body as whole
                self.client.keep_alive = False
            error = self.ctx.blocked.message if self.cut else None
            outcome = Outcome(self.status, error=error, first_byte_at=self.first_byte_at, bytes_out=self.bytes_out)
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
            if self.gateway.runtime is not None:
                self.gateway.runtime.audit_plain(rid, req.method, req.path, 413, "request body too large",
                                                 self._started)
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

