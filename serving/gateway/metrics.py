"""The gateway's Prometheus metrics, plus the engines' own, gathered at scrape time.

The gateway measures what it sees per request (status, end-to-end time, time to the first
body byte). Token-level metrics (TTFT, inter-token latency, tokens in and out, running
requests) are the engines' own vLLM metrics, fetched from every replica when /metrics is
scraped and re-labelled with `replica`, so one scrape of the gateway shows the whole stack and
nothing is counted on the streaming path.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.httpraw import http_get

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
UNROUTED = "-"  # model label of requests rejected before a model was resolved (bounded cardinality)


class GatewayMetrics:
    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, registry: CollectorRegistry | None = None):
        disable_created_metrics()  # *_created series double the scrape and nobody graphs them
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "keel_requests", "Requests answered by the gateway, by model and HTTP status "
            "(499: the client went away first).", ["model", "status"], registry=r)
        self.duration = Histogram(
            "keel_request_duration_seconds", "Time from request received to response end, as the "
            "gateway saw it.", ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.first_byte = Histogram(
            "keel_time_to_first_byte_seconds", "Time from request received to the first response "
            "body byte (for streams: the first token chunk).", ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "keel_requests_in_flight", "Requests relayed to an engine and not finished.", ["model"], registry=r)
        self.endpoints = Gauge(
            "keel_engine_replicas_ready", "Engine replicas the gateway can route to.", ["model"], registry=r)

    def observe(self, model: str | None, started: float, outcome) -> None:
        label = model or UNROUTED
        self.requests.labels(label, str(outcome.status)).inc()
        if model is not None:
            self.duration.labels(label).observe(outcome.finished_at - started)
            if outcome.first_byte_at is not None:
                self.first_byte.labels(label).observe(outcome.first_byte_at - started)

    async def render(self, endpoints) -> bytes:
        own = generate_latest(self.registry)
        texts = await asyncio.gather(*(_scrape(e) for e in endpoints))
        merged = CollectorRegistry()
        merged.register(_EngineFamilies([(e.replica_id, t) for e, t in zip(endpoints, texts) if t]))
        return own + generate_latest(merged)


async def _scrape(ep) -> str | None:
    try:
        status, body = await http_get(ep.host, ep.port, "/metrics", timeout=2.0)
    except (OSError, asyncio.TimeoutError):
        return None
    return body.decode() if status == 200 else None


class _EngineFamilies:
    """A one-off collector: each replica's vllm:* families, merged, with a `replica` label."""

    def __init__(self, scraped: list[tuple[str, str]]):
        self.scraped = scraped

    def collect(self):
        families = {}
        for replica, text in self.scraped:
            for fam in text_string_to_metric_families(text):
                if not fam.name.startswith("vllm:"):
                    continue
                samples = [s._replace(labels={**s.labels, "replica": replica}) for s in fam.samples]
                if fam.name in families:
                    families[fam.name].samples.extend(samples)
                else:
                    fam.samples = samples
                    families[fam.name] = fam
        yield from families.values()
