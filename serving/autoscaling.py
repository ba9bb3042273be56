"""Ray Serve autoscaling policy for engine deployments.

Ray's default policy counts requests that Ray itself routed. Keel's requests reach engines
over their own HTTP ports, so Ray would see none and scale every model down to min_replicas.
This policy applies the default rule (replicas = load / target_ongoing_requests) to the load
each replica reports from its engine (`EngineReplica.record_autoscaling_stats`). Ray applies
min/max replicas, delays and scaling factors around it as for any custom policy.
"""

from __future__ import annotations

METRIC = "ongoing_requests"
POLICY_PATH = "serving.autoscaling:engine_load_policy"


def engine_load_policy(ctx) -> tuple[float, dict]:
    current = ctx.current_num_replicas
    if current == 0:
        return ctx.target_num_replicas, {}
    per_replica = (ctx.aggregated_metrics or {}).get(METRIC) or {}
    load = sum(per_replica.values())
    target = ctx.config.get_target_ongoing_requests() * current
    return current * (load / target), {}
