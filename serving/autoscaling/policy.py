"""The autoscaling policy: plain Python over plain data, one clock, no Ray.

The Ray adapter (serving.autoscaling.ray_policy) feeds it what the controller sees each tick;
the simulator (serving.autoscaling.simulate) feeds it what its model of replicas would report. An
Autoscaler keeps its own windows, so one instance serves one model for its lifetime.

The rule is Knative's KPA over one engine signal. Each tick's demand is the mean of the fresh
reports times the replicas running, plus the requests held for want of a replica; divided by the
target it reads in replicas. A stable window's mean sets the level, a short panic window's mean
catches bursts: at >= panic_threshold x the running replicas the policy panics, scales on the
panic window and never down until a whole stable window has passed without a panic tick.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from serving.autoscaling.settings import DAYS, AutoscalingConfig, Schedule

# Signals measured in requests: held requests add to them. KV usage and tokens have no
# request count to add to; for them held requests only start the first replica.
REQUEST_SIGNALS = ("requests_in_flight", "waiting_requests")


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


class _Window:
    """Samples of the last `span` seconds: their mean and whether any was above zero."""

    def __init__(self, span: float):
        self.span = span
        self.samples: deque[tuple[float, float]] = deque()
        self.total = 0.0
        self.nonzero = 0

    def add(self, now: float, value: float) -> None:
        self.samples.append((now, value))
        self.total += value
        self.nonzero += value > 0
        while self.samples and self.samples[0][0] <= now - self.span:
            _, old = self.samples.popleft()
            self.total -= old
            self.nonzero -= old > 0

    @property
    def mean(self) -> float:
        return max(0.0, self.total / len(self.samples)) if self.samples else 0.0


class Autoscaler:
    """One model's policy. `decide` is called once per tick with the tick's observation."""

    def __init__(self, settings: AutoscalingConfig):
        self.settings = settings
        self.target = settings.target_value
        self.stable = _Window(settings.stable_window_s)
        self.panic = _Window(settings.panic_window_s)
        self.first_sample: float | None = None  # the stable window is trusted once full
        self.last_panic: float | None = None  # the last tick over the panic threshold
        self.last_change: float | None = None  # the last tick whose decision changed
        self.last_replicas: int | None = None  # the previous decision
        self.zones = {s.timezone: ZoneInfo(s.timezone) for s in settings.schedules}

    def decide(self, obs: Observation) -> Decision:
        s, n, now = self.settings, obs.replicas, obs.now
        floor, floor_why = self.floor(now)
        reports = list(obs.reports.values())
        prev = self.last_replicas if self.last_replicas is not None else n
        if n > 0 and not reports:  # every replica failed to report: no sample, no change
            keep = max(n, prev)
            want = min(max(keep, floor), s.max_replicas)
            why = f"no fresh report from {n} replica{'s' * (n != 1)}: keep {keep}"
            return self._decided(obs, want, False, self._floored(why, n, want, floor, floor_why))
        held = obs.held
        mean = sum(reports) / len(reports) if reports else 0.0
        demand = mean * n + (held if s.signal in REQUEST_SIGNALS or n == 0 else 0.0)
        sample = demand / self.target
        if self.first_sample is None:
            self.first_sample = now
        self.stable.add(now, sample)
        self.panic.add(now, sample)
        stable, burst = self.stable.mean, self.panic.mean

        if n == 0:
            if held > 0:
                want, why = max(1, prev), f"from zero: {held:g} requests held, start 1 replica"
            elif prev > 0 and self._cooling(now):
                want, why = prev, f"nothing held, {prev} starting: cooldown, keep {prev}"
            else:
                want, why = 0, "no replica, nothing held"
            return self._decided(
                obs,
                min(max(want, floor), s.max_replicas),
                False,
                self._floored(why, n, max(want, floor), floor, floor_why),
            )

        if burst >= s.panic_threshold * n:
            self.last_panic = now
        panicking = self.last_panic is not None and now - self.last_panic < s.stable_window_s
        level = (
            f"demand {stable:.2f} replicas at target over {s.stable_window_s:g} s, "
            f"{burst:.2f} over {s.panic_window_s:g} s"
        )
        # Replicas decided on but not ready yet count as there: deciding below them would stop
        # them before they serve (Ray stops starting replicas first), so that is a scale-down.
        base = max(n, prev)
        if panicking:
            assert self.last_panic is not None  # panicking says so
            want = max(_ceil(burst), base)
            why = f"panic ({level}" + (
                f" >= {s.panic_threshold:g} x {n})"
                if self.last_panic == now
                else f"; over {s.panic_threshold:g} x running {now - self.last_panic:.0f} s ago)"
            )
            if _ceil(burst) < base:
                why += f": no scale-down while panicking, keep {base}"
        elif abs(stable - base) <= s.tolerance * base:
            want, why = base, f"{level}: within {s.tolerance:.0%} of {base}"
        else:
            want, why = _ceil(stable), level
        if want > base:
            cap = max(_ceil(n * s.max_scale_up_ratio), base)
            if want > cap:
                want, why = cap, why + f", at most x{s.max_scale_up_ratio:g} a step"
        want = max(want, floor)
        want = min(want, s.max_replicas)
        if want < base:
            want, why = self._scale_down(now, base, want, why, panicking)
        return self._decided(obs, want, panicking, self._floored(why, n, want, floor, floor_why), stable, burst)

    def _scale_down(self, now: float, n: int, want: int, why: str, panicking: bool) -> tuple[int, str]:
        s = self.settings
        if panicking:
            return n, why + f": no scale-down while panicking, keep {n}"
        assert self.first_sample is not None  # set by the first observation
        filled = now - self.first_sample
        if filled < s.stable_window_s:
            return n, why + f": stable window {filled:.0f} of {s.stable_window_s:g} s seen, keep {n}"
        if self._cooling(now):
            left = s.scale_down_cooldown_s - (now - max(self._since()))
            return n, why + f": cooldown, {left:.0f} s left, keep {n}"
        if want == 0 and self.stable.nonzero:
            return 1, why + f": not to zero (demand seen in the last {s.stable_window_s:g} s)"
        if want == 0:
            return 0, why + f": no demand for {s.stable_window_s:g} s, scale to zero"
        return want, why

    def _since(self) -> list[float]:
        return [t for t in (self.last_change, self.last_panic) if t is not None]

    def _cooling(self, now: float) -> bool:
        """Within scale_down_cooldown_s of the last change of decision or panic tick."""
        since = self._since()
        return bool(since) and now - max(since) < self.settings.scale_down_cooldown_s

    def _floored(self, why: str, n: int, want: int, floor: int, floor_why: str) -> str:
        if floor > self.settings.min_replicas and want == floor:
            why += f"; floor {floor} ({floor_why})"
        return why

    def _decided(
        self,
        obs: Observation,
        want: int,
        panicking: bool,
        why: str,
        stable: float | None = None,
        burst: float | None = None,
    ) -> Decision:
        if want != (self.last_replicas if self.last_replicas is not None else obs.replicas):
            self.last_change = obs.now
        self.last_replicas = want
        arrow = f"{obs.replicas} -> {want}" if want != obs.replicas else f"{want}"
        return Decision(
            want,
            panicking,
            self.stable.mean if stable is None else stable,
            self.panic.mean if burst is None else burst,
            f"{arrow}: {why}",
        )

    def floor(self, now: float) -> tuple[int, str]:
        """The least replicas wanted at `now`: min_replicas, raised by any schedule in force
        (capped by max_replicas), and which schedule that is."""
        best, why = self.settings.min_replicas, "min_replicas"
        for i, sched in enumerate(self.settings.schedules):
            if sched.min_replicas > best and in_schedule(sched, now, self.zones[sched.timezone]):
                best, why = sched.min_replicas, f"schedules[{i}] {sched.start}-{sched.end} {sched.timezone}"
        return min(best, self.settings.max_replicas), why


def in_schedule(sched: Schedule, now: float, zone: ZoneInfo) -> bool:
    """Whether Unix time `now` falls in the schedule's window, read in its time zone. A window
    past midnight belongs to the day it starts on; end == start is the whole day."""
    local = dt.datetime.fromtimestamp(now, zone)
    t = local.time().replace(tzinfo=None)
    start, end = dt.time.fromisoformat(sched.start), dt.time.fromisoformat(sched.end)
    today = DAYS[local.weekday()]
    yesterday = DAYS[(local.weekday() - 1) % 7]
    if start < end:
        return today in sched.days and start <= t < end
    return (today in sched.days and t >= start) or (yesterday in sched.days and t < end)


def _ceil(x: float) -> int:
    # round first: 2.1 / 0.3 is 7.000000000000001, still 7 replicas
    return math.ceil(round(x, 9))
