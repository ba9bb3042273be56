"""Replica-time from Prometheus (`keel cost report --prometheus URL`), instead of the audit log.

Reads `avg by (model) (keel_engine_replicas_ready)` (each gateway exports its view; they agree)
with query_range and counts each sample for one step. The audit log stays the default: Prometheus
keeps 15 days unless told otherwise (`--storage.tsdb.retention.time`), and the gauge counts the
replicas a gateway can send to (not those in a connect cooldown) of the public models only (a
rollout candidate is not exported). This source is for audit logs written before gateways
recorded replica counts.
"""

from __future__ import annotations

import math

import httpx

from serving.ops.replica_time import ReplicaTime, add_replica_seconds

QUERY = "avg by (model) (keel_engine_replicas_ready)"
MAX_POINTS = 10_000  # Prometheus refuses a range query of more than 11,000 points per series
MIN_STEP_S = 60
TIMEOUT_S = 60.0


class PrometheusError(RuntimeError):
    """Prometheus could not answer; str() says what to check."""


def replica_time(url: str, since: float, until: float, transport: httpx.BaseTransport | None = None) -> ReplicaTime:
    """Replica-seconds per model and hour from Prometheus, one step per sample."""
    step = max(MIN_STEP_S, math.ceil((until - since) / MAX_POINTS))
    params = {"query": QUERY, "start": f"{since:.3f}", "end": f"{until:.3f}", "step": str(step)}
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT_S, transport=transport) as client:
            resp = client.get("/api/v1/query_range", params=params)
        body = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise PrometheusError(f"{url}: no answer to a range query ({e})") from None
    if resp.status_code != 200 or body.get("status") != "success":
        raise PrometheusError(f"{url}: {resp.status_code} {body.get('error', '')}".rstrip())
    out = ReplicaTime()
    seen: set[float] = set()
    for series in body["data"]["result"]:
        model = series["metric"].get("model")
        if model is None:
            continue
        hours = out.seconds.setdefault(model, {})
        for t, value in series["values"]:
            t, v = float(t), float(value)
            seen.add(t)
            if v > 0 and math.isfinite(v):
                add_replica_seconds(hours, t, min(t + step, until), v)
    out.unobserved_s = max(0.0, (until - since) - len(seen) * step)
    return out
