"""The simulator's bookkeeping on traces small enough to check by hand: latencies from the
curve, replica-seconds and cost through scale-up, drain and scale-down, held requests (answered
once a replica is ready, 503 past hold_timeout_s or beyond hold_max_requests), and what the
policy is shown. Prices are 3600 per replica-hour so that cost reads as replica-seconds."""

from __future__ import annotations

import pytest

from serving.autoscaling.calibrate import SLO, ReplicaModel, ServiceCurve
from serving.autoscaling.settings import AutoscalingConfig
from serving.autoscaling.simulate import simulate
from serving.autoscaling.traces import Request, Trace
from tests.unit.autoscale_doubles import EPOCH, Fixed, WakeOnHeld, scripted

PRICE = 3600.0


def trace(*reqs: tuple[float, int], duration: float = 10.0) -> Trace:
    return Trace([Request(t, 10, out) for t, out in reqs], duration)


def replicas(ttft=0.5, tpot=0.1, max_concurrency=4, cold_start_s=5.0, curve=None) -> ReplicaModel:
    return ReplicaModel(curve or ServiceCurve.constant(ttft, tpot), max_concurrency, cold_start_s, PRICE, "EUR")


def test_one_replica_latencies_and_replica_seconds():
    r = simulate(trace((0.0, 11), (1.0, 1)), replicas(), AutoscalingConfig(), SLO(ttft_ms=600), policy=Fixed)
    assert r.ttft_ms["p50"] == pytest.approx(500)
    assert r.tpot_ms["mean"] == pytest.approx(100)  # the one-token request has no TPOT
    assert r.e2el_ms["p99"] == pytest.approx(1500, rel=0.02)  # 0.5 + 10 x 0.1
    assert r.replica_seconds == pytest.approx(10.0)  # one warm replica for the 10 s trace
    assert r.cost == pytest.approx(10.0) and r.currency == "EUR"
    assert r.slo_attainment == 1.0 and r.meets_slo


def test_latency_follows_the_curve_at_the_replicas_concurrency():
    curve = ServiceCurve((1, 3), (0.1, 0.3), (0.01, 0.03))
    r = simulate(trace((0.0, 2), (0.0, 2), (0.0, 2)), replicas(curve=curve), AutoscalingConfig(), policy=Fixed)
    # admitted at 1, 2 and 3 running: TTFT 0.1, 0.2, 0.3 s
    assert sorted(r.ttft_s) == pytest.approx([0.1, 0.2, 0.3])


def test_full_replicas_queue_requests_in_arrival_order():
    r = simulate(trace((0.0, 11), (0.1, 11), (0.2, 11)), replicas(max_concurrency=1), AutoscalingConfig(), policy=Fixed)
    # each runs 1.5 s; the second waits until 1.5, the third until 3.0
    assert list(r.wait_s) == pytest.approx([0.0, 1.4, 2.8])
    assert r.waited == pytest.approx(2 / 3)


def test_scale_up_counts_the_cold_start_in_replica_seconds_and_cost():
    settings = AutoscalingConfig(min_replicas=1, max_replicas=2)
    r = simulate(trace((0.0, 2)), replicas(cold_start_s=5.0), settings, policy=scripted([(2.0, 2)]))
    # r0 for 10 s; r1 started at the 2 s tick, ready at 7 s, up to the end: 8 s
    assert r.replica_seconds == pytest.approx(18.0)
    assert r.cost == pytest.approx(18.0)
    assert [(e.t, e.from_replicas, e.to_replicas) for e in r.scale_events] == [(2.0, 1, 2)]
    assert r.timeline.ready[r.timeline.t.index(6.0)] == 1 and r.timeline.ready[r.timeline.t.index(7.0)] == 2


def test_scale_down_drains_the_busy_replica_until_its_last_request_ends():
    settings = AutoscalingConfig(min_replicas=1, max_replicas=2, initial_replicas=2)
    # two long requests at t=0 land on r0 and r1 (least loaded); each runs 0.5 + 100 x 0.1 = 10.5 s
    r = simulate(
        trace((0.0, 101), (0.0, 101), (4.0, 1), duration=20.0), replicas(), settings, policy=scripted([(3.0, 1)])
    )
    # at 3 s one replica drains: it takes no new request (the 4 s one waits for neither), and
    # stops at 10.5 s when its request ends; the other runs to the trace's end at 20 s
    assert r.replica_seconds == pytest.approx(20.0 + 10.5)
    assert r.completed == 3 and r.failed == 0
    assert r.e2el_ms["p50"] == pytest.approx(10500)


def test_scale_down_drains_the_newest_ready_replica_as_ray_does():
    settings = AutoscalingConfig(min_replicas=1, max_replicas=2)
    # r1 starts at 2 s, ready at 7 s; at 8 s a short request lands on r0, a long one on r1
    # (busy until 18.5 s); at the 9 s tick one replica goes: r1, the newest, busy or not
    r = simulate(
        trace((8.0, 2), (8.0, 101), duration=20.0),
        replicas(cold_start_s=5.0),
        settings,
        policy=scripted([(2.0, 2), (9.0, 1)]),
    )
    assert r.replica_seconds == pytest.approx(20.0 + (18.5 - 2.0))


