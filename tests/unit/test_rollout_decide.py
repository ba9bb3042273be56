"""Rollout gates: p95 from histogram buckets, deltas between scrapes, and each decision a step
can take, with its reason naming the gate and the numbers. No clock, no Ray: plain data."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from serving.rollout.decide import (
    ADVANCE,
    HOLD,
    PROMOTE,
    PROMOTING,
    ROLLBACK,
    ROLLING_BACK,
    STEPPING,
    WARMED,
    RolloutState,
    apply_decision,
    decide,
)
from serving.rollout.signals import by_variant, delta, histogram_quantile, snapshot
from serving.rollout.spec import RolloutSpec, parse_duration
from serving.rollout.store import ABORT, RolloutBusy, StateStore

INF = "+Inf"


# -- histogram_quantile, against hand-computed cases ---------------------------------------------


def test_quantile_interpolates_inside_the_bucket_the_rank_falls_in():
    # 100 observations: 50 <= 0.1, 40 in (0.1, 0.5], 10 in (0.5, 1]; p95 rank 95 is the 5th of 10
    # in (0.5, 1]: 0.5 + 0.5 * 5/10 = 0.75
    assert histogram_quantile(0.95, {"0.1": 50, "0.5": 90, "1.0": 100, INF: 100}) == pytest.approx(0.75)
    # p50: rank 50 is the last of the first bucket, interpolated from 0: 0.1
    assert histogram_quantile(0.5, {"0.1": 50, "0.5": 90, "1.0": 100, INF: 100}) == pytest.approx(0.1)
    # p25: rank 25 of the first bucket's 50, from 0 to 0.1: 0.05
    assert histogram_quantile(0.25, {"0.1": 50, "0.5": 90, INF: 100}) == pytest.approx(0.05)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound():
    assert histogram_quantile(0.95, {"0.1": 10, "0.5": 80, INF: 100}) == 0.5


def test_quantile_of_no_observations_is_none():
    assert histogram_quantile(0.95, {"0.1": 0, INF: 0}) is None
    assert histogram_quantile(0.95, {}) is None
    assert histogram_quantile(0.95, {"0.1": 3}) is None  # no +Inf: not a histogram


# -- snapshots and deltas from the gateway's /metrics --------------------------------------------


def metrics_text(demo_ok=0, demo_5xx=0, cand_ok=0, cand_5xx=0, cand_499=0, ttft=None, replica="r1") -> str:
    lines = ["# TYPE keel_requests counter"]
    for variant, status, n in (
        ("demo", "200", demo_ok),
        ("demo", "503", demo_5xx),
        ("demo@candidate", "200", cand_ok),
        ("demo@candidate", "500", cand_5xx),
        ("demo@candidate", "499", cand_499),
        ("other", "500", 50),
    ):
        lines.append(f'keel_requests_total{{tenant="t",model="demo",variant="{variant}",status="{status}"}} {n}')
    lines.append("# TYPE vllm:time_to_first_token_seconds histogram")
    for name, buckets in (ttft or {}).items():
        for le, c in buckets.items():
            lines.append(
                f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{le}",model_name="{name}",'
                f'replica="{replica}"}} {c}'
            )
        lines.append(
            f'vllm:time_to_first_token_seconds_count{{engine="0",model_name="{name}",replica="{replica}"}} '
            f"{buckets[INF]}"
        )
    return "\n".join(lines) + "\n"


NAMES = ("demo", "demo@candidate")


def test_signals_count_per_variant_5xx_as_errors_and_not_client_disconnects():
    start = snapshot(metrics_text(demo_ok=100, cand_ok=10), NAMES)
    now = snapshot(
        metrics_text(
            demo_ok=190,
            demo_5xx=1,
            cand_ok=18,
            cand_5xx=2,
            cand_499=5,
            ttft={"demo@candidate": {"0.1": 5, "1.0": 8, INF: 8}},
        ),
        NAMES,
    )
    s = by_variant(delta(start, now), "demo", "demo@candidate")
    assert s["baseline"]["requests"] == 91 and s["baseline"]["errors"] == 1
    assert s["candidate"]["requests"] == 10 and s["candidate"]["errors"] == 2  # 8 ok + 2 errors; 499s aside
    assert s["candidate"]["ttft"] == {"0.1": 5, "1.0": 8, INF: 8}
    assert s["baseline"]["ttft"] == {}


def test_a_counter_that_went_down_was_reset_and_counts_from_zero():
    start = snapshot(metrics_text(cand_ok=500), NAMES)
    now = snapshot(metrics_text(cand_ok=7), NAMES)  # the gateway restarted
    assert by_variant(delta(start, now), "demo", "demo@candidate")["candidate"]["requests"] == 7


def test_engine_histograms_sum_over_replicas():
    a = metrics_text(ttft={"demo": {"0.1": 1, INF: 2}}, replica="r1")
    b = metrics_text(ttft={"demo": {"0.1": 3, INF: 3}}, replica="r2").split("\n", 1)[1]
    s = by_variant(snapshot(a + b.replace("keel_requests_total", "ignored_total"), NAMES), "demo", "demo@candidate")
    assert s["baseline"]["ttft"] == {"0.1": 4, INF: 5}


# -- decide ---------------------------------------------------------------------------------------


def spec(**over) -> RolloutSpec:
    return RolloutSpec.model_validate({"model": "demo", "to_version": "demo-tiny@v2", "hold_s": 600, **over})


def stepping(step=0, started=1000.0, **over) -> RolloutState:
    s = spec()
    over = {"warmed": True, "judged_since": started, **over}  # past its warm-up, unless a test says not
    return RolloutState(
        model="demo",
        candidate="demo@candidate",
        to_version="demo-tiny@v2",
        from_version="demo-tiny",
        spec=s.model_dump(mode="json"),
        phase=STEPPING,
        step=step,
        step_started_at=started,
        **over,
    )


def variant(requests=100, errors=0, ttft=(0.05, 0.2), tpot=(0.02, 0.05)) -> dict:
    """`requests` with TTFT and TPOT spread over two buckets: 90% in the first, 10% in the second."""

    def hist(bounds):
        return {str(bounds[0]): 0.9 * requests, str(bounds[1]): requests, INF: requests}

    return {"requests": requests, "errors": errors, "ttft": hist(ttft), "tpot": hist(tpot)}


def test_holds_until_the_candidate_has_enough_requests_to_judge():
    d = decide(stepping(), spec(), {"baseline": variant(), "candidate": variant(requests=19, errors=19)}, 5000)
    assert d.action == HOLD and d.reason == "19 of 20 candidate requests needed to judge"


def test_holds_while_gates_pass_and_the_step_is_younger_than_its_hold():
    d = decide(stepping(started=1000), spec(), {"baseline": variant(), "candidate": variant(requests=30)}, 1599)
    assert d.action == HOLD and "599 of 600 s" in d.reason


def test_advances_once_the_hold_time_passed_with_every_gate_holding():
    d = decide(stepping(started=1000), spec(), {"baseline": variant(), "candidate": variant(requests=30)}, 1600)
    assert d.action == ADVANCE and "step 1 (5%) held 600 s" in d.reason


def test_the_last_step_promotes_comparing_with_the_previous_steps_baseline():
    ref = {"requests": 500, "errors": 0, "error_rate": 0.0, "ttft_p95": 0.125, "tpot_p95": 0.035}
    st = stepping(step=3, started=0, baseline_ref=ref)
    d = decide(st, spec(), {"baseline": variant(requests=0), "candidate": variant(requests=100)}, 600)
    assert d.action == PROMOTE and d.summary["baseline_from"] == "the previous step"


def test_error_rate_gate_rolls_back_naming_both_rates():
    d = decide(
        stepping(),
        spec(),
        {"baseline": variant(requests=1000, errors=5), "candidate": variant(requests=50, errors=2)},
        1001,
    )
    # 4% > 0.5% + 1 point
    assert d.action == ROLLBACK
    assert d.reason == "error rate: candidate 4.00% (2/50) > baseline 0.50% + 1.00%"


def test_error_rate_within_one_point_of_the_baseline_holds():
    d = decide(
        stepping(),
        spec(),
        {"baseline": variant(requests=1000, errors=5), "candidate": variant(requests=100, errors=1)},
        1001,
    )
    assert d.action == HOLD  # 1% <= 0.5% + 1 point


def test_ttft_gate_rolls_back_at_once_even_before_the_hold_time():
    # p95 of the 90/10 spread: bucket 2 holds ranks 90..100, 95 is its middle. Baseline (0.05, 0.2]:
    # 0.125 s; candidate (0.05, 0.5]: 0.275 s > 1.25 x 0.125 = 0.156 s
    d = decide(
        stepping(started=1000),
        spec(),
        {"baseline": variant(), "candidate": variant(requests=20, ttft=(0.05, 0.5))},
        1001,
    )
    assert d.action == ROLLBACK
    assert d.reason == "TTFT p95: candidate 275 ms > 1.25 x baseline 125 ms (156 ms)"


def test_tpot_gate_uses_its_own_ratio():
    signals = {"baseline": variant(), "candidate": variant(requests=20, tpot=(0.02, 0.06))}  # 40 ms vs 35 ms
    assert decide(stepping(), spec(), signals, 1001).action == HOLD  # 1.14 x: within 1.25
    strict = spec(gates={"max_tpot_p95_ratio": 1.1})
    d = decide(stepping(), strict, signals, 1001)
    assert d.action == ROLLBACK and d.reason.startswith("TPOT p95: candidate 40 ms > 1.1 x baseline 35 ms")


def test_no_latency_from_the_candidate_holds_rather_than_passing():
    cand = {**variant(requests=30), "ttft": {}}
    d = decide(stepping(started=0), spec(), {"baseline": variant(), "candidate": cand}, 10_000)
    assert d.action == HOLD and d.reason == "no ttft_p95 from the candidate's engines yet"


def test_a_warming_step_judges_errors_not_latency_then_counts_again_from_zero():
    cold = stepping(started=1000, warmed=False, judged_since=None)
    slow = {"baseline": variant(), "candidate": variant(requests=30, ttft=(0.05, 5.0))}
    d = decide(cold, spec(), slow, 1059)
    assert d.action == HOLD and d.reason == "step 1 (5%): warming up, 59 of 60 s (errors judged, latency not yet)"
    failing = {"baseline": variant(), "candidate": variant(requests=30, errors=10, ttft=(0.05, 5.0))}
    d = decide(cold, spec(), failing, 1010)
    assert d.action == ROLLBACK and d.reason.startswith("error rate: candidate 33.33%")
    d = decide(cold, spec(), slow, 1060)
    assert d.action == WARMED and apply_decision(cold, d, 1060, {"series": 7.0}) is None  # not a transition
    assert (cold.warmed, cold.judged_since, cold.start_snapshot, cold.history) == (True, 1060, {"series": 7.0}, [])
    # The hold counts from the end of the warm-up.
    ok = {"baseline": variant(), "candidate": variant(requests=30)}
    assert decide(cold, spec(), ok, 1600).action == HOLD and decide(cold, spec(), ok, 1660).action == ADVANCE
    apply_decision(cold, decide(cold, spec(), ok, 1660), 1660, {})
    assert cold.step == 1 and not cold.warmed and cold.judged_since is None  # the next step warms up again


def test_applying_decisions_moves_steps_and_records_each_transition():
    st = stepping(started=1000)
    d = decide(st, spec(), {"baseline": variant(), "candidate": variant(requests=30)}, 1600)
    rec = apply_decision(st, d, 1600, {"series": 1.0})
    assert (st.step, st.step_started_at, st.start_snapshot) == (1, 1600, {"series": 1.0})
    st.warmed, st.judged_since = True, 1600
    assert rec["action"] == ADVANCE and rec["percent"] == 25 and st.history == [rec]
    assert st.baseline_ref["ttft_p95"] == pytest.approx(0.125)
    hold = decide(st, spec(), {"baseline": variant(), "candidate": variant(requests=3)}, 1601)
    assert apply_decision(st, hold, 1601, {}) is None and len(st.history) == 1 and st.last_reason == hold.reason
    bad = decide(st, spec(), {"baseline": variant(), "candidate": variant(requests=30, errors=30)}, 1602)
    apply_decision(st, bad, 1602, {})
    assert st.phase == ROLLING_BACK and st.percent == 0 and st.history[-1]["action"] == ROLLBACK


def test_promote_decision_puts_all_traffic_on_the_candidate_while_promoting():
    st = stepping(
        step=3,
        started=0,
        baseline_ref={"requests": 500, "errors": 0, "error_rate": 0.0, "ttft_p95": 0.125, "tpot_p95": 0.035},
    )
    d = decide(st, spec(), {"baseline": variant(requests=0), "candidate": variant(requests=100)}, 600)
    apply_decision(st, d, 600, {})
    assert st.phase == PROMOTING and st.percent == 100


# -- the spec a user gives ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, message",
    [
        ([100], "at least two steps"),
        ([5, 25, 50], "last step must be 100"),
        ([50, 25, 100], "must increase"),
        ([0, 100], "> 0 and <= 100"),
        ([5, 150], "> 0 and <= 100"),
    ],
)
def test_bad_steps_are_refused_with_the_reason(steps, message):
    with pytest.raises(ValidationError, match=message):
        spec(steps=steps)


def test_unknown_gate_keys_are_refused():
    with pytest.raises(ValidationError, match="extra"):
        spec(gates={"max_ttft_ratio": 2})


@pytest.mark.parametrize("text, seconds", [("600", 600), ("90s", 90), ("10m", 600), ("1.5h", 5400), ("500ms", 0.5)])
def test_durations(text, seconds):
    assert math.isclose(parse_duration(text), seconds)


def test_a_duration_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="`ten minutes` is not a duration"):
        parse_duration("ten minutes")


# -- the state file -------------------------------------------------------------------------------


def test_state_round_trips_through_its_file_and_replaces_it_whole(tmp_path):
    store = StateStore(tmp_path)
    st = stepping(step=2, start_snapshot={'keel_requests_total{"variant": "demo"}': 3.0})
    store.save(st)
    assert store.load("demo") == st
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]  # no tmp file left behind
    assert json.loads((tmp_path / "demo.json").read_text())["phase"] == STEPPING
    assert store.load("other") is None


def test_a_damaged_state_file_is_named_not_a_traceback(tmp_path):
    (tmp_path / "demo.json").write_text("{not json")
    with pytest.raises(ValueError, match="demo.json: not a rollout state file"):
        StateStore(tmp_path).load("demo")


def test_one_process_drives_a_rollout_and_others_leave_it_requests(tmp_path):
    store = StateStore(tmp_path)
    fd = store.lock("org/model")
    with pytest.raises(RolloutBusy, match="driven by pid"):
        StateStore(tmp_path).lock("org/model")
    assert store.driven("org/model")
    store.request("org/model", ABORT)
    assert store.take_request("org/model") == ABORT and store.take_request("org/model") is None
    store.unlock(fd)
    assert not store.driven("org/model")


def test_a_driver_waits_out_a_status_probe_but_not_another_driver(tmp_path):
    import threading

    store = StateStore(tmp_path)
    probe = store.lock("demo")  # `driven()` holds it for an instant; here for 0.3 s
    threading.Timer(0.3, store.unlock, args=(probe,)).start()
    fd = StateStore(tmp_path).lock("demo", wait_s=10)  # waits, then holds it
    assert store.driven("demo")
    with pytest.raises(RolloutBusy, match="driven by pid"):
        StateStore(tmp_path).lock("demo", wait_s=0.2)  # a second driver gives up
    store.unlock(fd)
