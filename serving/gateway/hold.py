"""Scale to zero: a request for a model with no ready replica waits here while one starts.

Only models whose autoscaling allows zero replicas (`min_replicas: 0`) are held; the others get
503 `model_not_ready` at once, as before. Per model, a bounded FIFO per gateway: a request past
`hold_max_requests` gets 503 at once, one past `hold_timeout_s` gets 503 with `retry-after`; a
client that leaves while held is dropped (its task is cancelled by the connection). Released in
arrival order as soon as the gateway's endpoint pool has a ready replica of the model.

Held demand must reach the autoscaler, which sees engines, not gateways: while a request is held,
the hold keeps one `wake` call outstanding for it (serving.gateway.replica makes that a Ray Serve
handle call to the model's engine deployment). With no replica, Ray queues those calls in the
handle and reports them to its controller, which starts a replica; the calls return once one runs.
One call per held request, not one per model carrying a count: the controller counts queued
calls, never reads their arguments, so only one call each makes it see how many are held.

Plain asyncio and plain data: the waker is injected, so tests need no Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from serving.errors import GatewayError

log = logging.getLogger("keel.gateway")

RECHECK_S = 1.0  # a replica marked down after a failed connect comes back by the clock, not an event
WAKE_RETRY_S = (1.0, 2.0, 5.0, 10.0)  # backoff after a wake call fails (deployment not there yet, ...)


@dataclass(frozen=True)
class HoldSettings:
    """One model's hold (from its autoscaling block: hold_timeout_s, hold_max_requests)."""

    timeout_s: float = 300.0
    max_requests: int = 64

    @classmethod
    def from_dict(cls, d: dict) -> HoldSettings:
        return cls(float(d["timeout_s"]), int(d["max_requests"]))


class RequestHold:
    """The held requests of one gateway, per model."""

    def __init__(
        self,
        ready: Callable[[str], bool],
        wake: Callable[[str], Awaitable] | None = None,
        on_change: Callable[[str, int], None] | None = None,
        recheck_s: float = RECHECK_S,
    ):
        self._ready = ready  # model -> has a replica the gateway can route to
        self._wake = wake  # model -> a call that returns once a replica of the model runs
        self._on_change = on_change  # (model, requests held): for the gauge
        self.recheck_s = recheck_s
        self.settings: dict[str, HoldSettings] = {}
        self._queues: dict[str, deque[asyncio.Future]] = {}
        self.wake_failures = 0

    def configure(self, settings: dict[str, HoldSettings]) -> None:
        """The models that may be held and how (each reconfigure). Requests already held keep
        their deadline; a model that no longer scales to zero has its held requests released,
        so they take today's path (a replica, or 503)."""
        self.settings = dict(settings)
        for model in list(self._queues):
            if model not in self.settings:
                self._release(model)

    def applies(self, model: str) -> bool:
        return model in self.settings

    def timeout_s(self, model: str) -> float:
        return self.settings[model].timeout_s

    def held(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def endpoints_changed(self) -> None:
        """Release, in arrival order, the held requests of every model that has a ready replica."""
        for model in list(self._queues):
            if self._ready(model):
                self._release(model)

    async def wait(self, model: str, deadline: float) -> None:
        """Hold the calling request until a replica of `model` is ready (returns) or `deadline`
        (loop time) passes, or the queue is full (GatewayError 503). Cancellation (the client
        left) takes it out of the queue."""
        loop = asyncio.get_running_loop()
        settings = self.settings[model]
        queue = self._queues.setdefault(model, deque())
        if len(queue) >= settings.max_requests:
            if not queue:
                self._queues.pop(model, None)
            raise GatewayError(
                503,
                f"No replica of `{model}` is ready and {settings.max_requests} requests already wait "
                "for one to start; retry shortly.",
                code="model_not_ready",
                headers={"retry-after": str(_retry_after(settings.timeout_s))},
            )
        released = loop.create_future()
        queue.append(released)
        self._changed(model)
        waker = loop.create_task(self._keep_waking(model)) if self._wake is not None else None
        try:
            while not released.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise GatewayError(
                        503,
                        f"No replica of `{model}` became ready within {settings.timeout_s:g} s; retry shortly.",
                        code="model_not_ready",
                        headers={"retry-after": str(_retry_after(settings.timeout_s))},
                    )
                try:
                    await asyncio.wait_for(asyncio.shield(released), min(remaining, self.recheck_s))
                except asyncio.TimeoutError:
                    if self._ready(model):
                        self._release(model)
        finally:
            if waker is not None:
                waker.cancel()  # the handle call is cancelled with it: Ray stops counting it
            if not released.done():
                released.cancel()
                with_model = self._queues.get(model)
                if with_model is not None:
                    try:
                        with_model.remove(released)
                    except ValueError:
                        pass
                    if not with_model:
                        del self._queues[model]
                self._changed(model)

    def _release(self, model: str) -> None:
        queue = self._queues.pop(model, None)
        if not queue:
            return
        for fut in queue:  # FIFO: each waiter resumes in the order its future was set
            if not fut.done():
                fut.set_result(None)
        self._changed(model)

    async def _keep_waking(self, model: str) -> None:
        """One wake call for one held request, outstanding until a replica answers it; retried
        (with backoff) when it fails, until the request is released or given up."""
        assert self._wake is not None  # started only with a waker
        for attempt in itertools.count():
            try:
                await self._wake(model)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the request waits on; its deadline bounds this
                self.wake_failures += 1
                if attempt == 0:
                    log.warning("could not ask for a replica of %s (%s: %s); retrying", model, type(e).__name__, e)
                await asyncio.sleep(WAKE_RETRY_S[min(attempt, len(WAKE_RETRY_S) - 1)])

    def _changed(self, model: str) -> None:
        if self._on_change is not None:
            self._on_change(model, self.held(model))


def _retry_after(timeout_s: float) -> int:
    # A client that waited a whole hold has met a slow start; asking it back within a minute
    # keeps it from hammering, and never longer than the hold itself.
    return max(1, min(60, math.ceil(timeout_s)))
