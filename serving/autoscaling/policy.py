"""The autoscaling policy: plain Python over plain data, one clock, no Ray.

The Ray adapter (serving.autoscaling.ray_policy) feeds it what the controller sees each tick;
the simulator (serving.autoscaling.simulate) feeds it what its model of replicas would report. An
Autoscaler keeps its own windows, so one instance serves one model for its lifetime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from serving.autoscaling.settings import AutoscalingConfig


@dataclass(frozen=True)
class Observation:
    """What the policy sees at one tick."""

    now: float  # Unix time, s (the simulator's clock starts at a chosen epoch)
    replicas: int  # replicas running now
    # replica id -> its signal value now, for replicas whose report is fresh; a replica that
    # could not report is absent here (left out of the average, never counted as idle)
    reports: Mapping[str, float] = field(default_factory=dict)
    held: float = 0.0  # requests held at gateways for want of a ready replica (scale from zero)


@dataclass(frozen=True)
class Decision:
    replicas: int  # the replica count wanted, within min/max and the schedules' floor
    panic: bool  # in panic mode at this tick
    stable_demand: float  # the stable window's demand, in replicas at target
    panic_demand: float  # the panic window's demand, in replicas at target
    reason: str  # one line for logs and the simulator's event list


class Autoscaler:
    """One model's policy. `decide` is called once per tick with the tick's observation."""

    def __init__(self, settings: AutoscalingConfig):
        self.settings = settings

    def decide(self, obs: Observation) -> Decision:
        # Interim (no windows yet): demand now, in replicas at target, within the bounds.
        s = self.settings
        reports = list(obs.reports.values())
        if not reports and obs.replicas > 0:
            return Decision(obs.replicas, False, 0.0, 0.0, "no fresh reports: keep the count")
        mean = sum(reports) / len(reports) if reports else 0.0
        demand = (mean * obs.replicas + obs.held) / s.target_value
        want = max(s.min_replicas, min(s.max_replicas, math.ceil(round(demand, 9))))
        return Decision(want, False, demand, demand, f"demand {demand:.2f} replicas at target")
