"""Anomaly detection settings: `anomalies:` in the policy (the gateways run the detector, live).

Every field is bounded; the detector itself is serving/ops/anomaly.py, its user guide
docs/ops/anomalies.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from serving.schema import Strict

Signal = Literal["requests", "tokens", "error_rate", "latency", "guardrail_hits"]
SIGNALS: tuple[Signal, ...] = ("requests", "tokens", "error_rate", "latency", "guardrail_hits")


class AnomalyConfig(Strict):
    """Online anomaly detection per (tenant, model): each signal, per time bucket, against its own
    recent level and its level at the same time on earlier days."""

    enabled: bool = Field(
        True, description="Run the detector in the gateways (a few microseconds per request, one tick per bucket)."
    )
    bucket_s: int = Field(
        60,
        ge=10,
        le=3600,
        description="Seconds per bucket: signals are aggregated "
        "per bucket and judged when it closes. Changing it starts every baseline over.",
    )
    signals: list[Signal] = Field(
        default_factory=lambda: list(SIGNALS),
        min_length=1,
        max_length=len(SIGNALS),
        description="Which signals to judge: requests and tokens per bucket, error_rate (5xx share), "
        "latency (p95 time to first byte), guardrail_hits per bucket.",
    )
    threshold: float = Field(
        6.0,
        ge=2.0,
        le=100.0,
        description="Robust z-score (deviations from the "
        "baseline in units of its usual spread) at or past which a bucket is anomalous.",
    )
    consecutive: int = Field(
        2,
        ge=1,
        le=60,
        description="Anomalous buckets in a row that start an anomaly; as many normal ones in a row end it.",
    )
    warmup_buckets: int = Field(
        60,
        ge=5,
        le=100_000,
        description="Buckets a series must have seen before it may alarm (its baseline learns meanwhile).",
    )
    level_halflife_buckets: int = Field(
        30,
        ge=2,
        le=10_000,
        description="Half-life of the recent level, in buckets: how fast the baseline follows traffic.",
    )
    season_slots: int = Field(
        48,
        ge=0,
        le=288,
        description="Slots of the daily profile (48: half "
        "hours); the seasonal check compares each bucket with the same time on "
        "earlier days. 0: no seasonal check.",
    )
    season_warmup_days: float = Field(
        1.0, ge=0.5, le=30, description="Days of history before the seasonal check may alarm."
    )
    adapt_after_buckets: int = Field(
        360,
        ge=10,
        le=100_000,
        description="An anomaly lasting this many buckets ends as the new normal: the baseline moves to it.",
    )
    min_requests: int = Field(
        10,
        ge=1,
        le=1_000_000,
        description="A bucket with fewer requests is not judged on error_rate or latency (too few to say).",
    )
    min_error_rate: float = Field(
        0.01,
        gt=0,
        le=0.5,
        description="The error rate assumed at least, so that a series with no errors so far does not alarm on one.",
    )
    max_series: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="(tenant, model) series tracked at most; further ones are counted as untracked, never stored.",
    )
    max_listed: int = Field(
        200, ge=1, le=10_000, description="Ended anomalies kept for GET /v1/admin/anomalies (the most recent)."
    )

    @field_validator("signals")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        return v
