"""Where each model's engine replicas can be reached: heartbeats in, snapshots out.

Engine replicas register their HTTP address when their engine answers and renew it every few
seconds; an entry that is not renewed expires. Gateways poll snapshots off the request path.
Plain Python: the Ray Serve deployment that hosts it is built in serving.app.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EndpointInfo:
    model: str
    replica_id: str
    host: str
    port: int


class EndpointRegistry:
    def __init__(self, ttl_s: float = 10.0, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[EndpointInfo, float]] = {}

    def heartbeat(self, model: str, replica_id: str, host: str, port: int) -> None:
        self._entries[replica_id] = (EndpointInfo(model, replica_id, host, int(port)), self._clock())

    def remove(self, replica_id: str) -> None:
        self._entries.pop(replica_id, None)

    def snapshot(self) -> dict[str, list[dict]]:
        """model -> live endpoints (as dicts, so they cross Ray without pickling classes)."""
        now = self._clock()
        for rid, (_, seen) in list(self._entries.items()):
            if now - seen > self.ttl_s:
                del self._entries[rid]
        out: dict[str, list[dict]] = {}
        for info, _ in self._entries.values():
            out.setdefault(info.model, []).append(asdict(info))
        for eps in out.values():
            eps.sort(key=lambda e: e["replica_id"])
        return out
