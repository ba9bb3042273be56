"""Traces for the simulator (JSONL files, Keel's audit log, generated ones) and the replica
model calibrated from a `keel bench` result file."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from serving.autoscaling.calibrate import CalibrationError, ServiceCurve, calibrate, curve_from_points
from serving.autoscaling.traces import (
    Lengths,
    Request,
    Trace,
    TraceError,
    generate,
    read_audit,
    read_jsonl,
    write_jsonl,
)
from serving.policy.audit import AuditLog

# -- JSONL ---------------------------------------------------------------------------------------


def test_jsonl_round_trip_sorted_by_arrival(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(Trace([Request(0.5, 10, 3), Request(0.25, 7, 1)], 1.0), path)
    t = read_jsonl(path)
    assert t.requests == [Request(0.25, 7, 1), Request(0.5, 10, 3)]
    assert t.duration == 0.5


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"t": 1, "prompt_tokens": 3', "not JSON"),
        ('{"t": -1, "prompt_tokens": 3, "output_tokens": 2}', "t must be a number of seconds >= 0"),
        ('{"t": 1, "prompt_tokens": 3.5, "output_tokens": 2}', "prompt_tokens must be a whole number"),
        ('{"t": 1, "prompt_tokens": 3, "output_tokens": 0}', "output_tokens must be a whole number >= 1"),
        ('{"t": 1, "prompt_tokens": 3, "output_tokens": 2, "arrival": 1}', "unknown key 'arrival'"),
        ("[1, 2, 3]", "expected an object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"t": 0, "prompt_tokens": 3, "output_tokens": 2}\n\n' + line + "\n")
    with pytest.raises(TraceError, match=rf"t\.jsonl:3: .*{message}"):
        read_jsonl(path)


# -- the audit log -------------------------------------------------------------------------------


def audit_record(end: dt.datetime, latency_ms: float, **kw) -> dict:
    """A record as the gateway's Audit stage writes it (serving/gateway/policy.py)."""
    rec = {
        "time": end.isoformat(timespec="milliseconds"),
        "request_id": "r",
        "method": "POST",
        "path": "/v1/chat/completions",
        "tenant": "t",
        "key_id": "k",
        "model": "demo",
        "variant": None,
        "shadow": False,
        "status": 200,
        "error": None,
        "prompt_tokens": 12,
        "completion_tokens": 5,
        "reserved_tokens": None,
        "latency_ms": latency_ms,
        "ttfb_ms": 20.0,
        "guardrails": [],
        "quota": None,
    }
    rec.update(kw)
    return rec


def test_audit_log_arrivals_are_end_time_minus_latency(tmp_path):
    t0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.timezone.utc)
    s = dt.timedelta(seconds=1)
    with AuditLog(tmp_path / "audit") as log:
        log.write(audit_record(t0 + 3 * s, 1000.0, prompt_tokens=30, completion_tokens=8))  # arrived t0 + 2 s
        log.write(audit_record(t0 + 2 * s, 2000.0))  # arrived at t0
        log.write(audit_record(t0 + 4 * s, 100.0, status=429))
        log.write(audit_record(t0 + 4 * s, 100.0, shadow=True))
        log.write(audit_record(t0 + 4 * s, 100.0, model="other"))
        log.write({"event": "rollout", "time": t0.isoformat(), "model": "demo"})
    trace = read_audit([tmp_path / "audit"], model="demo")
    assert trace.requests == [Request(0.0, 12, 5), Request(2.0, 30, 8)]
    assert trace.epoch == t0.timestamp()
    assert trace.notes == ["skipped 1 events, 1 other models, 1 shadow copies, 1 status 429"]


def test_audit_log_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "audit-0.jsonl"
    path.write_text(json.dumps(audit_record(dt.datetime.now(dt.timezone.utc), 5.0)) + "\n{oops\n")
    with pytest.raises(TraceError, match=r"audit-0\.jsonl:2: not a JSON audit record"):
        read_audit([path])


def test_an_audit_log_without_answered_requests_says_what_it_skipped(tmp_path):
    path = tmp_path / "audit-0.jsonl"
    path.write_text(json.dumps(audit_record(dt.datetime.now(dt.timezone.utc), 5.0, status=503)) + "\n")
    with pytest.raises(TraceError, match="skipped: 1 status 503"):
        read_audit([path])


# -- generated -----------------------------------------------------------------------------------


def test_generated_traces_are_seeded():
    a, b, c = (generate("bursty", 5, 100, seed) for seed in (1, 1, 2))
    assert a.requests == b.requests != c.requests


@pytest.mark.parametrize("burstiness", [1.0, 0.25])
def test_bursty_gaps_have_the_mean_rate_and_gamma_variability(burstiness):
    t = generate("bursty", 10, 5_000, 3, burstiness=burstiness)
    gaps = np.diff([r.t for r in t.requests])
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    # gamma of shape k: coefficient of variation 1 / sqrt(k)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)


def test_diurnal_rate_peaks_a_quarter_period_in():
    t = generate("diurnal", 10, 1000, 0, period_s=1000, amplitude=0.8)
    counts, _ = np.histogram([r.t for r in t.requests], bins=4, range=(0, 1000))
    assert counts[0] > counts[2] * 2 and counts[1] > counts[3] * 2  # sin > 0 in the first half
    assert len(t.requests) / 1000 == pytest.approx(10, rel=0.05)


