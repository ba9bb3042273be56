"""keel bench's load-point metrics (vLLM bench's definitions and names) and SLO judgement,
checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from serving.bench.metrics import percentile_key, summarize
from serving.bench.records import RequestRecord
from serving.bench.slo import meets_slo, slo_max
from serving.bench.spec import SLOSpec


def ok(ttft, e2el, itl, prompt, out):
    return RequestRecord(ok=True, status=200, ttft=ttft, e2el=e2el, itl=itl, prompt_tokens=prompt, output_tokens=out)


def failed(status, error):
    return RequestRecord(ok=False, status=status, error=error)


# Three successes (4, 1 and 3 output tokens) and four failures: two 503s, a refused connection
# and an empty stream (a 200 with no output).
RECORDS = [
    ok(0.1, 0.5, [0.1, 0.1, 0.2], 10, 4),  # tpot = 0.4 / 3
    ok(0.2, 0.2, [], 20, 1),  # one token: no tpot
    ok(0.3, 0.9, [0.3, 0.3], 30, 3),  # tpot = 0.6 / 2 = 0.3
    failed(503, "503 no capacity"),
    failed(0, "connection refused"),
    failed(503, "503 no capacity"),
    failed(200, "empty stream"),
]


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-9)


def test_counts_tokens_and_rates_cover_successful_requests_only():
    m = summarize(RECORDS, 2.0)
    assert (m["completed"], m["failed"]) == (3, 4)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 8)
    assert m["duration"] == 2.0
    assert m["request_throughput"] == approx(1.5)
    assert m["output_throughput"] == approx(4.0)
    assert m["total_token_throughput"] == approx(34.0)


def test_ttft_and_e2el_stats_use_population_std_and_linear_percentiles():
    m = summarize(RECORDS, 2.0)
    assert m["mean_ttft_ms"] == approx(200)
    assert m["median_ttft_ms"] == approx(200)
    assert m["std_ttft_ms"] == approx(math.sqrt(0.02 / 3) * 1000)  # population, not sample
    assert m["p50_ttft_ms"] == approx(200)
    assert m["p90_ttft_ms"] == approx(280)  # 0.2 + 0.8 * (0.3 - 0.2)
    assert m["p99_ttft_ms"] == approx(298)
    assert m["mean_e2el_ms"] == approx(1600 / 3)
    assert m["median_e2el_ms"] == approx(500)
    assert m["p90_e2el_ms"] == approx(820)  # 0.5 + 0.8 * (0.9 - 0.5)


def test_tpot_skips_one_token_requests_and_itl_pools_every_gap():
    m = summarize(RECORDS, 2.0)
    tpots = [0.4 / 3, 0.3]
    assert m["mean_tpot_ms"] == approx(sum(tpots) / 2 * 1000)
    assert m["median_tpot_ms"] == approx(sum(tpots) / 2 * 1000)
    assert m["std_tpot_ms"] == approx((0.3 - 0.4 / 3) / 2 * 1000)
    assert m["p90_tpot_ms"] == approx((0.4 / 3 + 0.9 * (0.3 - 0.4 / 3)) * 1000)
    # gaps 0.1 0.1 0.2 0.3 0.3
    assert m["mean_itl_ms"] == approx(200)
    assert m["median_itl_ms"] == approx(200)
    assert m["std_itl_ms"] == approx(math.sqrt(0.008) * 1000)
    assert m["p90_itl_ms"] == approx(300)


def test_an_answer_read_at_once_adds_zero_gaps_and_zero_tpot():
    # The tiny model's bimodal mode: one answer arrives in a single read (TTFT = E2EL, gaps 0),
    # the other token by token. Gaps 0 0 0 0.2 0.2; TPOT 0 and 0.4 / 2.
    m = summarize([ok(0.3, 0.3, [0.0, 0.0, 0.0], 10, 4), ok(0.1, 0.5, [0.2, 0.2], 10, 3)], 1.0)
    assert m["mean_itl_ms"] == approx(80)
    assert m["median_itl_ms"] == 0
    assert m["p90_itl_ms"] == approx(200)  # index 3.6 of the sorted gaps lies between two 0.2s
    assert m["std_itl_ms"] == approx(math.sqrt(0.0096) * 1000)  # mean of squares 0.016 - 0.08^2
    assert m["mean_tpot_ms"] == approx(100) and m["median_tpot_ms"] == approx(100)
    only_at_once = summarize([ok(0.3, 0.3, [0.0, 0.0, 0.0], 10, 4)], 1.0)
    assert only_at_once["mean_itl_ms"] == only_at_once["p99_itl_ms"] == only_at_once["mean_tpot_ms"] == 0


def test_failures_are_counted_by_status_with_the_empty_stream_under_200():
    m = summarize(RECORDS, 2.0)
    assert m["failures_by_status"] == {"503": 2, "0": 1, "200": 1}
    assert m["sample_errors"] == ["503 no capacity", "connection refused", "empty stream"]


def test_sample_errors_keep_three_distinct_messages():
    records = [failed(500, f"boom {i}") for i in range(5)] + [failed(500, "boom 0")]
    assert summarize(records, 1.0)["sample_errors"] == ["boom 0", "boom 1", "boom 2"]


def test_without_an_slo_goodput_is_none():
    m = summarize(RECORDS, 2.0)
    assert m["request_goodput"] is None and m["good_requests"] is None


def test_goodput_counts_requests_meeting_every_threshold():
    # ttft <= 250 ms rules out the third; tpot <= 200 ms holds for the first (133 ms) and the
    # one-token request (tpot counts as 0).
    m = summarize(RECORDS, 2.0, SLOSpec(ttft_ms=250, tpot_ms=200))
    assert m["good_requests"] == 2
    assert m["request_goodput"] == approx(1.0)


def test_goodput_counts_a_one_token_request_as_tpot_zero():
    m = summarize(RECORDS, 2.0, SLOSpec(tpot_ms=100))  # 133 ms and 300 ms miss it
    assert m["good_requests"] == 1
    m = summarize(RECORDS, 2.0, SLOSpec(e2el_ms=600))  # 900 ms misses it
    assert m["good_requests"] == 2


def test_a_threshold_equal_to_the_latency_is_met():
    m = summarize([ok(0.25, 0.5, [], 1, 1)], 1.0, SLOSpec(ttft_ms=250))
    assert m["good_requests"] == 1


def test_field_names_follow_vllm_and_include_the_slo_percentile():
    assert percentile_key(99, "ttft") == "p99_ttft_ms"
    assert percentile_key(99.0, "ttft") == "p99_ttft_ms"
    assert percentile_key(99.9, "itl") == "p99.9_itl_ms"
    m = summarize(RECORDS, 2.0, SLOSpec(ttft_ms=500, percentile=99.9))
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for p in ("50", "90", "99", "99.9"):
            assert f"p{p}_{metric}_ms" in m
    m = summarize(RECORDS, 2.0, SLOSpec(ttft_ms=500, percentile=95), percentiles=(99,))
    assert "p95_ttft_ms" in m and "p99_ttft_ms" in m and "p50_ttft_ms" not in m


def test_one_token_requests_only_give_tpot_zero():
    m = summarize([ok(0.1, 0.1, [], 5, 1), ok(0.3, 0.3, [], 5, 1)], 1.0, SLOSpec(tpot_ms=1))
    assert m["mean_tpot_ms"] == 0 and m["p99_tpot_ms"] == 0 and m["mean_itl_ms"] == 0
    assert m["good_requests"] == 2
    assert m["total_output_tokens"] == 2


def test_no_successful_request_gives_zeros_not_an_exception():
    m = summarize([failed(503, "full"), failed(0, "refused")], 3.0, SLOSpec(ttft_ms=100))
    assert (m["completed"], m["failed"]) == (0, 2)
    assert m["request_throughput"] == 0 and m["output_throughput"] == 0
    assert m["good_requests"] == 0 and m["request_goodput"] == 0
    assert all(m[f"{s}_{x}_ms"] == 0 for s in ("mean", "median", "std", "p99") for x in ("ttft", "tpot", "itl", "e2el"))
    assert m["failures_by_status"] == {"503": 1, "0": 1}


def test_no_records_and_zero_duration_give_zero_rates():
    m = summarize([], 0.0, SLOSpec(ttft_ms=100))
    assert m["completed"] == 0 and m["request_throughput"] == 0 and m["request_goodput"] == 0
    m = summarize(RECORDS, 0.0)
    assert m["completed"] == 3
    assert m["request_throughput"] == 0 and m["total_token_throughput"] == 0
    assert m["mean_ttft_ms"] == approx(200)


# --- SLO ----------------------------------------------------------------------------------------


def point(p99_ttft=400.0, p99_tpot=40.0, failed=0, completed=10):
    return {
        "p99_ttft_ms": p99_ttft,
        "p99_tpot_ms": p99_tpot,
        "p99_e2el_ms": 5000.0,
        "failed": failed,
        "completed": completed,
    }


SLO = SLOSpec(ttft_ms=500, tpot_ms=50)


def test_a_point_meets_the_slo_when_every_threshold_holds_at_its_percentile():
    assert meets_slo(point(), SLO)
    assert meets_slo(point(p99_ttft=500.0, p99_tpot=50.0), SLO)  # <= is enough
    assert not meets_slo(point(p99_ttft=501.0), SLO)
    assert not meets_slo(point(p99_tpot=51.0), SLO)
    assert meets_slo(point(p99_tpot=1e6), SLOSpec(ttft_ms=500))  # thresholds not given don't count


def test_a_point_with_a_failure_or_no_completion_misses_the_slo():
    assert not meets_slo(point(failed=1), SLO)
    assert not meets_slo(point(completed=0), SLO)


def test_meets_slo_reads_the_slos_percentile():
    p = {**point(), "p99.9_ttft_ms": 600.0, "p99.9_tpot_ms": 45.0}
    assert meets_slo(p, SLO)
    assert not meets_slo(p, SLOSpec(ttft_ms=500, tpot_ms=50, percentile=99.9))
    with pytest.raises(KeyError, match="p90_ttft_ms"):
        meets_slo(point(), SLOSpec(ttft_ms=500, percentile=90))


def test_summarized_points_are_judged_at_the_slo_percentile():
    slo = SLOSpec(ttft_ms=290, percentile=90)
    m = summarize(RECORDS[:3], 1.0, slo)  # p90 ttft = 280 ms, no failures
    assert meets_slo(m, slo)
    assert not meets_slo(summarize(RECORDS, 1.0, slo), slo)  # the same with failures


def load_point(value, meets):
    return {"load": {"kind": "concurrency", "value": value, "burstiness": 1.0}, "meets_slo": meets}


def test_slo_max_is_the_highest_load_below_the_first_miss():
    points = [load_point(1, True), load_point(2, True), load_point(4, False), load_point(8, True)]
    assert slo_max(points)["load"]["value"] == 2  # the lucky 8 above a miss does not count
    assert slo_max([load_point(1, True), load_point(2, True)])["load"]["value"] == 2


def test_slo_max_walks_up_in_load_order():
    points = [load_point(8, True), load_point(1, True), load_point(4, False), load_point(2, True)]
    assert slo_max(points)["load"]["value"] == 2


def test_slo_max_is_none_when_the_lowest_load_misses():
    assert slo_max([load_point(1, False), load_point(2, True)]) is None
    assert slo_max([]) is None
