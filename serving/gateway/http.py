"""The client side of the gateway: HTTP/1.x on one connection, with a limit on everything.

Parsing is httptools (llhttp, the parser of Node.js and uvicorn); what this module adds is what
a front door facing hostile clients needs, decided as early as the bytes allow:

- sizes: request line (414), header bytes and count (431), body (413: from Content-Length,
  before any of it is read; for a chunked body, as it grows);
- times: the head must arrive within `header_timeout_s` of its first byte, the body within
  `body_timeout_s` of the head (408), and an idle connection goes after `keepalive_timeout_s`;
- the gateway's verdict on the head (route, key, capacity) before the body is read: a refused
  request with a body is answered and the connection closed without reading it;
- pipelining: requests are answered in order, and reading stops while one request waits
  behind the one being answered, so a connection holds at most two requests' bodies;
- a malformed or refused request behind a response in progress is answered after it, so
  the response is not cut;
- HTTP/1.0 clients get no chunked framing (their responses end when the connection does).

The gateway (serving/gateway/server.py) supplies the verdicts and the handling; every
response written here for a refused request is also an audit record and a metric there.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING

import httptools

from serving.errors import GatewayError, status_phrase

if TYPE_CHECKING:
    from serving.gateway.relay import Upstream
    from serving.gateway.routes import Route
    from serving.policy.identity import Principal

# Headers a request may carry once: a second copy is ambiguous (which key? which id?).
_SINGLE = frozenset({"authorization", "x-request-id", "host", "content-type", "x-keel-variant"})
_LINGER_S = 2.0  # after refusing a body: how long to read and drop what the client still sends
_SLICE = 4096  # a read larger than this is parsed in slices of it (see ClientConnection._feed)

_IDLE, _HEAD, _BODY = 0, 1, 2  # where the parser is: between requests, in a head, in a body


class Request:
    """One request as the client sent it, once its head (and later its body) has arrived."""

    __slots__ = (
        "method",
        "path",
        "headers",
        "body",
        "keep_alive",
        "http10",
        "received_at",
        "request_id",
        "principal",
        "route",
        "refusal",
        "body_reserved",
        "counted",
        "expect_body",
    )

    def __init__(
        self, method: str, path: str, headers: dict[str, str], keep_alive: bool, http10: bool, received_at: float
    ):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = b""
        self.keep_alive = keep_alive
        self.http10 = http10
        self.received_at = received_at
        self.request_id = headers.get("x-request-id") or uuid.uuid4().hex
        self.principal: Principal | None = None  # the caller, when the gateway authenticated the head
        self.route: Route | None = None  # once the head is admitted
        self.refusal: GatewayError | None = None  # answered in turn instead of being handled
        self.body_reserved = 0  # bytes of the gateway's body budget this request holds
        self.counted = False  # holds one of the gateway's in-flight slots
        self.expect_body = False


class _Refuse(Exception):
    """Raised from a parser callback: stop parsing this connection and answer `error`."""

    def __init__(self, error: GatewayError, request: Request | None = None):
        self.error = error
        self.request = request


class ClientConnection(asyncio.Protocol):
    """One client connection. `listener` names the socket it came in on ("main" or "metrics")."""

    def __init__(self, gateway, listener: str = "main"):
        self.gateway = gateway
        self.listener = listener
        self.limits = gateway.limits
        self.loop = asyncio.get_running_loop()
        # set by connection_made, which asyncio calls before any other callback
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task | None = None
        self.upstream: Upstream | None = None  # the relay of the response in progress
        self.closed = False
        self.keep_alive = True
        self.http10 = False  # of the request being answered: no chunked framing for it
        self._state = _IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._reading = True
        self._stopped = False  # no further request is read on this connection
        self._deferred: _Refuse | None = None  # a refusal to answer once the queue is done
        self._discarding = False
        self.counted = False  # holds one of the gateway's connection slots
        self._head_seen = 0  # bytes parsed inside the current head (bounds httptools' buffer)
        self._stash: bytes | None = None  # read, not yet parsed: waits until reading resumes
        self._head_cap = (
            self.limits.max_request_line_bytes + self.limits.max_header_bytes + 4 * self.limits.max_headers + 64
        )
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0
        self._req: Request | None = None
        self._started = time.monotonic()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        if not self.gateway.connection_opened(self):
            err = GatewayError(
                503,
                "The gateway has too many open connections; retry shortly.",
                code="too_many_connections",
                headers={"retry-after": "1"},
            )
            self.gateway.record_refusal(self, None, err)
            self.keep_alive = False
            self._write_error(err, uuid.uuid4().hex)
            self._stopped = True
            transport.close()
            return
        self.counted = True
        self._arm(self.limits.keepalive_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._discarding or self._stopped:
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse data; a large read is parsed in slices so that parsing stops soon after a request
        that has to wait (reading is paused) and the rest waits, unparsed, until it is its turn."""
        if len(data) <= _SLICE:
            self._feed_piece(data)
            return
        view = memoryview(data)
        for pos in range(0, len(data), _SLICE):
            if not self._feed_piece(view[pos : pos + _SLICE]):
                return
            if not self._reading:
                self._stash = bytes(view[pos + _SLICE :]) or None
                return

    def _feed_piece(self, piece) -> bool:
        """False when the piece got the connection refused."""
        if self._state != _BODY:
            self._head_seen += len(piece)
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Refuse):
                self._refuse(cause)
            else:  # a bug of ours in a callback: answered as such, never a traceback
                self.gateway.log_internal_error(cause or e)
                self._refuse(_Refuse(GatewayError(500, "Internal gateway error."), self._req))
            return False
        except httptools.HttpParserUpgrade:
            self._refuse(_Refuse(GatewayError(400, "Protocol upgrades are not supported."), self._req))
            return False
        except httptools.HttpParserError as e:
            self._refuse(
                _Refuse(GatewayError(400, f"Malformed HTTP request: {e}.", code="malformed_request"), self._req)
            )
            return False
        if self._state == _HEAD and self._head_seen > self._head_cap:
            self._refuse(_Refuse(_too_big_head(self.limits), self._req))
            return False
        return True

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._disarm()
        # it calls back into this object: a cycle holding what was read (nothing feeds it after this)
        self.parser = None  # type: ignore[assignment]
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()  # the engine sees the disconnect and aborts the request
        elif self.task is not None and not self.task.done():
            self.task.cancel()
        # Requests read and never answered give back what they hold (release is idempotent).
        for req in (*self.queue, self._req, self._deferred.request if self._deferred else None):
            if req is not None:
                self.gateway.release(req)
        self.queue.clear()
        if self.counted:
            self.counted = False
            self.gateway.connection_closed(self)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_client_reads()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_client_reads()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self._state = _HEAD
        self._arm(self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_request_line_bytes:
            raise _Refuse(
                GatewayError(
                    414,
                    f"The request line is longer than {self.limits.max_request_line_bytes} bytes.",
                    code="uri_too_long",
                )
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self.limits.max_header_bytes or len(self._headers) >= self.limits.max_headers:
            raise _Refuse(_too_big_head(self.limits))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        if old is None:
            self._headers[key] = text
        elif key in _SINGLE:
            raise _Refuse(
                GatewayError(400, f"The request has more than one `{key}` header.", code="duplicate_header", param=key)
            )
        else:  # a list-valued header sent in several lines: one value, as RFC 9110 5.3 reads it
            self._headers[key] = old + ", " + text

    def on_headers_complete(self) -> None:
        self._state = _BODY
        self._head_seen = 0
        parser = self.parser
        http10 = parser.get_http_version() == "1.0"
        url = httptools.parse_url(self._url)
        req = Request(
            parser.get_method().decode("latin-1"),
            url.path.decode("latin-1"),
            self._headers,
            parser.should_keep_alive(),
            http10,
            self._started,
        )
        self._req = req
        length = self._headers.get("content-length")
        chunked = "chunked" in self._headers.get("transfer-encoding", "").lower()
        req.expect_body = chunked or (length is not None and length != "0")
        try:
            self.gateway.admit_head(self, req, int(length) if length and length.isdigit() else 0)
        except GatewayError as e:
            req.refusal = e
            if req.expect_body:  # not a byte of it is read
                raise _Refuse(e, req) from None
            return
        if req.expect_body:
            self._arm(self.limits.body_timeout_s)
            if self._headers.get("expect", "").lower() == "100-continue":
                # curl sends this for bodies over 1 KiB and waits a second for it otherwise.
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        else:
            self._disarm()

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        req = self._req
        assert req is not None  # httptools calls on_headers_complete, which sets it, first
        if self._body_len > req.body_reserved:  # a chunked body, past what it has reserved
            err = self.gateway.grow_body(req, self._body_len)
            if err is not None:
                raise _Refuse(err, req)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._state = _IDLE
        req = self._req
        assert req is not None  # set by on_headers_complete
        self._req = None
        req.body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        self.queue.append(req)
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._serve_queue())
        else:
            self._pause()  # one request waits behind the one being answered: read no further

    # -- answering -----------------------------------------------------------------------------

    async def _serve_queue(self) -> None:
        while self.queue and not self.closed:
            req = self.queue.popleft()
            if not self.queue and not self._stopped:
                self._resume()
            self.keep_alive = req.keep_alive
            self.http10 = req.http10
            try:
                if req.refusal is not None:
                    self.gateway.record_refusal(self, req, req.refusal)
                    self._write_error(req.refusal, req.request_id)
                else:
                    await self.gateway.handle(self, req)
            finally:
                self.gateway.release(req)
            if not self.keep_alive:
                self._close()
                return
        if self.closed:
            return
        if self._deferred is not None:
            self._answer_refusal(self._deferred)
        elif self._state == _IDLE:
            self._arm(self.limits.keepalive_timeout_s)

    def _refuse(self, refusal: _Refuse) -> None:
        """Stop reading this connection; answer the refusal now, or after the responses ahead of it."""
        self._stopped = True
        self._disarm()
        self._pause()
        if refusal.request is not None and refusal.request is self._req:
            self._req = None  # released when the refusal is answered
        busy = self.queue or (self.task is not None and not self.task.done())
        if busy:
            self._deferred = refusal
        else:
            self._answer_refusal(refusal)

    def _answer_refusal(self, refusal: _Refuse) -> None:
        req = refusal.request
        self.gateway.record_refusal(self, req, refusal.error)
        if req is not None:
            self.gateway.release(req)
        self.keep_alive = False
        self.http10 = req.http10 if req is not None else False
        self._write_error(refusal.error, req.request_id if req is not None else uuid.uuid4().hex)
        self._linger()

    def _linger(self) -> None:
        """Close after a refusal, reading and dropping what the client still sends for a while,
        so it reads our answer instead of a reset (nginx's lingering close)."""
        if self.closed:
            return
        self._discarding = True
        self._resume()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(_LINGER_S, self._close)

    def _write_error(self, err: GatewayError, rid: str) -> None:
        self.respond(err.status, err.body(rid), rid, err.headers)

    # -- timers --------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.closed:
            return
        if self._state == _IDLE:
            if not self.queue and (self.task is None or self.task.done()):
                self._close()  # idle keep-alive connection: closed without a word, as uvicorn does
            return
        what = "head" if self._state == _HEAD else "body"
        limit = self.limits.header_timeout_s if self._state == _HEAD else self.limits.body_timeout_s
        self._refuse(
            _Refuse(
                GatewayError(408, f"The request {what} did not arrive within {limit:g} s.", code="request_timeout"),
                self._req,
            )
        )

    # -- flow ----------------------------------------------------------------------------------

    def _pause(self) -> None:
        if self._reading and not self.closed:
            self._reading = False
            self.transport.pause_reading()
            if self._state != _IDLE:
                self._disarm()  # we stopped reading, not the client: its clock stops too

    def _resume(self) -> None:
        if self._reading or self.closed:
            return
        self._reading = True
        stash, self._stash = self._stash, None
        if stash and not self._discarding:
            self._feed(stash)  # before new bytes, so that order holds; it may pause again
            if not self._reading or self.closed:
                return
        self.transport.resume_reading()
        if self._state != _IDLE and not self._stopped:
            self._arm(self.limits.header_timeout_s if self._state == _HEAD else self.limits.body_timeout_s)

    def _close(self) -> None:
        if not self.closed:
            self.transport.close()

    # -- writing -------------------------------------------------------------------------------

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
        if self.closed or self.transport.is_closing():
            return
        lines = [f"content-type: {content_type}", f"content-length: {len(body)}"]
        self.write_head(status, lines, rid, headers or {})
        self.transport.write(body)


def _too_big_head(limits) -> GatewayError:
    return GatewayError(
        431,
        f"The request head has more than {limits.max_headers} headers or {limits.max_header_bytes} bytes of them.",
        code="headers_too_large",
    )
