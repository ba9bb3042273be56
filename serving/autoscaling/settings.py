"""What ops write under `models.NAME.deployment.autoscaling`: the policy's settings.

Plain pydantic, read by the policy (serving.autoscaling.policy), the Ray adapter and the
simulator alike, so a setting means the same thing in `keel autoscale simulate` as in the stack.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from serving.schema import Strict

Signal = Literal["requests_in_flight", "waiting_requests", "kv_cache_usage", "tokens_in_flight"]
SIGNALS: tuple[str, ...] = get_args(Signal)

# A target per replica that fits the demo model on CPU and a mid-size model on one GPU alike is
# not knowable; these are the defaults for a replica of vLLM's default max_num_seqs (256).
DEFAULT_TARGETS: dict[str, float] = {
    "requests_in_flight": 16.0,
    "waiting_requests": 4.0,
    "kv_cache_usage": 0.7,
    "tokens_in_flight": 16384.0,
}

DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

# Keys of Ray Serve's autoscaling_config that this block replaced, and what to write instead.
RENAMED = {
    "target_ongoing_requests": "target (with signal: requests_in_flight)",
    "upscale_delay_s": "stable_window_s and panic_window_s",
    "downscale_delay_s": "scale_down_cooldown_s",
    "look_back_period_s": "stable_window_s",
    "upscaling_factor": "max_scale_up_ratio",
}


class Schedule(Strict):
    """A higher floor for a known peak: at least `min_replicas` from `start` to `end` (local time
    in `timezone`) on `days`. An `end` before `start` runs past midnight."""

    start: str = Field(description="HH:MM, 24-hour clock.")
    end: str = Field(description="HH:MM; before start: the window runs past midnight.")
    min_replicas: int = Field(ge=0, le=10_000)
    days: list[Day] = Field(default_factory=lambda: list(DAYS), max_length=7)
    timezone: str = Field("UTC", description="IANA name, e.g. Europe/Paris.")

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, v: str) -> str:
        try:
            dt.time.fromisoformat(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a time of day as HH:MM") from None
        if len(v) != 5:
            raise ValueError(f"{v!r} is not a time of day as HH:MM")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. UTC, Europe/Paris)") from None
        return v


class AutoscalingConfig(Strict):
    """Replicas follow demand on one engine signal (Knative's KPA rule: a stable window for the
    level, a short panic window for bursts, no scale-down while panicking)."""

    min_replicas: int = Field(
        1,
        ge=0,
        le=10_000,
        description="0: scale to zero when idle; the gateway "
        "holds the requests that arrive meanwhile while a replica starts.",
    )
    max_replicas: int = Field(1, ge=1, le=10_000)
    initial_replicas: int | None = Field(None, ge=0, le=10_000)
    signal: Signal = Field(
        "requests_in_flight",
        description="What a replica's load is measured in: "
        "requests_in_flight (running + waiting), waiting_requests (queued in the "
        "engine), kv_cache_usage (0..1) or tokens_in_flight (tokens held in KV cache).",
    )
    target: float | None = Field(
        None,
        gt=0,
        description="The signal's value per replica to aim for; "
        "default per signal: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TARGETS.items()),
    )
    stable_window_s: float = Field(60.0, ge=1, le=3600, description="Demand is averaged over this window.")
    panic_window_s: float = Field(6.0, gt=0, le=3600, description="The short window that detects bursts.")
    panic_threshold: float = Field(
        2.0,
        ge=1,
        le=100,
        description="Panic when the panic window's demand "
        "is at least this many times what the current replicas serve at target.",
    )
    tolerance: float = Field(
        0.1, ge=0, lt=1, description="No change while demand is within this fraction of the current replicas' capacity."
    )
    max_scale_up_ratio: float = Field(
        2.0, ge=1, le=100, description="One decision multiplies replicas by at most this (from zero: to 1)."
    )
    scale_down_cooldown_s: float = Field(
        300.0, ge=0, le=86_400, description="No scale-down sooner than this after any scale change or panic."
    )
    metrics_interval_s: float = Field(1.0, gt=0, le=60, description="How often each replica reports.")
    schedules: list[Schedule] = Field(default_factory=list, max_length=64)
    hold_timeout_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="min_replicas 0: how long the "
        "gateway holds a request while a replica starts (default 300); past "
        "it the client gets 503 with retry-after.",
    )
    hold_max_requests: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="min_replicas 0: requests held at most per gateway (default 64); beyond, 503 at once.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict):
            for old, new in RENAMED.items():
                if old in data:
                    raise ValueError(f"{old} is not a Keel autoscaling key; write {new}")
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        if self.panic_window_s > self.stable_window_s:
            raise ValueError(
                f"panic_window_s ({self.panic_window_s:g}) must be <= stable_window_s ({self.stable_window_s:g})"
            )
        if self.signal == "kv_cache_usage" and self.target is not None and self.target > 1:
            raise ValueError(f"target ({self.target:g}) for kv_cache_usage is a fraction of the cache: 0 < target <= 1")
        for i, s in enumerate(self.schedules):
            if s.min_replicas > self.max_replicas:
                raise ValueError(
                    f"schedules[{i}].min_replicas ({s.min_replicas}) must be <= max_replicas ({self.max_replicas})"
                )
        if self.min_replicas > 0:
            for key in ("hold_timeout_s", "hold_max_requests"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{key} applies only with min_replicas: 0 (a model that never scales to "
                        "zero has no requests to hold)"
                    )
        return self

    @property
    def target_value(self) -> float:
        return self.target if self.target is not None else DEFAULT_TARGETS[self.signal]

    @property
    def hold_timeout(self) -> float:
        return self.hold_timeout_s if self.hold_timeout_s is not None else 300.0

    @property
    def hold_max(self) -> int:
        return self.hold_max_requests if self.hold_max_requests is not None else 64
