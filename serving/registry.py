"""Where each model's engine replicas can be reached: heartbeats in, snapshots out.

Engine replicas register their HTTP address when their engine answers and renew it every few
seconds; an entry that is not renewed expires. Gateways poll snapshots off the request path.
Plain Python: the Ray Serve deployment that hosts it is built in serving.app.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

# The watch loop wakes at least once a second. Woken this much later than it asked, the process
# did not run meanwhile (starved of CPU): the heartbeats sent in that time wait in its queue.
STALL_S = 2.0


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
        self._excused_until = float("-inf")  # the end of the last stall forgiven (see _excuse)

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
            wait, asked = min(remaining, 1.0), self._clock()
            try:  # wake at least every second to expire silent replicas
                await asyncio.wait_for(self._changed.wait(), wait)
            except asyncio.TimeoutError:
                pass
            self._excuse(asked + wait, self._clock())

    def _excuse(self, due: float, woke: float) -> None:
        """Woken at `woke` for a wake-up due at `due`: a gap past STALL_S is time this process
        did not run, and it does not count against any replica's heartbeats, which wait in its
        queue meanwhile. Without this, a registry starved for ttl_s (a 2-core box under load, CI)
        expired every replica at once and gateways answered 503 until the queued heartbeats ran,
        ~0.1 s later. Each stretch is forgiven once, however many watchers wake from it."""
        start = max(due, self._excused_until)
        if woke - start <= STALL_S:
            return
        gap = woke - start
        self._entries = {rid: (info, min(seen + gap, woke)) for rid, (info, seen) in self._entries.items()}
        self._excused_until = woke

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
