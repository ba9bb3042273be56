"""The engine side of one relayed request: send it, read the response head, pass the body on.

After the engine's response head is read and rewritten, every further byte is copied to the
client unparsed (`Upstream.data_received`, the hot path: one branch and one write per read).
Only when a policy must read the response (usage for the quota, output guardrails, audit
text), or the client speaks HTTP/1.0 and cannot take chunked framing, is the body decoded
(httptools) and handed to serving/gateway/inspect.py or passed through unframed.

A response the engine cuts short (its process died, the connection broke) ends for the client
with an OpenAI error event and a well-formed end where the framing allows it, and is recorded
as a 502 with the error; a body that cannot be ended cleanly ends with the connection, so the
client cannot take it for a whole one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import httptools

from serving.errors import error_body, reshape_upstream_error
from serving.gateway.inspect import StreamInspector, blocked_event, inspect_json
from serving.gateway.stages import Outcome, RequestContext
from serving.httpraw import decode_chunked, parse_head
from serving.policy.guardrails import GuardrailBlocked

log = logging.getLogger("keel.gateway")

# Hop-by-hop and gateway-owned headers: not forwarded to the engine.
_DROP_REQUEST_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "host",
    "content-length",
    "authorization",
    "x-request-id",
    "expect",
    "trailer",
}
_DROP_RESPONSE_HEADERS = {"connection", "keep-alive", "server", "x-request-id"}
MAX_ERROR_BODY = 1 << 20
MAX_RESPONSE_HEAD = 65536
CUT_MESSAGE = "The model replica stopped before finishing the response; it is incomplete."


def request_bytes(ctx: RequestContext, ep, engine_api_key: str | None = None, keep_alive: bool = False) -> bytes:
    """The request as the engine gets it. keep_alive: the connection is pooled after the
    response (serving/gateway/engine_conns.py); otherwise the engine is told to close it."""
    lines = [
        f"{ctx.method} {ctx.path} HTTP/1.1",
        f"host: {ep.host}:{ep.port}",
        f"content-length: {len(ctx.body)}",
        f"x-request-id: {ctx.upstream_headers.get('x-request-id') or ctx.request_id}",
    ]
    if not keep_alive:
        lines.append("connection: close")
    if engine_api_key:  # the engine answers only its gateway (serving.engine.auth)
        lines.append(f"authorization: Bearer {engine_api_key}")
    for k, v in ctx.headers.items():
        if k not in _DROP_REQUEST_HEADERS and k not in ctx.upstream_headers:
            lines.append(f"{k}: {v}")
    for k, v in ctx.upstream_headers.items():
        if k != "x-request-id":
            lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + ctx.body


class _End:
    """httptools callbacks that only note where a response ends (raw relay and error bodies)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


