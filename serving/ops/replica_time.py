"""Replica-time from the audit log: each gateway records how many replicas each model has, and
`keel cost` integrates those step functions into replica-seconds per model and hour.

A gateway writes `{"event": "replicas", "time", "model", "ready"}` (ready: the replicas the
endpoint registry lists for the model) when a model's count changes, for every model when its
audit log opens, and again for every model once REFRESH_S has passed, even unchanged. So a
count is never older than REFRESH_S plus one registry poll (30 s) while some gateway runs, and
integration carries a record forward VALID_S at most: a stack that stopped with nobody to record
it is counted VALID_S past its last record, not for ever; time with no valid record counts 0
replicas and is reported as unobserved.

Several gateways write the same changes, each to its own file: records of all files are merged
by time and the latest one in force wins. Gateways see the registry within one long poll of each
other, so they disagree for well under a second around a change.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

REFRESH_S = 600.0  # a gateway re-writes every model's count this often
VALID_S = 900.0  # a record counts this long at most (REFRESH_S plus margin for polls and clocks)
BUCKET_S = 3600  # replica-time and tokens are matched per hour


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class ReplicaCensus:
    """What one gateway has recorded: the records due for a new view of the registry."""

    refresh_s: float = REFRESH_S
    _written: dict[str, tuple[int, float]] = field(default_factory=dict)  # model -> (ready, when)

    def reset(self) -> None:
        """Forget what was written (a new audit log: it starts with every model's count)."""
        self._written.clear()

    def observe(self, counts: dict[str, int], now: float) -> list[dict]:
        """Records for the models whose count changed, are new, went away (0), or were last
        written refresh_s ago or more. `now`: Unix time."""
        out = []
        for model in sorted(set(counts) | set(self._written)):
            ready = counts.get(model, 0)
            last = self._written.get(model)
            if last is not None and last[0] == ready and now - last[1] < self.refresh_s:
                continue
            if last is None and ready == 0:
                continue
            out.append({"event": "replicas", "time": iso(now), "model": model, "ready": ready})
            if ready == 0:
                self._written.pop(model, None)  # gone: nothing more to refresh until it returns
            else:
                self._written[model] = (ready, now)
        return out


@dataclass
class ReplicaTime:
    """Integrated replica-time: model -> hour start (Unix s) -> replica-seconds in that hour."""

    seconds: dict[str, dict[int, float]] = field(default_factory=dict)
    unobserved_s: float = 0.0  # time in the period no valid record covered (counted as 0 replicas)

    def total_hours(self, model: str) -> float:
        return sum(self.seconds.get(model, {}).values()) / 3600


def integrate(events: list[tuple[float, str, int]], start: float, end: float, valid_s: float = VALID_S) -> ReplicaTime:
    """Replica-seconds per model and hour between start and end, from (time, model, ready)
    records of any number of gateways. A record before `start` still sets the count at start."""
    by_model: dict[str, list[tuple[float, int]]] = {}
    for t, model, ready in sorted(events, key=lambda e: e[0]):
        if t < end:
            by_model.setdefault(model, []).append((t, ready))
    result = ReplicaTime()
    covered: list[tuple[float, float]] = []  # when any record was in force, for unobserved
    for model, steps in by_model.items():
        hours = result.seconds.setdefault(model, {})
        for i, (t, ready) in enumerate(steps):
            stop = min(t + valid_s, steps[i + 1][0] if i + 1 < len(steps) else end, end)
            lo = max(t, start)
            if stop <= lo:
                continue
            covered.append((lo, stop))
            if ready > 0:
                add_replica_seconds(hours, lo, stop, ready)
    result.unobserved_s = (end - start) - _union_length(covered)
    return result


def add_replica_seconds(hours: dict[int, float], lo: float, hi: float, ready: float) -> None:
    """Add ready x (hi - lo) seconds, split at hour boundaries."""
    while lo < hi:
        bucket = int(lo // BUCKET_S) * BUCKET_S
        step = min(hi, bucket + BUCKET_S)
        hours[bucket] = hours.get(bucket, 0.0) + ready * (step - lo)
        lo = step


def _union_length(spans: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for lo, hi in sorted(spans):
        lo = max(lo, reach)
        if hi > lo:
            total += hi - lo
            reach = hi
    return total
