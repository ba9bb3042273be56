"""The gateway's view of engine replicas: pick one per request, least requests in flight.

One gateway sees every request it sends, so its in-flight counts are exact for its own
traffic; ties break at random so several gateways do not pile onto the same replica.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Endpoint:
    model: str
    replica_id: str
    host: str
    port: int
    in_flight: int = 0
    down_until: float = 0.0  # set after a failed connect; skipped until then
    start_s: float | None = None  # what the replica took to start (None: it did not say)


@dataclass
class EndpointPool:
    cooldown_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _by_model: dict[str, list[Endpoint]] = field(default_factory=dict)

    def update(self, snapshot: dict[str, list[dict]]) -> None:
        """Replace the endpoint set, keeping in-flight counts of replicas that stay."""
        old = {(e.replica_id, e.host, e.port): e for eps in self._by_model.values() for e in eps}
        new: dict[str, list[Endpoint]] = {}
        for model, eps in snapshot.items():
            for d in eps:
                key = (d["replica_id"], d["host"], int(d["port"]))
                ep = old.get(key) or Endpoint(model, d["replica_id"], d["host"], int(d["port"]))
                ep.start_s = d.get("start_s")
                new.setdefault(model, []).append(ep)
        self._by_model = new

    def count(self, model: str) -> int:
        now = self.clock()
        return sum(1 for e in self._by_model.get(model, ()) if e.down_until <= now)

    def pick(self, model: str, exclude: tuple[Endpoint, ...] = ()) -> Endpoint | None:
        now = self.clock()
        live = [e for e in self._by_model.get(model, ()) if e.down_until <= now and e not in exclude]
        if not live:
            return None
        least = min(e.in_flight for e in live)
        return random.choice([e for e in live if e.in_flight == least])

    def mark_down(self, ep: Endpoint) -> None:
        ep.down_until = self.clock() + self.cooldown_s

    def start_seconds(self, model: str) -> list[float]:
        """The seconds each of the model's replicas took to start, those that said."""
        return [e.start_s for e in self._by_model.get(model, ()) if e.start_s is not None]

    def replica_counts(self) -> dict[str, int]:
        """Replicas the registry lists per model (down or not: they run, so they cost)."""
        return {m: len(eps) for m, eps in self._by_model.items()}

    def all(self) -> list[Endpoint]:
        return [e for eps in self._by_model.values() for e in eps]