def _framing_parser(protocol, chunked: bool, body_length: int | None) -> httptools.HttpResponseParser:
    """A parser fed the body only, primed with a head that carries the engine's framing."""
    framing = (
        b"transfer-encoding: chunked\r\n"
        if chunked
        else (b"content-length: %d\r\n" % body_length if body_length is not None else b"")
    )
    parser = httptools.HttpResponseParser(protocol)
    parser.feed_data(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n")
    return parser


class Upstream(asyncio.Protocol):
    """One request's engine connection, for that request. `release(transport)` takes the
    connection back once the response ended whole and it may carry another (keep-alive);
    `reused`: the connection came from the pool (a request it loses before any answer is
    retried, serving/gateway/server.py)."""

    def __init__(
        self,
        client,
        ctx: RequestContext,
        loop: asyncio.AbstractEventLoop,
        release: Callable[[asyncio.Transport], None] | None = None,
    ):
        self.client = client
        self.ctx = ctx
        self.release = release
        self.reused = False
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future = loop.create_future()
        self.reusable = False  # the engine's head allows another request on this connection
        self.end = _End()  # raw relay and error bodies: where the response ends
        self.framing: httptools.HttpResponseParser | None = None
        self.relaying = False  # past the head: bytes go straight to the client
        self.framed = not client.http10  # the client takes chunked framing
        self.buf = bytearray()
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.is_error = False
        self.first_byte_at: float | None = None
        self.bytes_out = 0
        self.bytes_in = 0  # decode mode: body bytes read from the engine (progress, for the idle check)
        self.stalled_s: float | None = None  # set when the gateway gave up on a silent engine
        self.last = b""  # the end of what was relayed (raw mode): is the body whole?
        self.body_length: int | None = None  # content-length, when the engine sent one
        self.chunked = False
        self.inspecting = False  # the body is decoded (a policy reads it, or an HTTP/1.0 client)
        self.cut = False  # an output guardrail ended the response
        self.complete = False  # decode mode: the whole body reached the client
        self.blocked_status: int | None = None
        self.decoder: httptools.HttpResponseParser | None = None  # decode mode
        self.pending: list[bytes] = []  # decode mode: stream body decoded from the current read
        self.out: list[bytes] = []  # decode mode: what goes to the client from the current read

    def body_complete(self) -> bool:
        """Did the client get the whole body? (It may close before the engine's EOF reaches us.)"""
        return self.complete

    def connection_made(self, transport):
        self.transport = transport

    def attach(self, transport: asyncio.Transport) -> None:
        """Take over a pooled connection."""
        self.reused = True
        transport.set_protocol(self)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.relaying:  # the hot path: one branch and a write per chunk
            self.client.transport.write(data)
            self.bytes_out += len(data)
            # a read as short as the last chunk's end may follow the rest of it
            self.last = data if len(data) >= 8 else self.last[-8:] + data
            if self.first_byte_at is None:
                self.first_byte_at = time.monotonic()
            self._track(data)
            return
        if self.inspecting:
            self._inspect(data)
            return
        self.buf += data
        if self.is_error:
            if len(self.buf) > MAX_ERROR_BODY:
                assert self.transport is not None  # data_received comes after connection_made
                self.transport.abort()
            else:
                self._track(data)
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_RESPONSE_HEAD:
                assert self.transport is not None
                self.transport.abort()
            return
        try:
            status, headers = parse_head(bytes(self.buf[:end]))
        except ValueError:
            log.warning("request %s: malformed response head from the engine", self.ctx.request_id)
            assert self.transport is not None
            self.transport.abort()  # answered as a 502 when the connection is gone
            return
        rest = bytes(self.buf[end + 4 :])
        self.status = status
        self.headers = headers
        close = False
        for k, v in headers:
            if k == "content-length" and v.isdigit():
                self.body_length = int(v)
            elif k == "transfer-encoding" and "chunked" in v.lower():
                self.chunked = True
            elif k == "connection" and "close" in v.lower():
                close = True
        # Another request may follow on this connection when the engine said where the body
        # ends, did not ask to close, and the answer is not an error (an engine may answer an
        # error before reading the whole request).
        self.reusable = (
            self.release is not None
            and status < 400
            and not close
            and self.buf.startswith(b"HTTP/1.1 ")
            and (self.chunked or self.body_length is not None)
        )
        if status >= 400:
            self.is_error = True
            self.buf = bytearray()
            self.framing = _framing_parser(self.end, self.chunked, self.body_length)
            self.data_received(rest)  # tracks the framing; ends the request when the body is whole
            return
        self.buf = bytearray()
        if self.ctx.inspect or (self.chunked and not self.framed):
            self._start_decoding(headers)
            if rest:
                self.data_received(rest)
            elif self.complete:  # an empty body (content-length: 0): no read will follow
                self._flush()
                self._whole()
            return
        if self.body_length is None and not self.chunked:
            self.client.keep_alive = False  # body ends when the connection does
        out = [k + ": " + v for k, v in headers if k not in _DROP_RESPONSE_HEADERS]
        self.client.write_head(status, out, self.ctx.request_id, self.ctx.response_headers)
        self.head_sent = True
        self.relaying = True
        self.framing = _framing_parser(self.end, self.chunked, self.body_length)
        if rest:
            self.data_received(rest)
        elif self.end.done:  # an empty body (content-length: 0)
            self._whole()

    def _track(self, data: bytes) -> None:
        """Raw relay and error bodies: follow the engine's framing (httptools, in C) to know
        when the response is whole; then the request ends without waiting for an EOF."""
        assert self.framing is not None
        try:
            self.framing.feed_data(data)
        except httptools.HttpParserError:
            self.reusable = False  # bytes past the end, or broken framing: the connection goes
            if self.transport is not None:
                self.transport.abort()
            return
        if self.end.done:
            self._whole()

    def _whole(self) -> None:
        """The response ended whole: end the request, and hand the connection back or close it."""
        self.complete = True
        transport, self.transport = self.transport, None  # a client leaving now must not abort it
        self._finish()
        if transport is None:
            return
        if self.reusable and self.release is not None and not transport.get_write_buffer_size():
            self.release(transport)
        else:
            transport.close()

    # -- decode mode: a policy needs the response (usage, output guardrails, audit text), or
    #    the client cannot take the engine's chunked framing --------------------------------

    def _start_decoding(self, headers: list[tuple[str, str]]) -> None:
        self.inspecting = True
        self.chat = self.ctx.path.endswith("/chat/completions")
        ctype = next((v for k, v in headers if k == "content-type"), "")
        self.out_headers = [
            k + ": " + v
            for k, v in headers
            if k not in _DROP_RESPONSE_HEADERS and k not in ("content-length", "transfer-encoding")
        ]
        self.stream: StreamInspector | _Passthrough | None
        if not self.ctx.inspect:
            self.stream = _PASS  # an HTTP/1.0 client: the body as it comes, unframed
        elif ctype.startswith("text/event-stream"):
            self.stream = StreamInspector(self.ctx, self.chat)
        else:
            self.stream = None
            self.body_parts: list[bytes] = []
            self.decoder = _framing_parser(self, self.chunked, self.body_length)
            return
        framing_out = ["transfer-encoding: chunked"] if self.framed else []
        if not self.framed:
            self.client.keep_alive = False  # the body ends when the connection does
        self.client.write_head(
            self.status, [*self.out_headers, *framing_out], self.ctx.request_id, self.ctx.response_headers
        )
        self.head_sent = True
        # Last: priming it with an empty body's framing already ends the message (on_message_complete).
        self.decoder = _framing_parser(self, self.chunked, self.body_length)

    def _inspect(self, data: bytes) -> None:
        """One read of the engine's body: decoded, inspected in one pass, written in one write
        (a read often holds many token events when the gateway is behind the engine)."""
        self.bytes_in += len(data)
        if self.cut:
            return
        assert self.decoder is not None and self.transport is not None  # set once the head was read
        try:
            self.decoder.feed_data(data)
        except httptools.HttpParserError:
            log.warning("request %s: malformed response body from the engine", self.ctx.request_id)
            self.reusable = False
            self.transport.abort()  # what decoded before the error still goes out
        self._drain()
        self._flush()
        if self.complete and not self.cut and not self.done.done():
            self._whole()

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
        assert self.stream is not None  # only a stream's body is pending
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
            self._end_body()
            return
        rid = self.ctx.request_id
        try:
            body = inspect_json(self.ctx, b"".join(self.body_parts), self.chat)
        except GuardrailBlocked as e:
            self.ctx.blocked = e
            self.blocked_status = 400
            self.client.respond(
                400,
                error_body(400, e.message, code="content_policy_violation", request_id=rid),
                rid,
                self.ctx.response_headers,
            )
            self.complete = True
            return
        self.client.write_head(
            self.status, [*self.out_headers, f"content-length: {len(body)}"], rid, self.ctx.response_headers
        )
        self.head_sent = True
        self.client.transport.write(body)
        self._count(body)
        self.complete = True

    def _send_chunk(self, out: bytes) -> None:
        if out:
            self.out.append(b"%x\r\n%b\r\n" % (len(out), out) if self.framed else out)

    def _end_body(self) -> None:
        if self.framed:
            self.out.append(b"0\r\n\r\n")
        self.complete = True

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
        self.reusable = False
        self.pending.clear()
        self.ctx.blocked = e
        assert self.stream is not None and self.transport is not None  # only a stream is cut
        self.stream.close()
        self._send_chunk(blocked_event(e, self.ctx.request_id))
        self._end_body()
        self._flush()
        self.transport.abort()

    def progress(self) -> int:
        """Bytes seen from the engine so far (for the gateway's check on silent engines)."""
        return self.bytes_out + self.bytes_in + len(self.buf)

    def give_up(self, idle_s: float) -> None:
        """The engine sent nothing for idle_s: end the request as a gateway timeout."""
        self.stalled_s = idle_s
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    def _failure(self) -> tuple[int, str, str]:
        """Status, message and code for a response the engine did not finish."""
        if self.stalled_s is not None:
            return (
                504,
                f"The model replica sent nothing for {self.stalled_s:g} s; the request was ended.",
                "engine_timeout",
            )
        return 502, CUT_MESSAGE, "engine_failure"

    def _end_cut_stream(self) -> bool:
        """The engine's connection ended inside the body: end the client's stream with an error
        event and a well-formed end. False when the framing cannot be ended cleanly."""
        status, message, code = self._failure()
        event = b"data: " + error_body(status, message, code=code, request_id=self.ctx.request_id) + b"\n\n"
        if self.inspecting:
            if self.stream is None or self.stream is _PASS:
                return False  # a JSON body (not sent yet) or unframed bytes: no event to add
            self.pending.clear()  # a partial event, and text held back undecided, are dropped
            self._send_chunk(event)
            self._end_body()
            self._flush()
            return True
        # Raw relay: vLLM writes one event per chunk, so a read that ended a chunk ended an event.
        if self.chunked and self.framed and self.last.endswith(b"\n\n\r\n"):
            data = b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event)
            self.client.transport.write(data)
            self._count(data)
            return True
        return False

    def pause_client_reads(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_client_reads(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        if self.done.done():
            return
        if self.reused and not self.buf and not self.status and not self.client.closed and self.stalled_s is None:
            # A pooled connection the engine closed as the request went out: it never began.
            self.done.set_result(None)  # the gateway sends it again on a fresh connection
            return
        self._finish()

    def _finish(self) -> None:
        """The request's outcome, once the response ended (whole, or with the connection)."""
        rid = self.ctx.request_id
        if self.client.closed and not (self.head_sent and self.body_complete()):
            outcome = Outcome(
                499, error="client disconnected", first_byte_at=self.first_byte_at, bytes_out=self.bytes_out
            )
        elif self.is_error:
            body = bytes(self.buf)
            if any(k == "transfer-encoding" and "chunked" in v.lower() for k, v in self.headers):
                body = decode_chunked(body)
            payload = reshape_upstream_error(self.status, body, rid)
            msg = json.loads(payload)["error"]["message"]
            self.client.respond(self.status, payload, rid, self.ctx.response_headers)
            outcome = Outcome(self.status, error=msg)
        elif not self.head_sent:
            status, msg, code = (
                self._failure()
                if self.stalled_s is not None
                else (502, "The model replica closed the connection before answering.", "engine_failure")
            )
            self.client.respond(status, error_body(status, msg, code=code, request_id=rid), rid)
            outcome = Outcome(status, error=msg)
        elif self.blocked_status is not None:
            outcome = Outcome(self.blocked_status, error=self.ctx.blocked.message)
        elif self.cut:
            outcome = Outcome(
                self.status, error=self.ctx.blocked.message, first_byte_at=self.first_byte_at, bytes_out=self.bytes_out
            )
        elif not self.body_complete() and (self.inspecting or self.chunked or self.body_length is not None):
            # The engine stopped mid-body (its process died, the connection broke).
            log.warning("request %s: the engine's response ended before its end", rid)
            if not self._end_cut_stream():
                self.client.keep_alive = False  # the client must not read a truncated body as whole
            status, msg, _ = self._failure()
            outcome = Outcome(status, error=msg, first_byte_at=self.first_byte_at, bytes_out=self.bytes_out)
        else:
            outcome = Outcome(self.status, first_byte_at=self.first_byte_at, bytes_out=self.bytes_out)
        if self.inspecting and self.stream is not None:
            self.stream.close()  # however it ended, the watches record what they did (idempotent)
        # The decoder calls back into this object: a cycle that would keep the request (its body,
        # maybe megabytes) until the cyclic GC runs.
        self.decoder = None
        self.done.set_result(outcome)


class _Passthrough:
    """The decode-mode stand-in for an inspector: the body as it comes."""

    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


_PASS = _Passthrough()
