"""keel bench's prices and its recommendation: the cheapest setting at a target peak inside
the SLO, with a config block that Keel accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.bench.cost import (
    cost_per_million_output_tokens,
    no_recommendation_reason,
    per_replica_capacity,
    recommend,
    replicas_needed,
)
from serving.bench.spec import HardwareProfile, SLOSpec, TargetSpec
from serving.config import AutoscalingConfig, parse_config

REPO = Path(__file__).resolve().parents[2]
H100 = HardwareProfile(price_per_replica_hour=2.5)
SLO = SLOSpec(ttft_ms=500, tpot_ms=50)
BASE_ENGINE = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 128}


def at(kind, value, rps, out_tps, mean_e2el_ms=1000.0):
    return {
        "load": {"kind": kind, "value": value, "burstiness": 1.0},
        "request_throughput": rps,
        "output_throughput": out_tps,
        "mean_e2el_ms": mean_e2el_ms,
        "meets_slo": True,
        "failed": 0,
        "completed": 64,
    }


def setting(name, replicas, slo_max, **engine):
    return {
        "name": name,
        "engine": engine,
        "replicas": replicas,
        "points": [slo_max] if slo_max else [],
        "slo_max": slo_max,
    }


# Per replica: A carries 4 req/s with 8 in flight; B (measured on 2 replicas) 5 req/s with 16.
A = setting("max_num_seqs=8", 1, at("concurrency", 8, 4.0, 512.0), max_num_seqs=8)
B = setting("max_num_seqs=32, replicas=2", 2, at("concurrency", 32, 10.0, 1280.0), max_num_seqs=32)
NONE = setting("max_num_seqs=64", 1, None, max_num_seqs=64)


def rec(settings, **target):
    return recommend(settings, TargetSpec(**target), SLO, "h100-80gb", H100, "demo", "demo-tiny", BASE_ENGINE)


def test_cost_per_million_output_tokens():
    # 2 replicas at 2.50/h = 5/h for 1000 tok/s = 3.6M tokens/h
    assert cost_per_million_output_tokens(1000.0, 2, 2.5) == pytest.approx(5 / 3.6)
    assert cost_per_million_output_tokens(0.0, 2, 2.5) is None


def test_per_replica_capacity_divides_by_the_measured_replicas():
    assert per_replica_capacity(B) == {"request_throughput": 5.0, "output_throughput": 640.0, "in_flight": 16.0}
    assert per_replica_capacity(NONE) is None


def test_rate_loads_get_in_flight_from_littles_law():
    s = setting("r", 2, at("rate", 6.0, 5.9, 700.0, mean_e2el_ms=1500.0))
    cap = per_replica_capacity(s)
    assert cap["request_throughput"] == pytest.approx(2.95)
    assert cap["in_flight"] == pytest.approx(5.9 * 1.5 / 2)  # 4.425
    assert replicas_needed(cap, TargetSpec(peak_rps=10)) == 4  # 3.39 -> 4
    assert replicas_needed(cap, TargetSpec(peak_concurrency=20)) == 5  # 4.52 -> 5
    r = rec([s], peak_concurrency=20)
    assert r["autoscaling"]["target"] == 4.4  # rounded down


def test_replicas_needed_rounds_up_but_not_float_noise():
    cap = {"request_throughput": 4.0, "in_flight": 8.0}
    assert replicas_needed(cap, TargetSpec(peak_rps=12)) == 3
    assert replicas_needed(cap, TargetSpec(peak_rps=12.1)) == 4
    assert replicas_needed(cap, TargetSpec(peak_rps=0.5)) == 1
    assert replicas_needed(cap, TargetSpec(peak_concurrency=17)) == 3
    # 2.1 / 0.3 is 7.000000000000001 in floating point: still 7 replicas
    assert replicas_needed({"request_throughput": 0.3, "in_flight": 1.0}, TargetSpec(peak_rps=2.1)) == 7
    assert replicas_needed({"request_throughput": 0.0, "in_flight": 0.0}, TargetSpec(peak_rps=1)) is None


def test_the_setting_needing_fewest_replicas_wins():
    r = rec([A, B, NONE], peak_rps=20)  # A: 5 replicas, B: 4
    assert r["setting"] == B["name"]
    assert r["replicas"] == 4
    assert r["cost_per_hour"] == pytest.approx(10.0)
    assert r["currency"] == "USD"
    assert r["engine"] == {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 32}
    assert r["autoscaling"] == {"min_replicas": 1, "max_replicas": 4, "signal": "requests_in_flight", "target": 16.0}
    assert r["per_replica"]["request_throughput"] == 5.0
    assert r["cost_per_million_output_tokens"] == pytest.approx(5 / (1280 * 3600) * 1e6)
    assert "4 replicas" in r["reasoning"] and "10.00 USD/h" in r["reasoning"]


def test_a_tie_on_price_goes_to_the_lower_cost_per_million_tokens():
    # peak 12 req/s: A needs ceil(12/4) = 3, B ceil(12/5) = 3; B makes tokens cheaper
    r = rec([A, B], peak_rps=12)
    assert (r["setting"], r["replicas"], r["cost_per_hour"]) == (B["name"], 3, 7.5)


def test_a_concurrency_target_uses_in_flight_per_replica():
    r = rec([A, B], peak_concurrency=40)  # A: 40/8 = 5, B: 40/16 = 2.5 -> 3
    assert (r["setting"], r["replicas"]) == (B["name"], 3)
    r = rec([A], peak_concurrency=40)
    assert (r["replicas"], r["autoscaling"]["target"]) == (5, 8.0)
    assert "the only setting" in r["reasoning"]


def test_no_recommendation_when_no_setting_meets_the_slo():
    assert rec([NONE], peak_rps=1) is None
    assert rec([], peak_rps=1) is None
    reason = no_recommendation_reason([NONE], SLO)
    assert "max_num_seqs=64" in reason and "p99 TTFT <= 500 ms, TPOT <= 50 ms" in reason


def test_the_config_block_is_a_valid_keel_config():
    r = rec([A, B], peak_rps=20)
    AutoscalingConfig.model_validate(r["autoscaling"])
    doc = yaml.safe_load(r["config_yaml"])
    assert r["config_yaml"].startswith("# keel bench: ")
    cfg = parse_config(doc, check_engine_args=False)
    model = cfg.models["demo"]
    assert model.weights == "demo-tiny"
    assert model.engine["max_num_seqs"] == 32
    assert model.deployment.autoscaling.max_replicas == 4
    assert model.deployment.autoscaling.target == 16.0


def test_the_config_block_pastes_into_the_shipped_config_keeping_env_and_deployment():
    local = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    demo = local["models"]["demo"]  # deployment: num_replicas 1, num_cpus 1
    r = recommend(
        [A, B],
        TargetSpec(peak_rps=20),
        SLO,
        "cpu-2core",
        HardwareProfile(price_per_replica_hour=0.05),
        "demo",
        demo["weights"],
        demo["engine"],
        base_model=demo,
    )
    block = yaml.safe_load(r["config_yaml"])
    pasted = parse_config({**local, **block}, check_engine_args=False)
    model = pasted.models["demo"]
    assert model.env == demo["env"]
    assert model.deployment.num_replicas is None  # replaced by autoscaling
    assert model.deployment.num_cpus == 1
    assert model.deployment.autoscaling.max_replicas == 4
    assert model.engine["enforce_eager"] is True and model.engine["max_num_seqs"] == 32


def test_the_config_block_keeps_autoscaling_delays_and_replaces_replica_bounds():
    base = {
        "weights": "demo-tiny",
        "deployment": {
            "num_gpus": 1,
            "autoscaling": {
                "min_replicas": 2,
                "max_replicas": 9,
                "initial_replicas": 9,
                "signal": "kv_cache_usage",
                "target": 0.8,
                "scale_down_cooldown_s": 30,
            },
        },
    }
    r = recommend(
        [A], TargetSpec(peak_rps=8), SLO, "h100-80gb", H100, "demo", "demo-tiny", BASE_ENGINE, base_model=base
    )
    deployment = yaml.safe_load(r["config_yaml"])["models"]["demo"]["deployment"]
    assert deployment == {
        "num_gpus": 1,
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 2,
            "signal": "requests_in_flight",
            "target": 8.0,
            "scale_down_cooldown_s": 30,
        },
    }