def test_a_starting_replica_is_stopped_first_on_scale_down():
    settings = AutoscalingConfig(min_replicas=1, max_replicas=2)
    r = simulate(trace((0.0, 2)), replicas(cold_start_s=5.0), settings, policy=scripted([(2.0, 2), (4.0, 1)]))
    assert r.replica_seconds == pytest.approx(10.0 + 2.0)  # r1 lived from 2 s to 4 s, never ready
    assert max(r.timeline.ready) == 1


def test_scale_to_zero_holds_a_request_until_a_replica_is_ready():
    settings = AutoscalingConfig(min_replicas=0, max_replicas=1)
    r = simulate(trace((0.5, 11)), replicas(cold_start_s=3.0), settings, policy=WakeOnHeld)
    # held at 0.5; the 1 s tick sees it and starts a replica, ready at 4 s; TTFT 4 - 0.5 + 0.5
    assert r.completed == 1 and r.failed == 0
    assert r.ttft_ms["p50"] == pytest.approx(4000)
    assert r.replica_seconds == pytest.approx(10.0 - 1.0)


def test_held_requests_past_hold_timeout_fail():
    settings = AutoscalingConfig(min_replicas=0, max_replicas=1, hold_timeout_s=4)
    r = simulate(trace((0.5, 11), (2.0, 11)), replicas(), settings, SLO(ttft_ms=10_000), policy=scripted([]))
    assert r.failed == 2 and r.completed == 0
    assert r.slo_attainment == 0.0 and not r.meets_slo
    assert r.replica_seconds == 0.0 and r.cost == 0.0


def test_a_request_beyond_hold_max_requests_fails_at_once():
    settings = AutoscalingConfig(min_replicas=0, max_replicas=1, hold_max_requests=2)
    r = simulate(trace((0.1, 2), (0.2, 2), (0.3, 2)), replicas(cold_start_s=1.0), settings, policy=WakeOnHeld)
    assert r.failed == 1 and r.completed == 2
    assert r.slo_attainment == pytest.approx(2 / 3)
    # 67% attainment clears a p50 SLO, but a setting that fails requests never meets it
    assert not simulate(
        trace((0.1, 2), (0.2, 2), (0.3, 2)),
        replicas(cold_start_s=1.0),
        settings,
        SLO(ttft_ms=60_000, percentile=50),
        policy=WakeOnHeld,
    ).meets_slo


def test_the_policy_sees_ready_replicas_their_signal_and_held_demand():
    settings = AutoscalingConfig(min_replicas=0, max_replicas=1, signal="requests_in_flight")
    seen = []

    class Spy(WakeOnHeld):
        def decide(self, obs):
            seen.append(obs)
            return super().decide(obs)

    simulate(trace((0.2, 200), (0.3, 200)), replicas(cold_start_s=2.0), settings, policy=Spy)
    first, ready = seen[0], seen[3]  # ticks at 1 s (nothing ready) and 4 s (r0 ready since 3 s)
    assert (first.now - EPOCH, first.replicas, dict(first.reports), first.held) == (1.0, 0, {}, 2.0)
    assert (ready.replicas, dict(ready.reports), ready.held) == (1, {"r0": 2.0}, 0.0)


def test_waiting_requests_are_shared_among_ready_replicas_in_their_reports():
    settings = AutoscalingConfig(min_replicas=2, max_replicas=2, signal="waiting_requests")
    seen = []

    class Spy(Fixed):
        def decide(self, obs):
            seen.append(obs)
            return super().decide(obs)

    simulate(trace(*[(0.0, 100)] * 5), replicas(max_concurrency=1), settings, policy=Spy)
    assert dict(seen[0].reports) == {"r0": 1.5, "r1": 1.5}  # 2 running, 3 queued


def test_tokens_in_flight_counts_prompt_and_output_so_far():
    settings = AutoscalingConfig(min_replicas=1, max_replicas=1, signal="tokens_in_flight")
    seen = []

    class Spy(Fixed):
        def decide(self, obs):
            seen.append(obs)
            return super().decide(obs)

    simulate(trace((0.0, 100)), replicas(ttft=0.5, tpot=0.1), settings, policy=Spy)
    # at 1 s: 10 prompt tokens, first token at 0.5 s, then 5 more by 1 s
    assert seen[0].reports["r0"] == pytest.approx(10 + 1 + 5)


def test_kv_cache_usage_needs_the_cache_size():
    with pytest.raises(ValueError, match="kv-cache-tokens"):
        simulate(trace((0.0, 2)), replicas(), AutoscalingConfig(signal="kv_cache_usage"), policy=Fixed)
