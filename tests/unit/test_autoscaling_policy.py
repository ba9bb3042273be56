"""Autoscaler decisions on synthetic metric series: plain data, a fake clock, no Ray."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from serving.autoscaling.policy import Autoscaler, Observation
from serving.autoscaling.settings import AutoscalingConfig

T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc).timestamp()  # a Monday


def settings(**kw) -> AutoscalingConfig:
    base = dict(
        min_replicas=1,
        max_replicas=10,
        signal="requests_in_flight",
        target=10,
        stable_window_s=60,
        panic_window_s=6,
        scale_down_cooldown_s=300,
    )
    return AutoscalingConfig.model_validate({**base, **kw})


def even(total: float, n: int) -> dict[str, float]:
    return {f"r{i}": total / n for i in range(n)}


def drive(a: Autoscaler, demand, seconds: int, replicas: int, start: float = 0.0):
    """Tick once a second for `seconds`, the decision applied at once; demand(t) is the total
    in flight, spread evenly. Returns the decisions, one per tick."""
    out = []
    for k in range(seconds):
        t = start + k
        d = a.decide(Observation(T0 + t, replicas, even(demand(t), replicas) if replicas else {}))
        out.append(d)
        replicas = d.replicas
    return out


def test_steady_demand_at_capacity_keeps_the_count():
    ds = drive(Autoscaler(settings()), lambda t: 20, 900, replicas=2)
    assert {d.replicas for d in ds} == {2}
    assert not any(d.panic for d in ds)
    assert "within 10% of 2" in ds[-1].reason


def test_steady_demand_above_capacity_scales_up_on_the_stable_window():
    ds = drive(Autoscaler(settings()), lambda t: 30, 10, replicas=2)
    assert ds[0].replicas == 3 and not ds[0].panic  # 30 / 10 per replica
    assert ds[0].reason.startswith("2 -> 3: demand 3.00 replicas at target")


def test_a_burst_panics_and_scales_on_the_panic_window():
    a = Autoscaler(settings(max_scale_up_ratio=4))
    ds = drive(a, lambda t: 20 if t < 120 else 100, 140, replicas=2)
    before, after = ds[:120], ds[120:]
    assert not any(d.panic for d in before)
    first = next(d for d in after if d.panic)
    assert first.panic_demand >= 2 * 2  # panic at 2 x the 2 replicas running
    assert first.stable_demand < first.panic_demand  # the stable window has barely moved
    assert first.replicas > 2 and "panic" in first.reason
    assert after[-1].replicas == 10


def test_no_scale_down_while_panicking_and_for_a_stable_window_after():
    a = Autoscaler(settings(scale_down_cooldown_s=0))
    ds = drive(a, lambda t: 20 if t < 100 else (100 if t < 110 else 0), 400, replicas=2)
    running = [2] + [d.replicas for d in ds[:-1]]  # what each tick saw
    over = [k for k, d in enumerate(ds) if d.panic_demand >= 2 * running[k]]
    first, last = over[0], over[-1]
    assert first == 101  # the burst's second tick: (4 x 20 + 2 x 100) / 6 / 10 = 4.67 >= 2 x 2
    # panicking from the first tick over the threshold until a stable window after the last
    assert all(d.panic for d in ds[first : last + 60]) and not ds[last + 60].panic
    assert all(ds[k].replicas >= ds[k - 1].replicas for k in range(first, last + 60))
    assert ds[115].panic_demand == 0 and ds[115].replicas == 10  # demand gone, count held
    assert "no scale-down while panicking" in ds[last + 30].reason
    assert ds[last + 60].replicas < ds[last + 59].replicas  # then down at once (cooldown 0)
    assert ds[-1].replicas == 1


def test_a_drop_waits_out_the_cooldown_then_scales_down():
    a = Autoscaler(settings(panic_threshold=10))
    ds = drive(a, lambda t: 35 if t < 100 else 10, 400, replicas=2)
    assert ds[0].replicas == 4  # 3.5 -> 4, within x2 a step
    downs = [k for k, d in enumerate(ds) if d.replicas < 4]
    assert downs[0] == 300  # the last change was at t=0; cooldown 300 s
    assert "cooldown" in ds[299].reason and ds[299].replicas == 4
    assert ds[300].replicas == 1 and ds[300].reason.startswith("4 -> 1")


def test_no_scale_down_before_a_whole_stable_window_is_seen():
    # A new Autoscaler (a restart, a settings change) trusts no window it has not filled.
    ds = drive(Autoscaler(settings(scale_down_cooldown_s=0)), lambda t: 0, 90, replicas=4)
    assert [d.replicas for d in ds[:60]] == [4] * 60
    assert "stable window" in ds[10].reason
    assert ds[60].replicas == 1


def test_a_replica_that_stops_reporting_is_left_out_not_counted_idle():
    a = Autoscaler(settings(scale_down_cooldown_s=0))
    for t in range(120):
        a.decide(Observation(T0 + t, 3, {"r0": 10, "r1": 10, "r2": 10}))
    # r2's scrape fails from now on: the other two still carry 10 each
    for t in range(120, 400):
        d = a.decide(Observation(T0 + t, 3, {"r0": 10, "r1": 10}))
        assert d.replicas == 3, d.reason
    # counted as 0 it would have read 20 in flight and dropped to 2
    d = a.decide(Observation(T0 + 400, 3, {}))
    assert d.replicas == 3 and "no fresh report from 3 replicas" in d.reason


def test_held_requests_count_as_demand():
    d = Autoscaler(settings(panic_threshold=10)).decide(Observation(T0, 2, even(20, 2), held=15))
    assert d.replicas == 4  # (20 + 15) / 10 per replica


PARIS = {
    "start": "09:00",
    "end": "17:00",
    "days": ["mon", "tue", "wed", "thu", "fri"],
    "timezone": "Europe/Paris",
    "min_replicas": 5,
}


def at(day: int, hh: int, mm: int = 0, tz: str = "UTC") -> float:
    from zoneinfo import ZoneInfo

    return dt.datetime(2026, 12, day, hh, mm, tzinfo=ZoneInfo(tz)).timestamp()


def test_a_schedule_raises_the_floor_in_its_time_zone():
    a = Autoscaler(settings(schedules=[PARIS]))
    # Monday 08:30 UTC is 09:30 in Paris (UTC+1 in December): in the window
    d = a.decide(Observation(at(7, 8, 30), 1, {"r0": 0}))
    assert d.replicas == 5 and "schedules[0] 09:00-17:00 Europe/Paris" in d.reason
    assert a.floor(at(7, 16, 30))[0] == 1  # 17:30 in Paris: over
    assert a.floor(at(7, 16, 30, "Europe/Paris"))[0] == 5
    assert a.floor(at(12, 10, 0, "Europe/Paris"))[0] == 1  # Saturday


def test_a_schedule_past_midnight_belongs_to_the_day_it_starts():
    a = Autoscaler(settings(schedules=[{"start": "22:00", "end": "02:00", "days": ["fri"], "min_replicas": 3}]))
    assert a.floor(at(11, 23))[0] == 3  # Friday 23:00
    assert a.floor(at(12, 1, 59))[0] == 3  # Saturday 01:59: Friday's window
    assert a.floor(at(12, 2, 0))[0] == 1
    assert a.floor(at(11, 1, 0))[0] == 1  # Friday 01:00 is Thursday's night
    assert a.floor(at(11, 21, 59))[0] == 1


def test_the_floor_holds_against_a_scale_down():
    a = Autoscaler(settings(scale_down_cooldown_s=0, schedules=[{**PARIS, "min_replicas": 3}]))
    ds = drive(a, lambda t: 0, 120, replicas=6, start=at(7, 9, tz="Europe/Paris") - T0)
    assert ds[-1].replicas == 3 and "floor 3" in ds[-1].reason


def test_scale_to_zero_only_after_a_whole_idle_stable_window_and_the_cooldown():
    a = Autoscaler(settings(min_replicas=0, scale_down_cooldown_s=120))
    ds = drive(a, lambda t: 5 if t < 30 else 0, 400, replicas=2)
    assert ds[60].reason.startswith("2 -> 1")  # the window full: 0.25 replicas' worth, down to 1
    zero = next(k for k, d in enumerate(ds) if d.replicas == 0)
    assert zero == 180  # idle since t=30 (the window clear from t=89), cooldown from t=60: 180
    assert "cooldown" in ds[120].reason
    assert "no demand for 60 s, scale to zero" in ds[zero].reason
    assert all(d.replicas == 0 for d in ds[zero:])


def test_demand_in_the_stable_window_keeps_one_replica():
    a = Autoscaler(settings(min_replicas=0, scale_down_cooldown_s=0))
    ds = drive(a, lambda t: 1 if t % 50 == 0 else 0, 300, replicas=1)  # a request now and then
    assert {d.replicas for d in ds} == {1}


def test_from_zero_held_requests_start_one_replica_at_once():
    a = Autoscaler(settings(min_replicas=0))
    assert a.decide(Observation(T0, 0, {}, held=0)).replicas == 0
    d = a.decide(Observation(T0 + 1, 0, {}, held=40))
    assert d.replicas == 1 and d.reason.startswith("0 -> 1: from zero: 40 requests held")
    # then it scales on from what the replica reports, at most x2 a step
    d = a.decide(Observation(T0 + 2, 1, {"r0": 40}))
    assert d.replicas == 2 and d.panic


def test_from_zero_a_schedule_floor_starts_its_replicas():
    a = Autoscaler(settings(min_replicas=0, schedules=[{**PARIS, "min_replicas": 2}]))
    assert a.decide(Observation(at(7, 10, tz="Europe/Paris"), 0, {})).replicas == 2


def test_tolerance_and_the_step_limit():
    a = Autoscaler(settings(max_replicas=40, panic_threshold=5))
    assert a.decide(Observation(T0, 10, even(105, 10))).replicas == 10  # within 10%
    b = Autoscaler(settings(max_replicas=40, panic_threshold=5))
    assert b.decide(Observation(T0, 10, even(115, 10))).replicas == 12
    c = Autoscaler(settings(max_replicas=40))
    d = c.decide(Observation(T0, 1, {"r0": 100}))  # 10 replicas' worth on 1
    assert d.replicas == 2 and "at most x2 a step" in d.reason


def test_kv_cache_usage_scales_on_the_fraction_and_ignores_held_requests():
    a = Autoscaler(settings(signal="kv_cache_usage", target=0.5, panic_threshold=10))
    d = a.decide(Observation(T0, 2, {"r0": 0.9, "r1": 0.6}, held=7))
    assert d.replicas == 3  # 0.75 x 2 / 0.5


def test_every_reason_is_one_line():
    a = Autoscaler(settings(min_replicas=0, scale_down_cooldown_s=0, schedules=[PARIS]))
    ds = drive(a, lambda t: [0, 50, 3, 0][int(t // 70) % 4], 600, replicas=1)
    assert all("\n" not in d.reason and d.reason for d in ds)


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"target_ongoing_requests": 4}, "target_ongoing_requests is not a Keel autoscaling key; write target"),
        ({"upscale_delay_s": 4}, "write stable_window_s and panic_window_s"),
        ({"downscale_delay_s": 4}, "write scale_down_cooldown_s"),
        ({"look_back_period_s": 4}, "write stable_window_s"),
        ({"panic_window_s": 90}, "panic_window_s (90) must be <= stable_window_s (60)"),
        ({"signal": "gpu_util"}, "signal"),
        ({"signal": "kv_cache_usage", "target": 70}, "target (70) for kv_cache_usage"),
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas (2) must be >= min_replicas (3)"),
        ({"hold_timeout_s": 30}, "hold_timeout_s applies only with min_replicas: 0"),
        ({"schedules": [{**PARIS, "start": "9am"}]}, "schedules.0.start"),
        ({"schedules": [{**PARIS, "timezone": "Mars/Olympus"}]}, "not an IANA time zone"),
        ({"schedules": [{**PARIS, "min_replicas": 50}]}, "schedules[0].min_replicas (50) must be <= max_replicas"),
        ({"tolerence": 0.1}, "tolerence"),
    ],
)
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(ValidationError) as e:
        settings(**bad)
    assert key in str(e.value)


def test_replicas_still_starting_are_not_cancelled_when_a_burst_fades():
    # A burst panics 2 -> 4; the new replicas take a minute to start, so the two running carry
    # on reporting while the burst fades. Deciding below 4 would stop them before they serve.
    a = Autoscaler(settings(max_scale_up_ratio=2))
    drive(a, lambda t: 20, 120, replicas=2)
    running, decided = 2, []
    for k in range(60):
        demand = 100 if k < 5 else 30
        decided.append(a.decide(Observation(T0 + 120 + k, running, even(demand, running))).replicas)
    assert decided[4] == 4 and min(decided[4:]) == 4, decided


def test_a_start_from_zero_outlives_a_request_that_stopped_waiting():
    a = Autoscaler(settings(min_replicas=0, scale_down_cooldown_s=60))
    assert a.decide(Observation(T0, 0, {}, held=1)).replicas == 1
    # The held request timed out before the replica was ready: the start goes on for the cooldown.
    assert a.decide(Observation(T0 + 5, 0, {}, held=0)).replicas == 1
    assert a.decide(Observation(T0 + 61, 0, {}, held=0)).replicas == 0


def test_a_silent_tick_keeps_the_replicas_asked_for_not_only_those_running():
    a = Autoscaler(settings(max_scale_up_ratio=2))
    drive(a, lambda t: 20, 120, replicas=2)
    decided = [a.decide(Observation(T0 + 120 + k, 2, even(100, 2))).replicas for k in range(5)]
    assert decided[-1] == 4
    # the two new ones are starting; the running two miss a report: nothing is cancelled
    assert a.decide(Observation(T0 + 125, 2, {})).replicas == 4
