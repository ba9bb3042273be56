"""The anomaly detector in a gateway: fed by a stage, closed by a tick, shown three ways.

`AnomalyFeed` (the first stage, so its on_complete runs last) hands every finished request to
the detector: a few additions (serving/ops/anomaly.py). A task on the gateway's loop closes the
buckets once per `bucket_s`, at the bucket's end; each anomaly that starts or ends becomes
keel_anomalies_total / keel_anomaly_active, one audit record ({"event": "anomaly", ...}) and
an entry in GET /v1/admin/anomalies. The watch belongs to the policy version but is carried
over to the next one (`carry`), as the audit log is: a `keel apply` keeps every baseline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from datetime import datetime, timezone

from serving.gateway.stages import Outcome, RequestContext
from serving.ops.anomaly import Anomaly, AnomalyDetector
from serving.ops.anomaly_config import AnomalyConfig

log = logging.getLogger("keel.gateway")

# Series closed per slice of a tick (~30 us each): the loop serves requests between slices.
TICK_SLICE = 100
NO_LABEL = "-"  # tenant or model of a request that had none (no tenants configured, or refused early)


class AnomalyWatch:
    def __init__(self, config: AnomalyConfig, metrics, audit_log=None):
        self.detector = AnomalyDetector(config)
        self.metrics = metrics
        self.audit_log = audit_log  # the policy version's (None: audit off)
        self.ticks = 0
        self.tick_s = 0.0  # time spent in ticks, all together
        self._task: asyncio.Task | None = None

    @property
    def config(self) -> AnomalyConfig:
        return self.detector.config

    def observe(self, ctx: RequestContext, outcome: Outcome) -> None:
        if self._task is None:  # started here: the policy may be built before the loop runs
            self._task = asyncio.get_running_loop().create_task(self._run())
        usage = ctx.usage
        if usage:
            tokens = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
        else:
            tokens = ctx.prompt_tokens or 0
        first = outcome.first_byte_at if outcome.first_byte_at is not None else outcome.finished_at
        hits = sum(a.count for a in ctx.guardrail_actions) if ctx.guardrail_actions else 0
        self.detector.observe(
            ctx.tenant or NO_LABEL, ctx.model or NO_LABEL, outcome.status, tokens, first - ctx.received_at, hits
        )

    async def _run(self) -> None:
        while True:
            b = self.config.bucket_s
            now = time.time()
            start = math.floor(now / b) * b
            await asyncio.sleep(start + b - now)
            # The loop's timers run on the monotonic clock and may wake a moment before the
            # wall clock reaches the bucket's end: closing then would close this bucket again
            # on the next turn, as an empty one (an anomaly would end as soon as it started).
            while (early := start + b - time.time()) > 0:
                await asyncio.sleep(early)
            keys = list(self.detector.series)
            for i in range(0, len(keys), TICK_SLICE):
                try:
                    self.tick(start, keys[i : i + TICK_SLICE], done=i + TICK_SLICE >= len(keys))
                except Exception:  # a bug here must not stop detection for good
                    log.exception("anomaly detection tick failed")
                await asyncio.sleep(0)  # requests run between slices

    def tick(self, bucket_start: float, keys=None, done: bool = True) -> list[tuple[str, Anomaly]]:
        """Close the bucket that began at bucket_start (of those series); publish what started
        or ended."""
        began = time.perf_counter()
        events = self.detector.close(bucket_start, keys)
        self.publish(events)
        self.ticks += done
        self.tick_s += time.perf_counter() - began
        return events

    def publish(self, events: list[tuple[str, Anomaly]]) -> None:
        m = self.metrics
        for phase, a in events:
            if phase == "start":
                m.anomalies.labels(a.tenant, a.model, a.signal).inc()
                m.anomaly_active.labels(a.tenant, a.model, a.signal).set(1)
                log.warning(
                    "anomaly: %s of tenant %s on %s is %s (%s %.4g, expected %.4g, score %.1f)",
                    a.signal,
                    a.tenant,
                    a.model,
                    a.direction,
                    a.check,
                    a.value,
                    a.expected,
                    a.score,
                )
            else:
                m.anomaly_active.labels(a.tenant, a.model, a.signal).set(0)
                log.info("anomaly ended (%s): %s of tenant %s on %s", a.end_reason, a.signal, a.tenant, a.model)
            if self.audit_log is not None:
                self.audit_log.write(
                    {
                        "event": "anomaly",
                        "phase": phase,
                        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                        **a.to_dict(),
                    }
                )

    def reconfigure(self, config: AnomalyConfig) -> None:
        self.publish(self.detector.configure(config))

    def close(self, reason: str = "stopped") -> None:
        """Detection stops ("disabled" by config, or the gateway "stopped"): what was active ends."""
        self.publish(self.detector.end_all(reason))
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def snapshot(self) -> dict:
        cfg = self.config
        out = self.detector.snapshot()
        out.update(
            enabled=True,
            bucket_s=cfg.bucket_s,
            signals=list(cfg.signals),
            ticks=self.ticks,
            tick_ms_mean=round(self.tick_s / self.ticks * 1000, 3) if self.ticks else None,
        )
        return out


def carry(previous: AnomalyWatch | None, config: AnomalyConfig, metrics, audit_log) -> AnomalyWatch | None:
    """The watch of a new policy version: the previous one, reconfigured (its baselines kept),
    a new one, or None when detection is off."""
    if not config.enabled:
        if previous is not None:
            previous.close("disabled")
        return None
    if previous is None:
        return AnomalyWatch(config, metrics, audit_log)
    previous.audit_log = audit_log  # end events of the reconfigure go to the new version's log
    previous.reconfigure(config)
    return previous


class AnomalyFeed:
    """The stage that feeds the detector: nothing on the way in, one observation at the end."""

    name = "anomalies"

    def __init__(self, watch: AnomalyWatch):
        self.watch = watch

    async def on_request(self, ctx: RequestContext) -> None:
        pass

    def on_complete(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.watch.observe(ctx, outcome)


async def admin_anomalies(gw, req):
    """GET /v1/admin/anomalies: active anomalies, and the most recent ended ones, newest first."""
    rt = gw.runtime
    watch = getattr(rt, "anomalies", None)
    body = watch.snapshot() if watch is not None else {"enabled": False, "active": [], "recent": []}
    return 200, json.dumps(body).encode(), None, "application/json"
