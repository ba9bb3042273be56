"""Stand-ins for the simulator's tests: policies that decide by script, not by demand, so a test
checks the simulator's bookkeeping and not the policy's rules."""

from __future__ import annotations

from serving.autoscaling.policy import Decision, Observation
from serving.autoscaling.settings import AutoscalingConfig

EPOCH = 1_767_571_200.0  # the simulator's default t = 0 (2026-01-05 00:00 UTC)


class Fixed:
    """Always max_replicas."""

    def __init__(self, settings: AutoscalingConfig):
        self.settings = settings
        self.seen: list[Observation] = []

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        return Decision(self.settings.max_replicas, False, 0.0, 0.0, "fixed")


def scripted(steps: list[tuple[float, int]]):
    """A policy wanting `n` replicas from trace time `t` on, for each (t, n) in `steps`; before
    the first step, initial_replicas or min_replicas."""

    class Scripted(Fixed):
        def decide(self, obs: Observation) -> Decision:
            self.seen.append(obs)
            t = obs.now - EPOCH
            s = self.settings
            n = s.initial_replicas if s.initial_replicas is not None else s.min_replicas
            for at, want in steps:
                if t >= at:
                    n = want
            return Decision(n, False, 0.0, 0.0, f"script: {n}")

    return Scripted


class WakeOnHeld(Fixed):
    """Scale to zero as the scale-to-zero helper's policy does, reduced to its rule: one replica
    as soon as requests are held, otherwise the replicas there are."""

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        n = max(obs.replicas, 1 if obs.held > 0 else 0)
        return Decision(n, False, 0.0, 0.0, "held" if obs.held else "steady")
