"""The what-if simulator: a discrete-event model of one model's replicas, its gateway and its
autoscaling policy, replaying an arrival trace (serving.autoscaling.traces) through replicas
calibrated from a `keel bench` run (serving.autoscaling.calibrate).

The model, and where it departs from the stack:
- The gateway sends a request to the ready replica running the fewest; when every ready replica
  runs its maximum (max_num_seqs), requests wait in one FIFO (in the stack they wait in the
  engines' queues; the replicas report that queue as their waiting requests, shared evenly).
- A request admitted to a replica running n requests (itself included) gets the curve's TTFT
  and TPOT at n, fixed for its life: it ends TTFT + (output_tokens - 1) x TPOT later.
- Every metrics_interval_s the policy (Autoscaler.decide) sees what the ready replicas would
  report for the settings' signal, and requests held for want of a ready replica.
- A replica the policy adds takes cold_start_s to become ready; one it removes is, as Ray Serve
  picks, a starting one if any (stopped at once), else the newest ready one, which drains: no
  new requests, stopped when its last one ends. Replica-seconds run from start to stop.
- min_replicas 0: a request that finds no ready replica is held (at most hold_max_requests, else
  503 at once) until one is ready, or fails with 503 after hold_timeout_s.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from serving.autoscaling.calibrate import SLO, ReplicaModel
from serving.autoscaling.policy import Autoscaler, Decision, Observation
from serving.autoscaling.settings import AutoscalingConfig
from serving.autoscaling.traces import Trace


class Policy(Protocol):
    """What the simulator asks each tick (Autoscaler, or a policy under comparison)."""

    def decide(self, obs: Observation) -> Decision: ...


# Event kinds, in the order they run when they fall at the same instant: a finished request
# frees its slot before a new one arrives, a replica is ready before the tick reads it.
_DONE, _READY, _TICK, _ARRIVE, _TIMEOUT = range(5)
PERCENTILES = (50, 95, 99)
# Requests still unserved this long after the trace ends (no replica will ever take them) end
# the run; the result says how many.
_GIVE_UP_AFTER_S = 86_400.0


@dataclass(frozen=True)
class ScaleEvent:
    t: float  # s from the trace's start
    from_replicas: int
    to_replicas: int
    reason: str


@dataclass
class Timeline:
    """Sampled at every policy tick."""

    t: list[float] = field(default_factory=list)
    in_system: list[int] = field(default_factory=list)  # requests running, queued or held
    ready: list[int] = field(default_factory=list)  # replicas taking requests
    wanted: list[int] = field(default_factory=list)  # the policy's decision
    demand: list[float] = field(default_factory=list)  # the stable window's demand, replicas at target


@dataclass
class SimResult:
    """What one setting did on one trace; `to_dict` is its JSON."""

    name: str
    settings: AutoscalingConfig
    requests: int
    completed: int
    failed: int  # 503: held past hold_timeout_s, or the hold queue full
    slo_attainment: float  # share of all requests (failed included) meeting every SLO limit
    meets_slo: bool  # slo_attainment >= the SLO's percentile, and no request failed
    ttft_ms: dict[str, float]  # {"p50", "p95", "p99", "mean"} over completed requests
    tpot_ms: dict[str, float]
    e2el_ms: dict[str, float]
    replica_seconds: float
    cost: float
    currency: str
    scale_events: list[ScaleEvent]
    timeline: Timeline
    waited: float  # share of admitted requests that queued (or were held) first
    mean_wait_s: float  # over admitted requests
    duration_s: float  # the simulated span: the trace, or its last request's end if later
    notes: list[str] = field(default_factory=list)
    ttft_s: np.ndarray | None = field(default=None, repr=False)  # per completed request
    wait_s: np.ndarray | None = field(default=None, repr=False)

    @property
    def replica_hours(self) -> float:
        return self.replica_seconds / 3600

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("settings", "ttft_s", "wait_s", "timeline")}
        d["settings"] = self.settings.model_dump(mode="json", exclude_unset=True)
        d["replica_hours"] = self.replica_hours
        d["timeline"] = asdict(self.timeline)
        return d


@dataclass
class _Replica:
    id: str
    created: float
    state: str = "starting"  # -> ready -> draining -> stopped; starting -> stopped
    running: int = 0
    stopped: float | None = None
    # request index -> (first token time, tpot, prompt tokens, output tokens); only for token signals
    live: dict[int, tuple[float, float, int, int]] = field(default_factory=dict)


class Simulation:
    def __init__(
        self,
        trace: Trace,
        model: ReplicaModel,
        settings: AutoscalingConfig,
        slo: SLO = SLO(),
        name: str = "",
        policy: Callable[[AutoscalingConfig], Policy] | None = None,
    ):
        if settings.signal == "kv_cache_usage" and not model.kv_cache_tokens:
            raise ValueError("signal kv_cache_usage needs the replica's KV cache size in tokens (--kv-cache-tokens)")
        self.trace, self.model, self.settings, self.slo = trace, model, settings, slo
        self.name = name
        self.policy = (policy or Autoscaler)(settings)
        self.track_tokens = settings.signal in ("tokens_in_flight", "kv_cache_usage")
        n = len(trace.requests)
        self.admitted_at = np.full(n, np.nan)
        self.ttft = np.full(n, np.nan)  # from arrival, s
        self.tpot = np.full(n, np.nan)
        self.e2el = np.full(n, np.nan)
        self.failed = np.zeros(n, dtype=bool)
        self.events: list = []
        self.seq = 0
        self.replicas: list[_Replica] = []  # starting, ready or draining
        self.retired: list[_Replica] = []
        self.queue: deque[int] = deque()  # request indices waiting for a slot
        self.queued = 0  # live entries in `queue`
        self.held: set[int] = set()  # queued requests held for want of a ready replica
        self.scale_events: list[ScaleEvent] = []
        self.timeline = Timeline()
        self.beyond_curve = 0
        self.stuck = 0
        self.last_done = 0.0  # when the last request ended (answered or failed)
        self.next_id = 0

    # -- the event loop ------------------------------------------------------------------------

    def run(self) -> SimResult:
        s = self.settings
        self.wanted = s.initial_replicas if s.initial_replicas is not None else s.min_replicas
        for _ in range(self.wanted):
            self._start(0.0).state = "ready"  # warm at the trace's start
        for i, r in enumerate(self.trace.requests):
            self._push(r.t, _ARRIVE, i)
        self._push(s.metrics_interval_s, _TICK, None)
        now = 0.0
        unresolved = len(self.trace.requests)
        while self.events:
            now, kind, _, arg = heapq.heappop(self.events)
            if kind == _TICK:
                if now > self.trace.duration and unresolved == 0:
                    break
                if now > self.trace.duration + _GIVE_UP_AFTER_S:
                    self.stuck = unresolved
                    break
                self._tick(now)
                self._push(now + s.metrics_interval_s, _TICK, None)
            elif kind == _ARRIVE:
                if self._arrive(now, arg):  # rejected at once
                    unresolved -= 1
                    self.last_done = now
            elif kind == _DONE:
                replica, i = arg
                self._done(now, replica, i)
                unresolved -= 1
                self.last_done = now
            elif kind == _READY:
                if arg.state == "starting":
                    arg.state = "ready"
                    self.held.clear()  # released: they take the next free slots in order
                    self._dispatch(now)
            elif kind == _TIMEOUT and arg in self.held:
                self.held.discard(arg)
                self.failed[arg] = True
                self.queued -= 1
                unresolved -= 1
                self.last_done = now
        return self._result(max(self.last_done, self.trace.duration))

    def _push(self, t: float, kind: int, arg) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, arg))

    def _arrive(self, now: float, i: int) -> bool:
        """True when the request is rejected at once (the hold queue is full)."""
        if not any(r.state == "ready" for r in self.replicas) and self.settings.min_replicas == 0:
            if len(self.held) >= self.settings.hold_max:
                self.failed[i] = True
                return True
            self.held.add(i)
            self._push(now + self.settings.hold_timeout, _TIMEOUT, i)
        self.queue.append(i)
        self.queued += 1
        self._dispatch(now)
        return False

    def _dispatch(self, now: float) -> None:
        cap = self.model.max_concurrency
        while self.queued:
            best = None
            for r in self.replicas:
                if r.state == "ready" and r.running < cap and (best is None or r.running < best.running):
                    best = r
            if best is None:
                return
            i = self.queue.popleft()
            if self.failed[i]:  # timed out while held
                continue
            self.queued -= 1
            self._admit(now, best, i)

    def _admit(self, now: float, rep: _Replica, i: int) -> None:
        req = self.trace.requests[i]
        rep.running += 1
        n = rep.running
        curve = self.model.curve
        if n > curve.concurrency[-1]:
            self.beyond_curve += 1
        ttft, tpot = curve.ttft(n), curve.tpot(n)
        first = now + ttft
        end = first + (req.output_tokens - 1) * tpot
        self.admitted_at[i] = now
        self.ttft[i] = first - req.t
        self.tpot[i] = tpot
        self.e2el[i] = end - req.t
        if self.track_tokens:
            rep.live[i] = (first, tpot, req.prompt_tokens, req.output_tokens)
        self._push(end, _DONE, (rep, i))

    def _done(self, now: float, rep: _Replica, i: int) -> None:
        rep.running -= 1
        rep.live.pop(i, None)
        if rep.state == "draining" and rep.running == 0:
            rep.state, rep.stopped = "stopped", now
            self._retire()
        self._dispatch(now)

    # -- the policy ----------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        ready = [r for r in self.replicas if r.state == "ready"]
        queued = self.queued
        share = queued / len(ready) if ready else 0.0
        reports = {r.id: self._signal(r, share, now) for r in ready}
        held = 0.0 if ready else float(queued)
        d = self.policy.decide(Observation(self.trace.epoch + now, len(ready), reports, held))
        if d.replicas != self.wanted:
            self.scale_events.append(ScaleEvent(now, self.wanted, d.replicas, d.reason))
            self.wanted = d.replicas
        self._reconcile(now)
        tl = self.timeline
        tl.t.append(now)
        tl.in_system.append(sum(r.running for r in self.replicas) + queued)
        tl.ready.append(len(ready))
        tl.wanted.append(d.replicas)
        tl.demand.append(d.stable_demand)

    def _signal(self, r: _Replica, waiting: float, now: float) -> float:
        sig = self.settings.signal
        if sig == "requests_in_flight":
            return r.running + waiting
        if sig == "waiting_requests":
            return waiting
        tokens = 0.0  # KV held: the prompt, and the output generated so far
        for first, tpot, p, o in r.live.values():
            made = 0 if now < first else min(o, 1 + (now - first) / tpot if tpot > 0 else o)
            tokens += p + made
        if sig == "tokens_in_flight":
            return tokens
        assert self.model.kv_cache_tokens is not None  # kv_cache_usage is simulated only with it
        return min(1.0, tokens / self.model.kv_cache_tokens)

    def _start(self, now: float) -> _Replica:
        rep = _Replica(f"r{self.next_id}", now)
        self.next_id += 1
        self.replicas.append(rep)
        return rep

    def _reconcile(self, now: float) -> None:
        active = [r for r in self.replicas if r.state in ("starting", "ready")]
        for _ in range(self.wanted - len(active)):
            self._push(now + self.model.cold_start_s, _READY, self._start(now))
        extra = len(active) - self.wanted
        # As Ray Serve picks (deployment_scheduler._get_replicas_to_stop): replicas not yet
        # running first, then the newest.
        order = sorted(active, key=lambda r: (r.state != "starting", -r.created, -int(r.id[1:])))
        for rep in order[: max(0, extra)]:
            if rep.state == "starting" or rep.running == 0:
                rep.state, rep.stopped = "stopped", now
            else:
                rep.state = "draining"
        self._retire()

    def _retire(self) -> None:
        """Stopped replicas leave the live list (they still count in replica-seconds)."""
        if any(r.state == "stopped" for r in self.replicas):
            self.retired += [r for r in self.replicas if r.state == "stopped"]
            self.replicas = [r for r in self.replicas if r.state != "stopped"]

    # -- the result ----------------------------------------------------------------------------

    def _result(self, end: float) -> SimResult:
        n = len(self.trace.requests)
        ok = ~self.failed & ~np.isnan(self.e2el)
        good = ok.copy()
        for limit, xs in ((self.slo.ttft_ms, self.ttft), (self.slo.tpot_ms, self.tpot), (self.slo.e2el_ms, self.e2el)):
            if limit is not None:
                good &= np.nan_to_num(xs, nan=math.inf) <= limit / 1000
        out_tokens = np.array([r.output_tokens for r in self.trace.requests]) if n else np.zeros(0)
        tpot = np.where(out_tokens > 1, self.tpot, np.nan)  # as vLLM bench: only multi-token requests
        attainment = float(good.sum() / n) if n else 1.0
        replica_seconds = sum(
            (r.stopped if r.stopped is not None else end) - r.created for r in self.replicas + self.retired
        )
        admitted = ~np.isnan(self.admitted_at)
        arrivals = np.array([r.t for r in self.trace.requests]) if n else np.zeros(0)
        wait = (self.admitted_at - arrivals)[admitted]
        notes = list(self.trace.notes) + list(self.model.notes)
        if self.stuck:
            notes.append(
                f"{self.stuck} requests were never served (no replica took them within a day of the "
                "trace's end); they count as failed"
            )
            self.failed |= np.isnan(self.e2el)
            ok = ~self.failed
        if self.beyond_curve:
            notes.append(
                f"{self.beyond_curve} admissions ran a replica past the highest concurrency the bench "
                f"measured ({self.model.curve.concurrency[-1]:g}): their latencies are that point's"
            )
        return SimResult(
            name=self.name,
            settings=self.settings,
            requests=n,
            completed=int(ok.sum()),
            failed=int(self.failed.sum()),
            slo_attainment=attainment,
            # as keel bench judges a load point: a failed request (a 503) fails the setting
            meets_slo=attainment >= self.slo.percentile / 100 - 1e-12 and not self.failed.any(),
            ttft_ms=_stats(self.ttft[ok]),
            tpot_ms=_stats(tpot[ok]),
            e2el_ms=_stats(self.e2el[ok]),
            replica_seconds=replica_seconds,
            cost=replica_seconds / 3600 * self.model.price_per_replica_hour,
            currency=self.model.currency,
            scale_events=self.scale_events,
            timeline=self.timeline,
            waited=float((wait > 1e-12).mean()) if wait.size else 0.0,
            mean_wait_s=float(wait.mean()) if wait.size else 0.0,
            duration_s=end,
            notes=notes,
            ttft_s=self.ttft[ok],
            wait_s=wait,
        )


def _stats(xs: np.ndarray) -> dict[str, float]:
    xs = xs[~np.isnan(xs)]
    if xs.size == 0:
        return {f"p{p}": 0.0 for p in PERCENTILES} | {"mean": 0.0}
    return {f"p{p}": float(np.percentile(xs, p)) * 1000 for p in PERCENTILES} | {"mean": float(xs.mean()) * 1000}


def simulate(
    trace: Trace,
    model: ReplicaModel,
    settings: AutoscalingConfig,
    slo: SLO = SLO(),
    name: str = "",
    policy: Callable[[AutoscalingConfig], Policy] | None = None,
) -> SimResult:
    """Replays `trace` through replicas of `model` scaled by `settings`; `policy` builds the
    policy from the settings (default: Autoscaler; tests pass a stand-in)."""
    return Simulation(trace, model, settings, slo, name, policy).run()
