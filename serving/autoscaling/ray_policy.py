"""The Ray adapter: the only part of the autoscaler that knows Ray Serve.

Ray Serve instantiates the class named by `policy_function` with `policy_kwargs` (only the
model's name: settings there would change the application's code version, and with it restart
every engine; see serving.autoscaling.published) and calls it on every controller tick (0.1 s)
with an AutoscalingContext. The settings are what the gateways last published for the model,
read again every READ_TTL_S: a settings change applies live, with no engine restart, and the
policy restarts its windows on it.

Ray wraps every custom policy (autoscaling_policy.py, _apply_autoscaling_config) in its own
delays, scaling factors and bounds; `ray_autoscaling_config` renders those so they pass the
policy's decision through unchanged: delays 0 (_apply_delay_logic then takes any decision at
once), factors 1 (ceil(current + 1 x delta) is the decision itself). Only Ray's cold-start path
(0 replicas and requests queued at handles: 1 replica) runs before the policy, and it agrees with it.
"""

from __future__ import annotations

import json
import logging
import time

from serving.autoscaling import published
from serving.autoscaling.policy import Autoscaler, Decision, Observation
from serving.autoscaling.settings import AutoscalingConfig

POLICY_PATH = "serving.autoscaling.ray_policy:KeelAutoscalingPolicy"
# A replica's report is fresh while its newest point is at most this many metrics intervals
# old, and never less than FRESH_MIN_S: a replica whose scrapes fail (or whose pushes stop)
# drops out of the average after it. The floor: on a loaded 2-core box (the e2e's 16 streams)
# pushes reached the controller over 3 s apart, and a policy with no report keeps its count.
FRESH_INTERVALS = 3.0
FRESH_MIN_S = 10.0
# Ray keeps each replica's points for look_back_period_s; the policy needs only the newest.
LOOK_BACK_INTERVALS = 4.0

# How often the policy reads the published settings again (a GCS read).
READ_TTL_S = 2.0

# Child of Ray Serve's logger: the controller's log configuration (INFO, its log file) applies.
log = logging.getLogger("ray.serve.keel.autoscaling")


def ray_autoscaling_config(model: str, settings: AutoscalingConfig) -> dict:
    """Ray Serve's autoscaling_config for the engine deployment of `model` (its settings reach
    the policy through the gateways: serving.autoscaling.published)."""
    interval = settings.metrics_interval_s
    out = {
        "min_replicas": settings.min_replicas,
        "max_replicas": settings.max_replicas,
        "metrics_interval_s": interval,
        "look_back_period_s": LOOK_BACK_INTERVALS * interval,
        # Keel's policy owns every delay and step limit; Ray's must pass its decisions through.
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "downscale_to_zero_delay_s": 0.0,
        "upscaling_factor": 1.0,
        "downscaling_factor": 1.0,
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {"model": model}},
    }
    if settings.initial_replicas is not None:
        out["initial_replicas"] = settings.initial_replicas
    return out


class KeelAutoscalingPolicy:
    """Ray's view of one model's Autoscaler: AutoscalingContext in, (replicas, state) out.
    `settings` given here (tests, a one-off) are used as they are; otherwise the published
    ones."""

    def __init__(self, model: str, settings: dict | None = None):
        self.model = model
        self.fixed = settings is not None
        self._published: dict | None = None
        self._read_at = float("-inf")
        self.autoscaler: Autoscaler | None = None
        self._last: tuple[int, bool] | None = None
        if settings is not None:
            self._use(settings)

    def _use(self, doc: dict) -> None:
        self._published = doc
        self.settings = AutoscalingConfig.model_validate(doc)
        self.autoscaler = Autoscaler(self.settings)
        self.fresh_s = max(FRESH_INTERVALS * self.settings.metrics_interval_s, FRESH_MIN_S)

    def _refresh(self) -> None:
        mono = time.monotonic()
        if self.fixed or mono - self._read_at < READ_TTL_S:
            return
        self._read_at = mono
        try:
            doc = published.read(self.model)
            if doc is not None and doc != self._published:
                self._use(doc)
                log.info("autoscaling %s: settings %s", self.model, json.dumps(doc, sort_keys=True))
        except Exception:  # a GCS hiccup or a bad document: keep deciding on what it had
            log.warning("autoscaling %s: could not read its published settings", self.model, exc_info=True)

    def __call__(self, ctx) -> tuple[int, dict]:
        self._refresh()
        if self.autoscaler is None:  # no gateway has published yet: keep the count
            return ctx.target_num_replicas, {"keel_reason": "no settings published yet: keep the count"}
        decision = self.autoscaler.decide(self.observe(ctx))
        if (decision.replicas, decision.panic) != self._last:
            self._last = (decision.replicas, decision.panic)
            log.info(
                "autoscaling %s: %d replicas (%s)",
                getattr(ctx, "deployment_name", "?"),
                decision.replicas,
                decision.reason,
            )
        return decision.replicas, {"keel_reason": decision.reason}

    def observe(self, ctx) -> Observation:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        replicas = int(ctx.current_num_replicas)
        reports = fresh_reports(ctx, self.settings.signal, now, self.fresh_s)
        if replicas == 0:  # nothing runs: every request Ray counts waits for a replica
            held = ctx.total_num_requests or 0.0
        else:
            held = ctx.total_queued_requests or 0.0
        return Observation(now=now, replicas=replicas, reports=reports, held=float(held))


def fresh_reports(ctx, signal: str, now: float, fresh_s: float) -> dict[str, float]:
    """replica id -> the mean of the signal's points in the replica's last push, for running
    replicas whose newest point is at most fresh_s old. Ray keeps, per running replica, the
    series of its last push: one point per record interval over look_back_period_s (4 metrics
    intervals). A mean, not the newest point: engine gauges are point samples that swing
    between steps."""
    series_by_replica = (ctx.raw_metrics or {}).get(signal) or {}
    out = {}
    for replica_id, series in series_by_replica.items():
        if series and now - max(p.timestamp for p in series) <= fresh_s:
            out[str(getattr(replica_id, "unique_id", replica_id))] = sum(float(p.value) for p in series) / len(series)
    return out


__all__ = ["POLICY_PATH", "KeelAutoscalingPolicy", "ray_autoscaling_config", "Decision"]
