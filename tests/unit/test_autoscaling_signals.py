"""The four signals from a vLLM /metrics page, rendered as vLLM 0.29-0.32 renders it: its metric
names, its cache_config_info labels (vllm.config.CacheConfig.metrics_info), prometheus_client."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from serving.autoscaling.signals import MetricsUnreadable, read_signals


def vllm_page(running=(2,), waiting=(3,), usage=(0.25,), blocks=1000, block_size=16, info=True) -> str:
    from vllm.config import CacheConfig

    reg = CollectorRegistry()
    labels = ["model_name", "engine"]
    for name, values in (
        ("vllm:num_requests_running", running),
        ("vllm:num_requests_waiting", waiting),
        ("vllm:kv_cache_usage_perc", usage),
    ):
        g = Gauge(name, name, labelnames=labels, registry=reg)
        for engine, v in enumerate(values):
            g.labels(model_name="demo", engine=str(engine)).set(v)
    if info:
        cache = CacheConfig(block_size=block_size)
        cache.num_gpu_blocks = blocks
        meta = cache.metrics_info()
        g = Gauge("vllm:cache_config_info", "cache", labelnames=[*meta, "engine"], registry=reg)
        for engine in range(len(running)):
            g.labels(**meta, engine=str(engine)).set(1)
    return generate_latest(reg).decode()


def test_all_four_signals_from_one_page():
    s = read_signals(vllm_page())
    assert s == {
        "requests_in_flight": 5.0,
        "waiting_requests": 3.0,
        "kv_cache_usage": 0.25,
        "tokens_in_flight": 0.25 * 1000 * 16,
    }


def test_data_parallel_engines_add_up_and_average_their_kv_usage():
    s = read_signals(vllm_page(running=(1, 3), waiting=(0, 2), usage=(0.2, 0.4)))
    assert s["requests_in_flight"] == 6 and s["waiting_requests"] == 2
    assert s["kv_cache_usage"] == pytest.approx(0.3)
    assert s["tokens_in_flight"] == pytest.approx(0.3 * 2 * 1000 * 16)


def test_no_cache_info_means_no_token_signal_not_zero():
    assert "tokens_in_flight" not in read_signals(vllm_page(info=False))


@pytest.mark.parametrize("page", ["", "not a metrics page {{{", vllm_page().replace("vllm:num_requests_waiting", "x")])
def test_a_page_without_the_gauges_is_unreadable_not_idle(page):
    with pytest.raises(MetricsUnreadable):
        read_signals(page)


def test_a_replica_whose_scrape_fails_reports_nothing(monkeypatch):
    from serving.engine import replica as replica_mod

    r = object.__new__(replica_mod.EngineReplica)
    r.spec = type("Spec", (), {"bind_host": "127.0.0.1"})()
    r.port, r.replica_id, r._scrape_failing = 1, "r1", False
    r.requests_in_flight = lambda: 0  # open connections to the engine: none here

    async def refused(*a, **kw):
        raise ConnectionRefusedError

    async def page(*a, **kw):
        return 200, vllm_page().encode()

    monkeypatch.setattr(replica_mod, "http_get", refused)
    assert asyncio.run(r.record_autoscaling_stats()) == {}
    monkeypatch.setattr(replica_mod, "http_get", page)
    assert asyncio.run(r.record_autoscaling_stats())["requests_in_flight"] == 5.0


def test_requests_the_gateway_has_open_count_before_the_engine_core_sees_them(monkeypatch):
    # vLLM's gauges say 5 (running + waiting); the gateway has 9 requests open on the engine's
    # port (4 still being read, tokenized or streamed out): 9 are in flight.
    from serving.engine import replica as replica_mod

    r = object.__new__(replica_mod.EngineReplica)
    r.spec = type("Spec", (), {"bind_host": "127.0.0.1"})()
    r.port, r.replica_id, r._scrape_failing = 1, "r1", False

    async def page(*a, **kw):
        return 200, vllm_page().encode()

    monkeypatch.setattr(replica_mod, "http_get", page)
    r.requests_in_flight = lambda: 9
    signals = asyncio.run(r.record_autoscaling_stats())
    assert signals["requests_in_flight"] == 9.0 and signals["waiting_requests"] == 3.0
    r.requests_in_flight = lambda: 2  # fewer connections than the gauges: the gauges stand
    assert asyncio.run(r.record_autoscaling_stats())["requests_in_flight"] == 5.0
