"""Where each model's engine replicas can be reached: heartbeats in, snapshots out.

Engine replicas register their HTTP address when their engine answers and renew it every few
seconds; an entry that is not renewed expires. Gateways poll snapshots off the request path.
Plain Python: the Ray Serve deployment that hosts it is built in serving.app.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EndpointInfo:
    model: str
    replica_id: str
    host: str
    port: int
    start_s: float | None = None  # the replica's own start: constructor to engine answering /health


class EndpointRegistry:
    def __init__(self, ttl_s: float = 10.0, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[EndpointInfo, float]] = {}
        self.version = 0  # bumped whenever the set of endpoints changes (not on renewals)
        self._changed: asyncio.Event | None = None

    def heartbeat(self, model: str, replica_id: str, host: str, port: int, start_s: float | None = None) -> None:
        info = EndpointInfo(model, replica_id, host, int(port), start_s)
        known = self._entries.get(replica_id)
        self._entries[replica_id] = (info, self._clock())
        if known is None or known[0] != info:
            self._bump()

    def remove(self, replica_id: str) -> None:
        if self._entries.pop(replica_id, None) is not None:
            self._bump()

    async def watch(self, known_version: int, timeout_s: float = 30.0) -> tuple[int, dict[str, list[dict]]]:
        """Long poll: return (version, snapshot) once the set differs from known_version, or at timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            self._expire()
            remaining = deadline - loop.time()
            if self.version != known_version or remaining <= 0:
                return self.version, self.snapshot()
            if self._changed is None:
                self._changed = asyncio.Event()
            try:  # wake at least every second to expire silent replicas
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass

    def _bump(self) -> None:
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _expire(self) -> None:
        now = self._clock()
        for rid, (_, seen) in list(self._entries.items()):
            if now - seen > self.ttl_s:
                del self._entries[rid]
                self._bump()

    def snapshot(self) -> dict[str, list[dict]]:
        """model -> live endpoints (as dicts, so they cross Ray without pickling classes)."""
        self._expire()
        out: dict[str, list[dict]] = {}
        for info, _ in self._entries.values():
            out.setdefault(info.model, []).append(asdict(info))
        for eps in out.values():
            eps.sort(key=lambda e: e["replica_id"])
        return out