def test_token_lengths_follow_their_distribution():
    rng = np.random.default_rng(0)
    u = Lengths(100, 0.25).draw(rng, 10_000)
    assert u.min() >= 75 and u.max() <= 125
    ln = Lengths(100, 1.0, "lognormal").draw(rng, 50_000)
    assert ln.mean() == pytest.approx(100, rel=0.05) and np.median(ln) < 80  # long tail
    assert Lengths(100, dist="geometric", low=1).draw(rng, 50_000).mean() == pytest.approx(100, rel=0.03)


# -- calibration from a bench result -------------------------------------------------------------


def point(kind: str, value: float, ttft_ms: float, tpot_ms: float, **kw) -> dict:
    p = {
        "load": {"kind": kind, "value": value, "burstiness": 1.0},
        "completed": 48,
        "failed": 0,
        "mean_ttft_ms": ttft_ms,
        "mean_tpot_ms": tpot_ms,
        "output_throughput": 100.0 * value,
        "request_throughput": 1.0,
        "mean_e2el_ms": 1000.0,
    }
    p.update(kw)
    return p


def bench_file(tmp_path, **setting_kw) -> str:
    setting = {
        "name": "max_num_seqs=16",
        "engine": {"max_num_seqs": 16},
        "replicas": 1,
        "startup_s": 41.5,
        "points": [
            point("concurrency", 1, 50, 10),
            point("concurrency", 4, 80, 20),
            point("concurrency", 16, 300, 40),
            point("concurrency", 32, 2000, 45),
        ],
    }
    setting.update(setting_kw)
    doc = {
        "keel_bench": 1,
        "hardware": {"name": "h100-80gb", "price_per_replica_hour": 2.5, "currency": "EUR"},
        "slo": {"ttft_ms": 500, "tpot_ms": 50, "e2el_ms": None, "percentile": 90},
        "settings": [{"name": "other", "engine": {}, "replicas": 1, "points": []}, setting],
        "recommendation": {"setting": "max_num_seqs=16", "engine": {"max_num_seqs": 16}},
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_calibration_reads_curve_concurrency_cold_start_price_and_slo(tmp_path):
    model, slo, setting = calibrate(bench_file(tmp_path))
    assert setting["name"] == "max_num_seqs=16"
    assert model.max_concurrency == 16
    assert model.cold_start_s == 41.5
    assert (model.price_per_replica_hour, model.currency) == (2.5, "EUR")
    assert (slo.ttft_ms, slo.tpot_ms, slo.percentile) == (500, 50, 90)
    # c=32 is past max_num_seqs: its TTFT holds engine queueing, which the simulator models itself
    assert model.curve.concurrency == (1, 4, 16)
    assert model.curve.ttft(2.5) == pytest.approx(0.065)  # halfway between 50 and 80 ms
    assert model.curve.tpot(10) == pytest.approx(0.030)
    assert model.curve.ttft(0.5) == pytest.approx(0.050) and model.curve.ttft(64) == pytest.approx(0.300)


def test_cold_start_is_the_replicas_own_start_when_the_bench_recorded_it(tmp_path):
    model, _, _ = calibrate(bench_file(tmp_path, replica_start_s=24.3))
    assert model.cold_start_s == 24.3  # not the stack's 41.5, which holds Ray's start
    assert any("cold start 24.3 s: the bench's replica start" in n for n in model.notes)


def test_an_older_bench_file_falls_back_to_the_stack_start_and_says_so(tmp_path):
    model, _, _ = calibrate(bench_file(tmp_path))  # no replica_start_s
    assert model.cold_start_s == 41.5
    assert any("stack start" in n and "no replica_start_s" in n for n in model.notes)


def test_flags_override_the_bench_file(tmp_path):
    model, _, _ = calibrate(bench_file(tmp_path, replica_start_s=24.3), cold_start_s=9, price=1.0, max_concurrency=64)
    assert (model.cold_start_s, model.price_per_replica_hour, model.max_concurrency) == (9, 1.0, 64)
    assert model.curve.concurrency == (1, 4, 16, 32)


def test_a_bench_file_without_either_start_needs_cold_start_flag(tmp_path):
    with pytest.raises(CalibrationError, match="--cold-start-s"):
        calibrate(bench_file(tmp_path, startup_s=None))


def test_rate_points_sit_at_littles_law_concurrency():
    # 2 replicas, 4 req/s at 1.5 s mean E2EL: 6 in flight, 3 per replica
    curve = curve_from_points([point("rate", 4.0, 90, 12, request_throughput=4.0, mean_e2el_ms=1500.0)], replicas=2)
    assert curve.concurrency == (3.0,) and curve.ttft(3) == pytest.approx(0.09)


def test_service_curve_rejects_unordered_points():
    with pytest.raises(CalibrationError):
        ServiceCurve((4, 1), (0.1, 0.2), (0.01, 0.02))


def test_an_unknown_setting_names_the_ones_there(tmp_path):
    with pytest.raises(CalibrationError, match=r"no setting 'x'.*max_num_seqs=16"):
        calibrate(bench_file(tmp_path), "x")
