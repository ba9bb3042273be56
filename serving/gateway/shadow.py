"""Shadow traffic: a share of an experiment's requests (serving.policy.routing.shadow_selected)
mirrored to one more model. Its answer is read, measured (status, tokens, duration) and dropped;
the client never waits for it. Never queued: past MAX_SHADOWS_IN_FLIGHT copies are dropped and
counted."""

from __future__ import annotations

import asyncio
import json
import re
import time

import orjson

from serving.gateway.endpoints import Endpoint, EndpointPool
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.relay import request_bytes
from serving.gateway.stages import RequestContext
from serving.httpraw import parse_head

MAX_SHADOWS_IN_FLIGHT = 32  # past this, shadow copies are dropped (counted), never queued
SHADOW_TIMEOUT_S = 300
MAX_SHADOW_RESPONSE = 16 * 1024 * 1024  # read this much of a shadow's answer, at most


class Shadows:
    """The shadow copies one gateway has in flight."""

    def __init__(self, pool: EndpointPool, metrics: GatewayMetrics, settings):
        """settings: the gateway's (connect_timeout_s, engine_api_key), read at each copy."""
        self.pool = pool
        self.metrics = metrics
        self.settings = settings
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, ctx: RequestContext) -> None:
        """Mirror the request to ctx.shadow; its answer is read, measured and dropped."""
        assert ctx.shadow is not None and ctx.model is not None and ctx.payload is not None  # a routed request
        if self._in_flight >= MAX_SHADOWS_IN_FLIGHT:
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
        body = orjson.dumps(payload)
        shadow_ctx = RequestContext(f"{ctx.request_id}-shadow", ctx.method, ctx.path, {}, body)
        shadow_ctx.upstream_headers["content-type"] = "application/json"
        self._in_flight += 1
        ep.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(shadow_ctx, ctx.model, ctx.shadow, ep))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, sctx: RequestContext, model: str, variant: str, ep: Endpoint) -> None:
        started = time.monotonic()
        status = "error"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(ep.host, ep.port), self.settings.connect_timeout_s
            )
            try:
                writer.write(request_bytes(sctx, ep, self.settings.engine_api_key))
                data = await asyncio.wait_for(reader.read(MAX_SHADOW_RESPONSE), SHADOW_TIMEOUT_S)
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
            self._in_flight -= 1
            self.metrics.shadow_requests.labels(model, variant, status).inc()
            self.metrics.shadow_duration.labels(model, variant).observe(time.monotonic() - started)


_USAGE_RE = re.compile(rb'"usage":(\{[^{}]*\})')


def _last_usage(body: bytes) -> dict | None:
    found = _USAGE_RE.findall(body)
    if not found:
        return None
    try:
        return json.loads(found[-1])
    except ValueError:
        return None
