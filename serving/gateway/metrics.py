"""The gateway's Prometheus metrics, plus the engines' own, gathered at scrape time.

The gateway measures what it sees per request (status, end-to-end time, time to the first
body byte). Token-level metrics (TTFT, inter-token latency, tokens in and out, running
requests) are the engines' own vLLM metrics, fetched from every replica when /metrics is
scraped and re-labelled with `replica`, so one scrape of the gateway shows the whole stack and
nothing is counted on the streaming path.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from serving.httpraw import http_get
from serving.ops.slo_events import SloJudge, timing_of

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
UNROUTED = "-"  # model label of requests rejected before a model was resolved (bounded cardinality)


class GatewayMetrics:
    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, registry: CollectorRegistry | None = None):
        disable_created_metrics()  # *_created series double the scrape and nobody graphs them
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "keel_requests",
            "Requests answered by the gateway, by tenant, public model, variant (the "
            "model deployment that served it) and HTTP status (499: the client went away first).",
            ["tenant", "model", "variant", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "keel_tokens",
            "Tokens by tenant, model, variant and kind (prompt, completion), as the engine reported them.",
            ["tenant", "model", "variant", "kind"],
            registry=r,
        )
        self.quota_rejections = Counter(
            "keel_quota_rejections",
            "Requests refused with 429 by tenant and the limit that refused them.",
            ["tenant", "limit"],
            registry=r,
        )
        self.reserved_tokens = Gauge(
            "keel_quota_reserved_tokens",
            "Tokens reserved by requests in flight and not yet settled.",
            ["tenant"],
            registry=r,
        )
        self.quota_backend_errors = Counter(
            "keel_quota_backend_errors",
            "Requests that found the quota backend unreachable, by what "
            "happened to them (fail_open: admitted without quotas; fail_closed: 503).",
            ["mode"],
            registry=r,
        )
        self.guardrail_actions = Counter(
            "keel_guardrail_actions",
            "Guardrail hits by tenant, guardrail, action (block, redact, flag) and direction (input, output).",
            ["tenant", "guardrail", "action", "direction"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "keel_shadow_requests",
            "Mirrored requests to an experiment's shadow variant, by status "
            "(dropped: too many in flight; no_replica; error).",
            ["model", "variant", "status"],
            registry=r,
        )
        self.shadow_duration = Histogram(
            "keel_shadow_request_duration_seconds",
            "End-to-end time of shadow requests.",
            ["model", "variant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_tokens = Counter(
            "keel_shadow_tokens", "Tokens used by shadow requests.", ["model", "variant", "kind"], registry=r
        )
        self.duration = Histogram(
            "keel_request_duration_seconds",
            "Time from request received to response end, as the gateway saw it.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_byte = Histogram(
            "keel_time_to_first_byte_seconds",
            "Time from request received to the first response body byte (for streams: the first token chunk).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "keel_requests_in_flight", "Requests relayed to an engine and not finished.", ["model"], registry=r
        )
        self.endpoints = Gauge(
            "keel_engine_replicas_ready", "Engine replicas the gateway can route to.", ["model"], registry=r
        )
        self.engine_connections = Counter(
            "keel_engine_connections_opened",
            "New connections to engine replicas; against keel_requests_total it shows how many "
            "requests went out on a pooled keep-alive connection (serving/gateway/engine_conns.py).",
            ["model"],
            registry=r,
        )
        self.anomalies = Counter(
            "keel_anomalies",
            "Anomalies started, by tenant, model and signal (requests, tokens, "
            "error_rate, latency, guardrail_hits); see GET /v1/admin/anomalies.",
            ["tenant", "model", "signal"],
            registry=r,
        )
        self.anomaly_active = Gauge(
            "keel_anomaly_active",
            "1 while an anomaly of the signal of the tenant on the model lasts, 0 once it ended.",
            ["tenant", "model", "signal"],
            registry=r,
        )
        self.held = Gauge(
            "keel_requests_held",
            "Requests waiting at this gateway for a replica of a model scaled to zero to start.",
            ["model"],
            registry=r,
        )
        self.slo_events = Counter(
            "keel_slo_events",
            "Requests judged against each SLO (`slos:` in the policy), by model, tenant "
            "and whether the event was good: the SLIs of `keel slo rules`.",
            ["slo", "model", "tenant", "good"],
            registry=r,
        )
        self._slo_series: dict[tuple[str, str, str], tuple] = {}  # (slo, model, tenant) -> (bad, good)
        self.judge = SloJudge({})
        self.ttft: Histogram | None = None  # made by the first use_slos: its thresholds are bounds
        self.tpot: Histogram | None = None

    def use_slos(self, judge: SloJudge) -> None:
        """The policy's SLOs (each new policy version, live). The TTFT and TPOT histograms get
        their buckets once, from the first policy: the defaults plus its thresholds. A threshold
        added later is judged exactly (keel_slo_events counts against it) but is no bucket bound
        of the histograms until the gateway restarts (Prometheus histograms keep their buckets)."""
        self.judge = judge
        wanted = judge.thresholds_s()
        if self.ttft is None:
            self._buckets = {
                "ttft": _bounds(_LATENCY_BUCKETS, wanted["ttft"]),
                "tpot": _bounds(_TPOT_BUCKETS, wanted["tpot"]),
            }
            self.ttft = Histogram(
                "keel_time_to_first_token_seconds",
                "Streamed requests: time from request received to "
                "the first token event sent (the buckets include the ttft SLO thresholds).",
                ["model", "variant"],
                buckets=self._buckets["ttft"],
                registry=self.registry,
            )
            self.tpot = Histogram(
                "keel_time_per_output_token_seconds",
                "Streamed requests of one choice and >= 2 completion "
                "tokens: (end - first token) / (completion tokens - 1) (the buckets include the tpot SLO "
                "thresholds).",
                ["model", "variant"],
                buckets=self._buckets["tpot"],
                registry=self.registry,
            )
            return
        for kind, bounds in self._buckets.items():
            missing = set(wanted[kind]) - set(bounds)
            if missing:
                log.warning(
                    "%s SLO thresholds %s s are no bucket bounds of its histogram until the gateway "
                    "restarts (keel_slo_events counts against them exactly)",
                    kind,
                    sorted(missing),
                )

    def observe_request(self, ctx, outcome) -> None:
        tenant = ctx.tenant or UNROUTED
        self.observe(ctx.model, ctx.received_at, outcome, tenant, ctx.variant)
        if ctx.model is not None:
            self._observe_slis(ctx, outcome, tenant)
        u = ctx.usage
        if ctx.model is not None and u:
            variant = ctx.variant or ctx.model
            self.tokens.labels(tenant, ctx.model, variant, "prompt").inc(u.get("prompt_tokens") or 0)
            self.tokens.labels(tenant, ctx.model, variant, "completion").inc(u.get("completion_tokens") or 0)
        if ctx.tenant is not None:
            for a in ctx.guardrail_actions:
                self.guardrail_actions.labels(ctx.tenant, a.guardrail, a.action, a.direction).inc(a.count)

    def observe(
        self, model: str | None, started: float, outcome, tenant: str = UNROUTED, variant: str | None = None
    ) -> None:
        label = model or UNROUTED
        self.requests.labels(tenant, label, variant or label, str(outcome.status)).inc()
        if model is not None:
            self.duration.labels(label).observe(outcome.finished_at - started)
            if outcome.first_byte_at is not None:
                self.first_byte.labels(label).observe(outcome.first_byte_at - started)

    def _observe_slis(self, ctx, outcome, tenant: str) -> None:
        t = timing_of(ctx, outcome)
        if self.ttft is None:
            self.use_slos(self.judge)
        assert self.ttft is not None and self.tpot is not None  # use_slos made them
        variant = ctx.variant or ctx.model
        if t.ttft_s is not None:
            self.ttft.labels(ctx.model, variant).observe(t.ttft_s)
        if t.tpot_s is not None:
            self.tpot.labels(ctx.model, variant).observe(t.tpot_s)
        for slo, good in self.judge.judge(ctx.model, ctx.tenant, t):
            pair = self._slo_series.get((slo, ctx.model, tenant))
            if pair is None:
                # Both series from the first event: the error ratio is 0, not absent, while all is
                # well. The children are kept: labels() costs more than the increment.
                pair = self._slo_series[(slo, ctx.model, tenant)] = (
                    self.slo_events.labels(slo, ctx.model, tenant, "false"),
                    self.slo_events.labels(slo, ctx.model, tenant, "true"),
                )
            pair[good].inc()

    async def render(self, endpoints) -> bytes:
        own = generate_latest(self.registry)
        texts = await asyncio.gather(*(_scrape(e) for e in endpoints))
        merged = CollectorRegistry()
        merged.register(_EngineFamilies([(e.replica_id, t) for e, t in zip(endpoints, texts) if t]))
        return own + generate_latest(merged)


def _bounds(defaults: tuple[float, ...], thresholds: list[float]) -> tuple[float, ...]:
    return tuple(sorted(set(defaults) | set(thresholds)))


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
        families: dict[str, Metric] = {}
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
