"""The limits of a scope and the arithmetic every backend shares: GCRA verdicts, settling,
x-ratelimit-* headers.

Rate limits: GCRA, cost-weighted
---------------------------------
A limit of L units per period P has emission interval T = P/L and burst capacity
B = max(1, floor(burst_fraction * L)) units. Each bucket keeps one number, the theoretical
arrival time TAT. A request costing n units (1 for requests_per_minute, its tokens for the
token limits) at time t is admitted iff max(TAT, t) + n*T - t <= B*T; admitting it sets
TAT = max(TAT, t) + n*T. Times are integer microseconds and every n*T is rounded up, so the
rounding can only make the limiter stricter.

Guarantee: in any window of length w, the units admitted minus those refunded (by `settle`)
inside it is <= B + L*w/P. (TAT is >= the window's start when it opens, only grows by the net
charge, and is <= t + B*T right after any admission at t.) With no refunds (request counts, or
settles at or above the reservation) that is simply: admitted <= B + L*w/P. A request costing
more than B can never be admitted (`Admission.never_fits`). Like every GCRA, a "per day" limit
is a rolling one: after a full day's tokens, capacity returns at L/86400 tokens per second.

A rejection carries the exact retry time: the earliest time at which that same request would be
admitted if nothing else happened (the largest over every limit that rejects it).

Settling: a bucket is refunded `reserved - actual` (TAT moves back, but never below now: a bucket
is never fuller than full) or charged `actual - reserved` (TAT moves forward, possibly past
t + B*T: the bucket is in debt and later requests wait). requests_per_minute is not refunded on
a release: the request did reach the gateway, and refunding it would let a client that hangs up
at once escape the request limit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from pydantic import Field

from serving.schema import Strict as _Strict

REQUESTS_PER_MINUTE = "requests_per_minute"
TOKENS_PER_MINUTE = "tokens_per_minute"
TOKENS_PER_DAY = "tokens_per_day"
CONCURRENT_REQUESTS = "concurrent_requests"
PERIOD_US = {REQUESTS_PER_MINUTE: 60_000_000, TOKENS_PER_MINUTE: 60_000_000, TOKENS_PER_DAY: 86_400_000_000}
TOKEN_LIMITS = (TOKENS_PER_MINUTE, TOKENS_PER_DAY)
CONCURRENCY_RETRY_S = 1.0  # a slot frees when some request ends; we cannot know when
US = 1_000_000


class QuotaLimits(_Strict):
    """The limits of one tenant or one key; a limit left out (null) does not apply."""

    requests_per_minute: int | None = Field(None, gt=0, description="Requests admitted per minute.")
    tokens_per_minute: int | None = Field(
        None,
        gt=0,
        description="Prompt + completion tokens per minute (each prompt + n × max_tokens "
        "is reserved at admission, the unused part is given back when the request ends).",
    )
    tokens_per_day: int | None = Field(None, gt=0, description="Prompt + completion tokens per day (rolling).")
    concurrent_requests: int | None = Field(None, gt=0, description="Requests in flight at once.")
    burst_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="How much of one period's limit may be used at once, as a "
        "fraction: 1 lets a full minute's requests/tokens arrive together, 0.1 at most a tenth, "
        "the rest spread over the period. Applies to the three rate limits.",
    )

    def is_empty(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.tokens_per_day is None
            and self.concurrent_requests is None
        )


@dataclass(frozen=True)
class Scope:
    name: str  # "tenant" or "key"
    id: str  # "acme" or "acme/key-1": unique; a tenant's scopes share the text before the first "/"
    limits: QuotaLimits


@dataclass
class Reservation:
    id: str
    scopes: tuple[Scope, ...]
    tokens: int
    at: float  # seconds since the epoch, on the backend's clock
    settled: bool = False  # settle is a no-op the second time


@dataclass
class Admission:
    allowed: bool
    reservation: Reservation | None
    limit: str | None = None  # the rejecting limit, e.g. "tokens_per_minute"
    scope: Scope | None = None
    retry_after_s: float = 0.0
    never_fits: bool = False  # the request's own cost exceeds the limit's burst: lower max_tokens
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*, on allow and on reject


@dataclass(slots=True)
class Limit:
    """One limit of one scope."""

    scope: Scope
    name: str
    limit: int
    capacity: int  # B, in units; for concurrency the limit itself
    period_us: int = 0  # 0 for concurrency
    tolerance_us: int = 0  # B*T, rounded up like every span

    @property
    def is_rate(self) -> bool:
        return self.period_us > 0

    def cost(self, tokens: int) -> int:
        return 1 if self.name == REQUESTS_PER_MINUTE else tokens

    def span_us(self, units: int) -> int:
        """How far `units` move the TAT: units * T, rounded up to a microsecond."""
        return math.ceil(units * self.period_us / self.limit)

    def remaining(self, tat: int, now: int) -> int:
        """Units that could be admitted now: the largest n with span(n) <= the free time."""
        free = self.tolerance_us - (tat - now)
        if free <= 0:
            return 0
        n = min(self.capacity, int(free * self.limit / self.period_us))
        while n < self.capacity and self.span_us(n + 1) <= free:  # float division may round down by one
            n += 1
        while n > 0 and self.span_us(n) > free:
            n -= 1
        return n


_LimitSpec = tuple[str, int, int, int, int]  # Limit's fields but the scope
_specs_cache: dict[tuple, tuple[_LimitSpec, ...]] = {}


def _limit_specs(lim: QuotaLimits) -> tuple[_LimitSpec, ...]:
    """The limits one QuotaLimits defines; memoized by value (the arithmetic runs once per set of limits)."""
    key = (
        lim.requests_per_minute,
        lim.tokens_per_minute,
        lim.tokens_per_day,
        lim.concurrent_requests,
        lim.burst_fraction,
    )
    specs = _specs_cache.get(key)
    if specs is None:
        out = []
        for name, period in PERIOD_US.items():
            value = getattr(lim, name)
            if value is not None:
                capacity = max(1, math.floor(lim.burst_fraction * value + 1e-9))
                out.append((name, value, capacity, period, math.ceil(capacity * period / value)))
        if lim.concurrent_requests is not None:
            out.append((CONCURRENT_REQUESTS, lim.concurrent_requests, lim.concurrent_requests, 0, 0))
        if len(_specs_cache) >= 4096:
            _specs_cache.clear()
        specs = _specs_cache[key] = tuple(out)
    return specs


def limits_of(scopes: list[Scope] | tuple[Scope, ...]) -> list[Limit]:
    return [Limit(scope, *spec) for scope in scopes for spec in _limit_specs(scope.limits)]


def limited_scopes(scopes) -> list[Scope]:
    """The scopes with at least one limit: each keeps a ledger of its open reservations."""
    return [s for s in scopes if not s.limits.is_empty()]


def verdict(limits: list[Limit], tokens: int, now: int, states: list[int]) -> tuple[int, int, bool]:
    """(index of the rejecting limit or -1, retry in µs, never_fits) for the state before admission.

    states[i] is the TAT (clamped to >= now) of a rate limit, or the open count of a concurrency
    limit. A cost above the burst wins (retrying cannot help); otherwise the latest retry wins.
    """
    worst, worst_retry = -1, 0
    for i, (lim, state) in enumerate(zip(limits, states)):
        if lim.is_rate:
            if lim.cost(tokens) > lim.capacity:
                return i, 0, True
            retry = state + lim.span_us(lim.cost(tokens)) - lim.tolerance_us - now
        else:
            retry = int(CONCURRENCY_RETRY_S * US) if state >= lim.limit else 0
        if retry > worst_retry:
            worst, worst_retry = i, retry
    return worst, worst_retry, False


def settle_delta_us(lim: Limit, reserved: int, actual: int) -> int:
    """How far settling moves a token bucket's TAT: back for a refund, forward for extra usage."""
    return lim.span_us(actual) - lim.span_us(reserved)


