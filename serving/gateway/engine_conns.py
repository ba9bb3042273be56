"""Keep-alive connections to engine replicas: a bounded pool of idle connections per replica.

A new connection per request costs the gateway a connect and a close, and costs vLLM's server
a connection set-up per request (issue 17 saw bare vLLM give 6,500-6,900 tok/s to a keep-alive
client and 1,700 tok/s with a connection per request). Through Keel on the 2-core box the pool
measured 0.97 / 1.07 / 0.97x the code before it at c = 1 / 16 / 64 (benchmarks/README.md): no
change that box resolves, the gateway's loopback connects being cheap beside the rest. The
relay (serving/gateway/relay.py) sends each request on a pooled connection when one is idle.
The rules:

- a connection comes back only after a whole response (its framing said where it ends) that
  the engine did not end with `connection: close`, that was not an error, and whose request
  had left the gateway whole; every other ending closes it;
- a client that leaves mid-response aborts its engine connection (vLLM then aborts the
  generation), so that connection is never pooled;
- an idle connection is used only within `engine_keepalive_s` of its last response, below
  the engine's own keep-alive timeout (vLLM: 5 s, VLLM_HTTP_TIMEOUT_KEEP_ALIVE), so no request
  goes out on a connection the engine is closing for idleness; one the engine closed anyway
  (EOF while idle) leaves the pool at once; a request whose reused connection ends before any
  byte of answer is sent once more on a fresh one (serving/gateway/server.py);
- at most `engine_keepalive_connections` idle per replica (0: a connection per request, the
  engine told `connection: close`); a replica that leaves the registry, or fails a connect,
  has its idle connections closed.

Idle connections are kept newest last and taken newest first, so under light load the same
few stay warm and the rest age out.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable


class _Idle(asyncio.Protocol):
    """A pooled connection between requests: a byte or an EOF from the engine retires it."""

    __slots__ = ("pool", "key", "transport", "since")

    def __init__(self, pool: EngineConnections, key: Hashable, transport: asyncio.Transport, since: float):
        self.pool = pool
        self.key = key
        self.transport = transport
        self.since = since

    def data_received(self, data: bytes) -> None:
        self.transport.abort()  # nothing is asked: a byte now is a protocol error

    def eof_received(self) -> bool:
        return False  # the engine closed it (its keep-alive timeout, a shutdown): close our side

    def connection_lost(self, exc) -> None:
        self.pool._forget(self)


class EngineConnections:
    def __init__(self, per_replica: int, keepalive_s: float, clock: Callable[[], float] = time.monotonic):
        self.per_replica = per_replica
        self.keepalive_s = keepalive_s
        self.clock = clock
        self._idle: dict[Hashable, deque[_Idle]] = {}

    @property
    def enabled(self) -> bool:
        return self.per_replica > 0

    def take(self, key: Hashable) -> asyncio.Transport | None:
        """An idle connection to the replica, fresh enough to use; None when there is none."""
        idle = self._idle.get(key)
        if not idle:
            return None
        conn = idle.pop()
        if self.clock() - conn.since <= self.keepalive_s and not conn.transport.is_closing():
            return conn.transport
        conn.transport.close()  # the newest is too old (or closing): so are all below it
        self._close_all(idle)
        return None

    def give(self, key: Hashable, transport: asyncio.Transport) -> None:
        """A connection whose response ended whole: kept idle, or closed when the pool is full."""
        idle = self._idle.setdefault(key, deque())
        if len(idle) >= self.per_replica or transport.is_closing():
            transport.close()
            return
        if not transport.is_reading():
            transport.resume_reading()  # paused for a slow client: an idle one must see EOF
        conn = _Idle(self, key, transport, self.clock())
        transport.set_protocol(conn)
        idle.append(conn)

    def idle_count(self, key: Hashable | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(d) for d in self._idle.values())

    def drop(self, key: Hashable) -> None:
        """Close a replica's idle connections (it left the registry, or failed a connect)."""
        idle = self._idle.pop(key, None)
        if idle:
            self._close_all(idle)

    def keep_only(self, keys: Iterable[Hashable]) -> None:
        """Drop the pools of replicas not in `keys` (the registry's current set)."""
        live = set(keys)
        for key in [k for k in self._idle if k not in live]:
            self.drop(key)

    def sweep(self) -> None:
        """Close connections idle past keepalive_s (the engine closes them too; this frees them
        when it does not)."""
        cutoff = self.clock() - self.keepalive_s
        for idle in list(self._idle.values()):
            while idle and idle[0].since < cutoff:
                idle.popleft().transport.close()

    def close(self) -> None:
        for key in list(self._idle):
            self.drop(key)

    def _close_all(self, idle: deque[_Idle]) -> None:
        while idle:
            idle.popleft().transport.close()

    def _forget(self, conn: _Idle) -> None:
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
