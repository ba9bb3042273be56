"""SLOs as config: what counts as a good request, the objective, the window and its burn-rate alerts.

`slos:` is a policy key (the gateways count good and bad events against it, live). One entry:

    slos:
      demo-availability: {kind: availability, models: [demo], objective: 0.99, window: 28d}
      demo-ttft: {kind: ttft, threshold_ms: 2000, objective: 0.95, window: 28d, per_tenant: true}

What a good event is, per kind (serving/ops/slo_events.py judges them, docs/ops/slo.md says why):
- availability: the response was not a 5xx and not cut short (the engine failing mid-stream ends
  as a 502/504). A 499 (the client went away first) is the client's doing: not counted at all.
- ttft: streamed requests that got a first token: the time to it <= threshold_ms.
- tpot: streamed requests with one choice and >= 2 completion tokens:
  (end - first token) / (completion_tokens - 1) <= threshold_ms.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from serving.schema import Strict

_DURATION = re.compile(r"^([1-9][0-9]{0,5})(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_PATTERN = _DURATION.pattern
MIN_WINDOW_S, MAX_WINDOW_S = 3600, 365 * 86400  # the SLO window: 1h .. 365d
MIN_ALERT_WINDOW_S, MAX_ALERT_WINDOW_S = 10, 30 * 86400  # an alert's rate window: 10s .. 30d
MAX_SLOS = 64  # each is one rule group evaluated by Prometheus, and one counter per model and tenant


def duration_s(text: str) -> int:
    """Seconds in a Prometheus-style duration of one unit ("5m", "28d")."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"`{text}` is not a duration like 30s, 5m, 1h, 28d or 4w")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


class BurnRateAlert(Strict):
    """Fire when the error ratio over both windows is above factor x the error budget's rate
    (the SRE workbook's multi-window, multi-burn-rate alert)."""

    severity: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$", description="The alert's severity label (page, ticket).")
    long_window: str = Field(pattern=DURATION_PATTERN, description="The window that shows the burn is real (1h).")
    short_window: str = Field(pattern=DURATION_PATTERN, description="The window that shows it still goes on (5m).")
    factor: float = Field(gt=0, le=1000, description="Burn rate: 1 spends the budget in exactly the SLO window.")

    @model_validator(mode="after")
    def _windows(self):
        long_s, short_s = duration_s(self.long_window), duration_s(self.short_window)
        for name, s in (("long_window", long_s), ("short_window", short_s)):
            if not MIN_ALERT_WINDOW_S <= s <= MAX_ALERT_WINDOW_S:
                raise ValueError(f"{name} `{getattr(self, name)}` must be between 10s and 30d")
        if short_s >= long_s:
            raise ValueError(
                f"short_window `{self.short_window}` must be shorter than long_window `{self.long_window}`"
            )
        return self


# The SRE workbook, chapter 5 ("Alerting on SLOs"), table 5-8: 2% of a 30-day budget in 1 hour,
# 5% in 6 hours (pages); 10% in 3 days, and the whole budget at its own pace (tickets).
DEFAULT_ALERTS = (
    BurnRateAlert(severity="page", long_window="1h", short_window="5m", factor=14.4),
    BurnRateAlert(severity="page", long_window="6h", short_window="30m", factor=6),
    BurnRateAlert(severity="ticket", long_window="1d", short_window="2h", factor=3),
    BurnRateAlert(severity="ticket", long_window="3d", short_window="6h", factor=1),
)
# The rate windows every SLO records (the default alerts' windows): the names in the contract.
STANDARD_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")


class SloConfig(Strict):
    """One objective over the requests to some models (and tenants)."""

    kind: Literal["availability", "ttft", "tpot"] = Field(
        description="availability: not 5xx and not cut short; ttft: time to first token; tpot: time per output token."
    )
    models: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        max_length=64,
        description='Public model names, or ["*"] for every model.',
    )
    tenants: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Only these tenants' requests count (default: every tenant's).",
    )
    per_tenant: bool = Field(default=False, description="Rules and alerts per tenant, not only per model.")
    objective: float = Field(ge=0.5, le=0.99999, description="The share of good events to keep (0.99).")
    window: str = Field(default="28d", pattern=DURATION_PATTERN, description="The budget's window (1h .. 365d).")
    threshold_ms: float | None = Field(
        default=None, gt=0, le=600_000, description="ttft and tpot: a good event takes at most this long."
    )
    alerts: list[BurnRateAlert] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="Burn-rate alerts (default: the SRE workbook's two pages and two tickets).",
    )
    description: str = Field(default="", max_length=200, description="Shown in the alerts' annotations.")

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind == "availability" and self.threshold_ms is not None:
            raise ValueError("threshold_ms: availability has no threshold (it is for ttft and tpot)")
        if self.kind != "availability" and self.threshold_ms is None:
            raise ValueError(f"threshold_ms: required for kind {self.kind}")
        if "*" in self.models and len(self.models) > 1:
            raise ValueError('models: "*" already means every model; list names or "*" alone')
        w = duration_s(self.window)
        if not MIN_WINDOW_S <= w <= MAX_WINDOW_S:
            raise ValueError(f"window `{self.window}` must be between 1h and 365d")
        budget = 1 - self.objective
        for i, a in enumerate(self.burn_alerts):
            where = f"alerts.{i}" if self.alerts is not None else f"the default alert {a.long_window}/{a.short_window}"
            if a.factor * budget >= 1:
                raise ValueError(
                    f"{where}: factor {a.factor:g} x error budget {budget:g} >= 1: an error "
                    "ratio can never pass it, so the alert could never fire (set `alerts:` "
                    "for this objective)"
                )
            if duration_s(a.long_window) > w:
                raise ValueError(
                    f"{where}: long_window `{a.long_window}` is longer than the SLO window `{self.window}`"
                )
        return self

    @property
    def burn_alerts(self) -> tuple[BurnRateAlert, ...]:
        return tuple(self.alerts) if self.alerts is not None else DEFAULT_ALERTS

    @property
    def threshold_s(self) -> float | None:
        return None if self.threshold_ms is None else self.threshold_ms / 1000

    def rate_windows(self) -> list[str]:
        """Every window a rate is recorded over: the standard ones up to the SLO's window, the
        alerts', the SLO's own."""
        w = duration_s(self.window)
        found = {s for s in STANDARD_WINDOWS if duration_s(s) <= w}
        found |= {x for a in self.burn_alerts for x in (a.long_window, a.short_window)}
        found.add(self.window)
        return sorted(found, key=duration_s)


def check_slos(slos: dict[str, SloConfig], public: set[str], tenants: set[str]) -> list[str]:
    """Cross-references and names (a name becomes a label value and a rule group's name)."""
    problems = []
    if len(slos) > MAX_SLOS:
        problems.append(f"slos: {len(slos)} objectives; at most {MAX_SLOS}")
    for name, slo in slos.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
            problems.append(f"slos.{name}: a name is letters, digits, _ . - (at most 63)")
        for m in slo.models:
            if m != "*" and m not in public:
                problems.append(
                    f"slos.{name}.models: no model or experiment `{m}`; available: {', '.join(sorted(public))}"
                )
        for t in slo.tenants or ():
            if t not in tenants:
                problems.append(
                    f"slos.{name}.tenants: no tenant `{t}`; defined: {', '.join(sorted(tenants)) or 'none'}"
                )
    return problems