def settled_tat(tat: int, now: int, delta: int) -> int:
    if delta >= 0:
        return max(tat, now) + delta  # may pass now + B*T: debt, later requests wait
    return max(tat + delta, now)  # never fuller than full


def format_duration(us: int) -> str:
    """OpenAI's (Go's) duration format, to the millisecond, rounded up: 250ms, 1s, 1.5s, 6m0s, 1h0m0s."""
    ms = math.ceil(us / 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    text = f"{seconds}" + (f".{millis:03d}".rstrip("0") if millis else "") + "s"
    if hours or minutes:
        text = f"{minutes}m" + text
    if hours:
        text = f"{hours}h" + text
    return text


def _headers(limits: list[Limit], states: list[int], now: int) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens}; of several scopes, the least remaining."""
    by_name: dict[str, list[tuple[int, int, Limit]]] = {}
    for lim, tat in zip(limits, states):
        if lim.is_rate:
            by_name.setdefault(lim.name, []).append((lim.remaining(tat, now), -(tat - now), lim))
    headers = {}
    for suffix, names in (("requests", (REQUESTS_PER_MINUTE,)), ("tokens", (TOKENS_PER_MINUTE, TOKENS_PER_DAY))):
        candidates = next((by_name[n] for n in names if n in by_name), None)
        if not candidates:
            continue
        remaining, minus_reset, lim = min(candidates, key=lambda c: (c[0], c[1]))
        headers[f"x-ratelimit-limit-{suffix}"] = str(lim.limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(remaining)
        headers[f"x-ratelimit-reset-{suffix}"] = format_duration(-minus_reset)
    return headers


def admission(
    limits: list[Limit],
    scopes: list[Scope],
    tokens: int,
    reservation_id: str,
    now: int,
    states: list[int],
    worst: int,
    retry_us: int,
    never_fits: bool,
) -> Admission:
    headers = _headers(limits, states, now)
    if worst < 0:
        return Admission(True, Reservation(reservation_id, tuple(scopes), tokens, now / US), headers=headers)
    if not never_fits:
        headers["retry-after"] = str(max(1, math.ceil(retry_us / US)))
        headers["retry-after-ms"] = str(math.ceil(retry_us / 1000))
    return Admission(
        False,
        None,
        limit=limits[worst].name,
        scope=limits[worst].scope,
        retry_after_s=retry_us / US,
        never_fits=never_fits,
        headers=headers,
    )


def check_tokens(tokens: int) -> None:
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"token counts are integers >= 0, got {tokens!r}")


def new_reservation_id(request_id: str) -> str:
    return f"{request_id}:{os.urandom(4).hex()}"  # unique even if a client reuses a request id
