"""The gateway: decide once per request, then relay the engine's response as raw bytes.

What costs throughput on the generation path is work per streamed chunk (see
docs/architecture.md). So the gateway does its work where it is per request: the client's
connection (serving/gateway/http.py) reads the request head, which the gateway checks at once
(route, key, capacity: `admit_head`), then the body; the request-path stages run once; an
engine replica is picked and the relay (serving/gateway/relay.py) copies the engine's response
to the client, unparsed unless a policy must read it. Nothing in the gateway runs per token.

Built on asyncio protocols (uvloop in production) and httptools, not on an ASGI framework: an
ASGI app turns every chunk into a message and an `await`, the per-chunk cost we avoid
(measured against uvicorn, aiohttp and granian in benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import resource
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serving.errors import GatewayError, error_body
from serving.gateway import admin_models, anomalies
from serving.gateway.endpoints import Endpoint, EndpointPool
from serving.gateway.engine_conns import EngineConnections
from serving.gateway.heap import return_large_blocks_to_the_os
from serving.gateway.hold import HoldSettings, RequestHold
from serving.gateway.http import ClientConnection, Request
from serving.gateway.limits import HttpLimits
from serving.gateway.metrics import UNROUTED, GatewayMetrics
from serving.gateway.relay import Upstream, request_bytes
from serving.gateway.routes import ADMIN, MAIN, METRICS, PUBLIC, find_route
from serving.gateway.shadow import Shadows
from serving.gateway.stages import Outcome, Pipeline, RequestContext
from serving.model_registry.jobs import RegistrationJobs
from serving.ops.replica_time import ReplicaCensus
from serving.plan import CONTROL_APP

if TYPE_CHECKING:
    from serving.gateway.policy import PolicyRuntime

log = logging.getLogger("keel.gateway")

RETRY_AFTER_S = 5
_FDS_PER_CONNECTION = 2  # a client connection and its engine connection


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    limits: HttpLimits = field(default_factory=HttpLimits)
    connect_timeout_s: float = 5.0
    reuse_port: bool = False  # only replicas of one stack may share a port
    metrics_port: int | None = None  # a second listener serving /metrics (and /health) without a key
    metrics_host: str = "127.0.0.1"
    engine_api_key: str | None = field(default=None, repr=False)  # the stack's secret, sent to engines


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        models: list[str],
        pipeline: Pipeline,
        pool: EndpointPool | None = None,
        metrics: GatewayMetrics | None = None,
        model_info: dict[str, dict] | None = None,
        registrations: RegistrationJobs | None = None,
        wake=None,
    ):
        self.settings = settings
        self.limits = settings.limits
        self.models = list(models)
        self.pipeline = pipeline
        self.pool = pool or EndpointPool()
        self.census = ReplicaCensus()  # what this gateway has written of the replica counts
        self.metrics = metrics or GatewayMetrics()
        self.model_info = model_info or {}
        self.runtime: PolicyRuntime | None = None  # once a policy is set
        self.registrations = registrations or RegistrationJobs()  # its models_dir: each reconfigure
        # Models that scale to zero: their requests wait for a replica (serving.gateway.hold).
        self.hold = RequestHold(
            lambda m: self.pool.count(m) > 0, wake, on_change=lambda m, n: self.metrics.held.labels(m).set(n)
        )
        self.max_connections = _connection_cap(self.limits.max_connections)
        # Idle keep-alive connections to each replica (serving/gateway/engine_conns.py).
        self.engine_conns = EngineConnections(self.limits.engine_keepalive_connections, self.limits.engine_keepalive_s)
        self.connections = 0
        self.requests_in_flight = 0
        self.body_bytes = 0  # request-body bytes held, all requests together
        self.shadows = Shadows(self.pool, self.metrics, settings)
        self._servers: list[asyncio.Server] = []
        self._relays: dict[Upstream, tuple[int, float]] = {}  # in flight: (progress seen, since when)
        self._watch: asyncio.Task | None = None
        self._created = int(time.time())

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        return_large_blocks_to_the_os()  # request bodies: their memory goes back once answered
        self._servers.append(await self._listen(s.host, s.port, MAIN))
        if s.metrics_port is not None:
            self._servers.append(await self._listen(s.metrics_host, s.metrics_port, METRICS))
        self._watch = asyncio.get_running_loop().create_task(self._watch_engines())

    async def _listen(self, host: str, port: int, listener: str) -> asyncio.Server:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.settings.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            # Several gateway replicas on one node share the port; the kernel spreads connections.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: ClientConnection(self, listener), sock=sock)

    @property
    def port(self) -> int:
        return self._servers[0].sockets[0].getsockname()[1]

    @property
    def metrics_listen_port(self) -> int | None:
        return self._servers[1].sockets[0].getsockname()[1] if len(self._servers) > 1 else None

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        self.engine_conns.close()
        self.registrations.stop()

    async def _watch_engines(self) -> None:
        """End requests whose engine has sent nothing for engine_idle_timeout_s (a hung engine
        must not hold a client, a connection and a quota reservation for ever). A sweep every
        few seconds instead of a timer per request: the relay's hot path stays a copy."""
        timeout = self.limits.engine_idle_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(10.0, timeout / 4))
            self.engine_conns.sweep()
            now = loop.time()
            for up, (seen, since) in list(self._relays.items()):
                progress = up.progress()
                if progress != seen:
                    self._relays[up] = (progress, now)
                elif now - since >= timeout:
                    log.warning("request %s: the engine sent nothing for %gs; ending it", up.ctx.request_id, timeout)
                    del self._relays[up]
                    up.give_up(timeout)

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting connections; wait up to timeout_s for the requests in flight to
        finish. Returns how many were still in flight."""
        for server in self._servers:
            server.close()  # the listening sockets only: open connections carry on
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.requests_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return self.requests_in_flight

    def set_models(
        self, models: list[str], model_info: dict[str, dict], holds: dict[str, HoldSettings] | None = None
    ) -> None:
        """The models this gateway routes to (each `keel apply` that adds or removes one), and
        those of them that scale to zero, whose requests wait for a replica."""
        for gone in set(self.models) - set(models):
            for gauge in (self.metrics.endpoints, self.metrics.held):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self.models = list(models)
        self.model_info = dict(model_info)
        self.hold.configure(holds or {})
        for model in self.models:
            self.metrics.endpoints.labels(model).set(self.pool.count(model))

    def update_endpoints(self, snapshot: dict[str, list[dict]]) -> None:
        self.pool.update(snapshot)
        self.engine_conns.keep_only(self.pool.all())  # a replica that left: its connections go
        for model in self.models:
            self.metrics.endpoints.labels(model).set(self.pool.count(model))
        self.hold.endpoints_changed()
        self._record_replicas()

    def set_policy(self, runtime) -> None:
        """Swap in a new policy version; requests in flight finish on the one they started with."""
        # The new version closed what of the old one it does not carry over (PolicyRuntime).
        old_log = getattr(self.runtime, "audit_log", None)
        self.runtime = runtime
        self.pipeline = runtime.pipeline
        if getattr(runtime, "audit_log", None) is not old_log:
            self.census.reset()  # a new log starts with every model's count
        self._record_replicas()

    def _record_replicas(self) -> None:
        """Replica counts for `keel cost` (serving.ops.replica_time): on a registry update or a
        policy swap, never on the request path; an enqueue per changed model."""
        audit_log = getattr(self.runtime, "audit_log", None)
        if audit_log is None:
            return
        with contextlib.suppress(RuntimeError):  # closed: the gateway is stopping
            for rec in self.census.observe(self.pool.replica_counts(), time.time()):
                audit_log.write(rec)

    # -- the front door: what ClientConnection asks before and after each request ------------

    def connection_opened(self, conn: ClientConnection) -> bool:
        if self.connections >= self.max_connections:
            return False
        self.connections += 1
        return True

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections -= 1

    def admit_head(self, conn: ClientConnection, req: Request, content_length: int) -> None:
        """The verdict on a request head, before its body is read: route, key, size, capacity.
        Raises GatewayError; on success the request holds an in-flight slot and its body's bytes."""
        route = find_route(conn.listener, req.path)
        rt = self.runtime
        keyed = rt is not None and not rt.open
        if keyed and (route is None or route.access != PUBLIC):
            # With tenants, only a key opens anything but the public routes (unknown paths too).
            assert rt is not None  # keyed says so
            req.principal = rt.keyring.authenticate(req.headers.get("authorization"))  # AuthError: 401
        if route is None:
            raise GatewayError(404, f"No route {req.method} {req.path}.", code="unknown_route")
        if req.method not in route.methods:
            allowed = ", ".join(sorted(route.methods))
            raise GatewayError(
                405, f"Use {allowed} for {req.path}.", code="method_not_allowed", headers={"allow": allowed}
            )
        if route.access == ADMIN and keyed:
            assert req.principal is not None  # authenticated above: the route is not public
            if req.principal.role != "admin":
                raise GatewayError(403, f"{req.path} needs an admin key.", code="admin_only")
        req.route = route
        limits = self.limits
        if content_length > limits.max_body_bytes:
            raise _too_large(limits)
        if self.requests_in_flight >= limits.max_requests_in_flight:
            raise _busy("requests in flight")
        if self.body_bytes + content_length > limits.max_buffered_body_bytes:
            raise _busy("request bytes held")
        self.requests_in_flight += 1
        req.counted = True
        self.body_bytes += content_length
        req.body_reserved = content_length

    def grow_body(self, req: Request, size: int) -> GatewayError | None:
        """A body past what it reserved (chunked: its head gives no length): reserve more of the
        budget, in steps so that not every piece checks it; or the error that refuses it."""
        limits = self.limits
        if size > limits.max_body_bytes:
            return _too_large(limits)
        extra = min(max(size - req.body_reserved, 65536), limits.max_body_bytes - req.body_reserved)
        if self.body_bytes + extra > limits.max_buffered_body_bytes:
            return _busy("request bytes held")
        self.body_bytes += extra
        req.body_reserved += extra
        return None

    def release(self, req: Request) -> None:
        """A request is answered (or will never be): give back its slot and body budget."""
        if req.counted:
            req.counted = False
            self.requests_in_flight -= 1
        if req.body_reserved:
            self.body_bytes -= req.body_reserved
            req.body_reserved = 0

    def record_refusal(self, conn: ClientConnection, req: Request | None, err: GatewayError) -> None:
        """Every refusal the front door writes is an audit record and a metric."""
        received = req.received_at if req is not None else time.monotonic()
        p = req.principal if req is not None else None
        self._record(
            req.request_id if req is not None else "-",
            req.method if req is not None else "-",
            req.path if req is not None else "-",
            err.status,
            err.message,
            received,
            p,
        )

    def log_internal_error(self, exc: BaseException) -> None:
        log.error("gateway error while reading a request", exc_info=exc)

    def _record(
        self, rid: str, method: str, path: str, status: int, error: str | None, received_at: float, principal=None
    ) -> None:
        tenant = principal.tenant if principal is not None else None
        self.metrics.observe(None, received_at, Outcome(status, error=error), tenant or UNROUTED)
        if self.runtime is not None:
            self.runtime.audit_plain(
                rid,
                method,
                path,
                status,
                error,
                received_at,
                tenant=tenant,
                key_id=principal.key_id if principal is not None else None,
            )

    # -- answering ---------------------------------------------------------------------------

    async def handle(self, conn: ClientConnection, req: Request) -> None:
        route = req.route
        assert route is not None  # admit_head routed it, or the request was refused
        rid = req.request_id
        if route.handler == "proxy":
            await self._proxy(conn, req, rid)
            return
        status, error = 200, None
        try:
            status, body, headers, ctype = await getattr(self, "_" + route.handler)(req)
            conn.respond(status, body, rid, headers, content_type=ctype)
        except GatewayError as e:
            status, error = e.status, e.message
            conn.respond(e.status, e.body(rid), rid, e.headers)
        except Exception:  # never a stack trace to the client; the log has it
            log.exception("request %s failed", rid)
            status, error = 500, "internal error"
            conn.respond(500, error_body(500, "Internal gateway error.", request_id=rid), rid)
        if route.access != PUBLIC or status >= 400:  # probes and scrapes that worked are not news
            self._record(rid, req.method, req.path, status, error, req.received_at, req.principal)

    async def _models(self, req: Request):
        return 200, json.dumps(self._models_body(req)).encode(), None, "application/json"

    async def _model_card(self, req: Request):
        name = req.path[len("/v1/models/") :]
        card = next((m for m in self._models_body(req)["data"] if m["id"] == name), None)
        if card is None:
            raise GatewayError(404, f"The model `{name}` does not exist.", code="model_not_found")
        return 200, json.dumps(card).encode(), None, "application/json"

    def _serving(self, model: str) -> bool:
        """A model can answer: it has a ready replica, or it scales to zero and its requests wait
        for one (at zero replicas between bursts, it is idle, not down)."""
        return self.pool.count(model) > 0 or self.hold.applies(model)

    async def _health(self, req: Request):
        ready = {m: self.pool.count(m) for m in self.models}
        ok = all(self._serving(m) for m in self.models)
        # Each replica's own start (constructor to engine ready): `keel bench` records it for the
        # simulator's cold start, which the stack's start to ready overstates (Ray's start in it).
        starts = {m: self.pool.start_seconds(m) for m in self.models}
        body = json.dumps({"status": "ok" if ok else "starting", "replicas": ready, "replica_start_s": starts}).encode()
        return (200 if ok else 503), body, ({} if ok else {"retry-after": str(RETRY_AFTER_S)}), "application/json"

    async def _serve_healthz(self, req: Request):
        # As Ray's proxy answers it: KubeRay's exec probe greps the body for "success".
        if all(self._serving(m) for m in self.models):
            return 200, b"success", None, "text/plain"
        return 503, b"No replicas are available yet.", {"retry-after": str(RETRY_AFTER_S)}, "text/plain"

    async def _serve_routes(self, req: Request):
        # Ray's proxy: {route prefix: application}; the front application owns every path.
        status, body, headers, _ = await self._serve_healthz(req)
        if status != 200:
            return status, body, headers, "text/plain"
        return 200, json.dumps({"/": CONTROL_APP}).encode(), None, "application/json"

    async def _metrics(self, req: Request):
        return 200, await self.metrics.render(self.pool.all()), None, GatewayMetrics.CONTENT_TYPE

    async def _admin_policy(self, req: Request):
        return 200, json.dumps(policy_summary(self.runtime)).encode(), None, "application/json"

    _admin_models = admin_models.admin_models
    _admin_register = admin_models.admin_register
    _admin_registration = admin_models.admin_registration
    _admin_anomalies = anomalies.admin_anomalies

    async def _proxy(self, client: ClientConnection, req: Request, rid: str) -> None:
        ctx = RequestContext(rid, req.method, req.path, req.headers, req.body, received_at=req.received_at)
        if "x-request-id" in req.headers:
            # The engine needs ids unique among requests in flight; a client's may repeat.
            ctx.upstream_headers["x-request-id"] = f"{rid}-{uuid.uuid4().hex[:8]}"
        pipeline = self.pipeline  # a reload mid-request must not change who sees on_complete
        outcome: Outcome | None = None
        try:
            await pipeline.admit(ctx)
            if ctx.shadow is not None:
                self.shadows.spawn(ctx)
            outcome = await self._relay(client, ctx)
        except GatewayError as e:
            client.respond(e.status, e.body(rid), rid, {**ctx.response_headers, **e.headers})
            outcome = Outcome(e.status, error=e.message)
        except asyncio.CancelledError:  # the client went away during admission
            outcome = Outcome(499, error="client disconnected")
            raise
        except Exception:  # never a stack trace to the client; the log has it
            log.exception("request %s failed", rid)
            client.respond(500, error_body(500, "Internal gateway error.", request_id=rid), rid)
            outcome = Outcome(500, error="internal error")
        finally:
            if outcome is None:  # cannot happen but by a bug above: recorded all the same
                outcome = Outcome(500, error="internal error")
            pipeline.complete(ctx, outcome)
            self.metrics.observe_request(ctx, outcome)

    async def _relay(self, client: ClientConnection, ctx: RequestContext) -> Outcome:
        model = ctx.target
        assert model is not None
        fresh = False
        while True:
            ep, upstream = await self._connect(client, ctx, fresh)
            self.metrics.in_flight.labels(model).inc()
            try:
                outcome = await self._exchange(client, ctx, ep, upstream)
            finally:
                ep.in_flight -= 1
                self.metrics.in_flight.labels(model).dec()
            if outcome is not None:
                return outcome
            # A pooled connection the engine closed as the request went out (no answer came):
            # once more, on a new connection (a fresh one is never retried, so this runs once).
            fresh = True

    async def _connect(self, client: ClientConnection, ctx: RequestContext, fresh: bool) -> tuple[Endpoint, Upstream]:
        """A replica of the request's model and a connection to it: an idle pooled one, or a
        new one (fresh: always new). Replicas that do not answer are skipped; a model that
        scales to zero holds the request for a replica."""
        model = ctx.target
        assert model is not None
        tried: tuple[Endpoint, ...] = ()
        loop = asyncio.get_running_loop()
        held_until = None
        conns = self.engine_conns
        while True:
            ep = self.pool.pick(model, exclude=tried)
            if ep is None and self.hold.applies(model) and self.pool.count(model) == 0:
                # Scaled to zero (or every replica gone): wait for one, within the model's hold.
                if held_until is None:
                    held_until = loop.time() + self.hold.timeout_s(model)
                await self.hold.wait(model, held_until)
                tried = ()
                continue
            if ep is None:
                raise GatewayError(
                    503,
                    f"No replica of `{ctx.model}` is ready yet; retry shortly.",
                    code="model_not_ready",
                    headers={"retry-after": str(RETRY_AFTER_S)},
                )
            ep.in_flight += 1  # counted from the pick, so concurrent picks spread while connecting
            release = functools.partial(conns.give, ep) if conns.enabled else None
            upstream = Upstream(client, ctx, loop, release)
            pooled = None if fresh or release is None else conns.take(ep)
            if pooled is not None:
                upstream.attach(pooled)
                return ep, upstream
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: upstream, ep.host, ep.port),  # noqa: B023 - called in this await
                    self.settings.connect_timeout_s,
                )
                self.metrics.engine_connections.labels(model).inc()
                return ep, upstream
            except (OSError, asyncio.TimeoutError):
                ep.in_flight -= 1
                log.warning("replica %s of %s at %s:%s unreachable", ep.replica_id, model, ep.host, ep.port)
                self.pool.mark_down(ep)
                conns.drop(ep)
                tried += (ep,)
            except asyncio.CancelledError:
                ep.in_flight -= 1
                raise

    async def _exchange(
        self, client: ClientConnection, ctx: RequestContext, ep: Endpoint, upstream: Upstream
    ) -> Outcome | None:
        """Send the request on upstream's connection and relay the answer; None when a pooled
        connection ended before any answer (the caller retries on a new one)."""
        assert upstream.transport is not None  # connected above
        if client.closed:
            upstream.transport.abort()
            return Outcome(499, error="client disconnected")
        client.upstream = upstream
        self._relays[upstream] = (0, asyncio.get_running_loop().time())
        try:
            keep_alive = upstream.release is not None
            upstream.transport.write(request_bytes(ctx, ep, self.settings.engine_api_key, keep_alive))
            ctx.sent_to_engine = True
            return await upstream.done
        finally:
            self._relays.pop(upstream, None)
            client.upstream = None

    def _models_body(self, req: Request) -> dict:
        p = req.principal
        rt = self.runtime
        names = list(self.models) + (list(rt.policy.experiments) if rt is not None else [])
        if p is not None:
            assert rt is not None  # only a policy with tenants authenticates
            names = [n for n in names if n in rt.allowed[p.tenant]]
        data = []
        for m in names:
            card = {"id": m, "object": "model", "created": self._created, "owned_by": "keel"}
            card.update(self.model_info.get(m, {}))
            if rt is not None and m in rt.policy.experiments:
                card["variants"] = list(rt.policy.experiments[m].variants)
            data.append(card)
        return {"object": "list", "data": data}


def _too_large(limits: HttpLimits) -> GatewayError:
    return GatewayError(413, f"The request body exceeds {limits.max_body_bytes} bytes.", code="request_too_large")


def _busy(what: str) -> GatewayError:
    return GatewayError(
        503, f"The gateway is at its limit of {what}; retry shortly.", code="overloaded", headers={"retry-after": "1"}
    )


def _connection_cap(configured: int) -> int:
    """max_connections, lowered to what the open-file limit allows (raised to its hard limit first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return configured
    allowed = max(16, (soft - 256) // _FDS_PER_CONNECTION)
    if allowed < configured:
        log.warning(
            "server.limits.max_connections %d lowered to %d: the open-file limit is %d", configured, allowed, soft
        )
    return min(configured, allowed)


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
