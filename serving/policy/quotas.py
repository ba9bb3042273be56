"""Per-tenant and per-key quotas: requests/minute, tokens/minute, tokens/day, concurrent requests.

The gateway calls `reserve` at admission with the request's worst-case token cost (each prompt
plus n times its max_tokens, serving.gateway.policy.reservation) and `settle` exactly once when
the request ends: with the engine's real usage, or without one with what the gateway charges
(serving.gateway.policy.charged_tokens: 0 for a request no engine saw, a release).

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

Concurrency: the open reservations of a scope, each with a lease (`lease_s`, default 15 min)
after which it no longer counts, so a gateway that crashed cannot hold a slot forever. The
gateway that made a reservation renews its lease every lease_s/3 while the request runs
(`_Renewals`), so a request longer than the lease keeps its slot and its refund; only a gateway
that stopped renewing (it died, or could not reach Redis for a whole lease) loses them. A lease
that did run out leaves its request charged as reserved: settling applies only to an open
reservation, which is also what makes settling idempotent (a retried settle, or a release of
what was never reserved, changes nothing). Rejected for concurrency, a request is told to
retry after 1 s.

All limits of all scopes of a request are checked and applied atomically, all or nothing: a
request rejected by one limit consumes nothing from any other.

Backends: `MemoryQuotaBackend` (one gateway process) and `RedisQuotaBackend` (shared by all
gateway replicas: one Lua script per operation, on Redis's own clock). A Redis failure raises
`QuotaBackendError`; the gateway decides, by `on_backend_error`, to admit or to refuse.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

from pydantic import Field, field_validator

from serving.schema import Strict as _Strict

log = logging.getLogger(__name__)

REQUESTS_PER_MINUTE = "requests_per_minute"
TOKENS_PER_MINUTE = "tokens_per_minute"
TOKENS_PER_DAY = "tokens_per_day"
CONCURRENT_REQUESTS = "concurrent_requests"
_PERIOD_US = {REQUESTS_PER_MINUTE: 60_000_000, TOKENS_PER_MINUTE: 60_000_000, TOKENS_PER_DAY: 86_400_000_000}
_TOKEN_LIMITS = (TOKENS_PER_MINUTE, TOKENS_PER_DAY)
CONCURRENCY_RETRY_S = 1.0  # a slot frees when some request ends; we cannot know when
_US = 1_000_000


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


class QuotaBackendConfig(_Strict):
    backend: Literal["memory", "redis"] = Field(
        "memory",
        description="memory: counters in each gateway process (one gateway). redis: shared by every gateway replica.",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis://, rediss:// or unix:// URL.")
    on_backend_error: Literal["fail_closed", "fail_open"] = Field(
        "fail_closed",
        description="When Redis cannot be reached: fail_closed answers 503, "
        "fail_open admits the request without a quota check.",
    )
    timeout_s: float = Field(0.25, gt=0, description="Socket timeout for each Redis call.")
    lease_s: float = Field(
        900,
        gt=0,
        description="How long a request's concurrency slot lasts without renewal. The "
        "gateway renews it every lease_s/3 while the request runs; one that dies stops renewing, "
        "so its slots free at most this long later.",
    )
    key_prefix: str = Field("keel", min_length=1, description="Prefix of every Redis key Keel writes.")

    @field_validator("redis_url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = urlparse(v).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got `{v}`")
        return v

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if "{" in v or "}" in v:
            raise ValueError(
                "must not contain `{` or `}` (Keel puts the tenant in braces, as the Redis Cluster hash tag)"
            )
        return v


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


class QuotaBackendError(Exception):
    """The quota store could not answer (Redis down, timed out); the gateway picks fail-open/closed."""


class QuotaBackend(Protocol):
    async def reserve(self, scopes: list[Scope], tokens: int, request_id: str) -> Admission: ...

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None: ...

    async def renew(self, reservations: list[Reservation]) -> None: ...

    async def close(self) -> None: ...


# --- the arithmetic both backends share -------------------------------------------------------


@dataclass(slots=True)
class _Limit:
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


_LimitSpec = tuple[str, int, int, int, int]  # _Limit's fields but the scope
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
        for name, period in _PERIOD_US.items():
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


def _limits_of(scopes: list[Scope] | tuple[Scope, ...]) -> list[_Limit]:
    return [_Limit(scope, *spec) for scope in scopes for spec in _limit_specs(scope.limits)]


def _limited(scopes) -> list[Scope]:
    """The scopes with at least one limit: each keeps a ledger of its open reservations."""
    return [s for s in scopes if not s.limits.is_empty()]


def _verdict(limits: list[_Limit], tokens: int, now: int, states: list[int]) -> tuple[int, int, bool]:
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
            retry = int(CONCURRENCY_RETRY_S * _US) if state >= lim.limit else 0
        if retry > worst_retry:
            worst, worst_retry = i, retry
    return worst, worst_retry, False


def _settle_delta_us(lim: _Limit, reserved: int, actual: int) -> int:
    """How far settling moves a token bucket's TAT: back for a refund, forward for extra usage."""
    return lim.span_us(actual) - lim.span_us(reserved)


def _settled_tat(tat: int, now: int, delta: int) -> int:
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


def _headers(limits: list[_Limit], states: list[int], now: int) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens}; of several scopes, the least remaining."""
    by_name: dict[str, list[tuple[int, int, _Limit]]] = {}
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


def _admission(
    limits: list[_Limit],
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
        return Admission(True, Reservation(reservation_id, tuple(scopes), tokens, now / _US), headers=headers)
    if not never_fits:
        headers["retry-after"] = str(max(1, math.ceil(retry_us / _US)))
        headers["retry-after-ms"] = str(math.ceil(retry_us / 1000))
    return Admission(
        False,
        None,
        limit=limits[worst].name,
        scope=limits[worst].scope,
        retry_after_s=retry_us / _US,
        never_fits=never_fits,
        headers=headers,
    )


def _check_tokens(tokens: int) -> None:
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"token counts are integers >= 0, got {tokens!r}")


def _reservation_id(request_id: str) -> str:
    return f"{request_id}:{os.urandom(4).hex()}"  # unique even if a client reuses a request id


_RENEW_RETRY_S = 1.0


class _Renewals:
    """The reservations this gateway process holds open, with their leases renewed every
    lease/3 (through the backend's `renew`) until they are settled. One asyncio task, running
    only while something is open."""

    def __init__(self, lease_us: int, renew):
        self._open: dict[str, Reservation] = {}
        self._renew = renew  # async (list[Reservation]) -> None
        self.interval_s = lease_us / _US / 3
        self._task: asyncio.Task | None = None

    def opened(self, reservation: Reservation) -> None:
        self._open[reservation.id] = reservation
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def closed(self, reservation: Reservation) -> None:
        self._open.pop(reservation.id, None)

    async def _run(self) -> None:
        failing = False
        try:
            while self._open:
                # After a failure, retry within a second: a lease must not run out for a blip.
                await asyncio.sleep(min(self.interval_s, _RENEW_RETRY_S) if failing else self.interval_s)
                if not self._open:
                    break
                try:
                    await self._renew(list(self._open.values()))
                    if failing:
                        log.warning("quota leases are renewed again")
                    failing = False
                except QuotaBackendError as e:
                    if not failing:  # once per outage; the next tick retries
                        log.warning(
                            "could not renew %d quota leases (%s); they run out unless a later renewal succeeds",
                            len(self._open),
                            e,
                        )
                    failing = True
        finally:
            self._task = None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


# --- in-memory backend ----------------------------------------------------------------------


class MemoryQuotaBackend:
    """Counters in this process: right for a single gateway process. Not thread-safe: use it from
    one event loop (each call runs to completion without awaiting, so it is atomic there)."""

    def __init__(self, clock=time.time, lease_s: float = 900.0):
        self._clock = clock
        self._lease_us = round(lease_s * _US)
        self._tats: dict[tuple[str, str, str], int] = {}  # (scope name, scope id, limit) -> TAT µs
        self._open: dict[tuple[str, str], dict[str, int]] = {}  # scope -> {reservation id: lease end µs}
        self._renewals = _Renewals(self._lease_us, self.renew)

    def _now(self) -> int:
        return round(self._clock() * _US)

    def _ledger(self, scope: Scope, now: int) -> dict[str, int]:
        """The scope's open reservations whose lease has not run out."""
        leases = self._open.setdefault((scope.name, scope.id), {})
        for rid in [rid for rid, until in leases.items() if until <= now]:
            del leases[rid]
        return leases

    async def reserve(self, scopes: list[Scope], tokens: int, request_id: str) -> Admission:
        _check_tokens(tokens)
        limits, now, rid = _limits_of(scopes), self._now(), _reservation_id(request_id)
        states = []
        for lim in limits:
            if lim.is_rate:
                states.append(max(self._tats.get((lim.scope.name, lim.scope.id, lim.name), now), now))
            else:
                states.append(len(self._ledger(lim.scope, now)))
        worst, retry_us, never_fits = _verdict(limits, tokens, now, states)
        limited = _limited(scopes)
        if worst < 0:
            for scope in limited:
                self._ledger(scope, now)[rid] = now + self._lease_us
            for i, lim in enumerate(limits):
                if lim.is_rate:
                    states[i] += lim.span_us(lim.cost(tokens))
                    self._tats[(lim.scope.name, lim.scope.id, lim.name)] = states[i]
                else:
                    states[i] += 1
        adm = _admission(limits, scopes, tokens, rid, now, states, worst, retry_us, never_fits)
        if adm.allowed and limited:
            assert adm.reservation is not None  # an admission holds its reservation
            self._renewals.opened(adm.reservation)
        return adm

    async def renew(self, reservations: list[Reservation]) -> None:
        """Extends the lease of each reservation that is still open to now + lease."""
        now = self._now()
        for r in reservations:
            for scope in _limited(r.scopes):
                leases = self._open.get((scope.name, scope.id))
                if leases is not None and r.id in leases:
                    leases[r.id] = now + self._lease_us

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self.settle_now(reservation, actual_tokens)

    def settle_now(self, reservation: Reservation, actual_tokens: int) -> None:
        """settle, without a coroutine: nothing here waits, so the gateway calls it inline."""
        _check_tokens(actual_tokens)
        if reservation.settled:
            return
        reservation.settled = True
        self._renewals.closed(reservation)
        now = self._now()
        was_open = False
        for scope in _limited(reservation.scopes):
            was_open |= self._ledger(scope, now).pop(reservation.id, None) is not None
        if not was_open:
            return  # its lease ran out: it stays charged as reserved (see _SETTLE_LUA)
        for lim in _limits_of(reservation.scopes):
            if lim.name in _TOKEN_LIMITS:
                key = (lim.scope.name, lim.scope.id, lim.name)
                delta = _settle_delta_us(lim, reservation.tokens, actual_tokens)
                self._tats[key] = _settled_tat(self._tats.get(key, now), now, delta)

    async def close(self) -> None:
        self._renewals.close()


# --- Redis backend --------------------------------------------------------------------------
#
# Per scope with limits, a sorted set `...:open` of its open reservation ids scored by lease
# end: concurrency counts it, and settle applies only to a reservation still in it, so settling
# twice (a retry), or releasing one that was never made, changes nothing. When a reserve call
# fails or its caller goes away, Redis may still run (or have run) the script: the gateway then
# abandons the reservation id, which releases it if it was made, and otherwise leaves a
# tombstone (`...:gone:<id>`) that makes the late script a no-op.

# KEYS: tombstone, one open-set per scope (S), one key per rate limit.
# ARGV: reservation id, lease µs, S, then the concurrency limit per scope (0: none),
#       then per rate limit this request's span and the tolerance, in µs.
# Returns {1 admitted | 0 rejected | 2 abandoned, now µs, open count per scope, TAT per rate limit};
# the counts and TATs are after the admission, or as they were on a rejection.
_RESERVE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rid, lease, S = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out, ok = {0, now}, true
for i = 1, S do
  redis.call('ZREMRANGEBYSCORE', KEYS[1 + i], '-inf', now)
  local open = redis.call('ZCARD', KEYS[1 + i])
  local limit = tonumber(ARGV[3 + i])
  if limit > 0 and open >= limit then ok = false end
  out[2 + i] = open
end
for j = 1, #KEYS - 1 - S do
  local span, tolerance = tonumber(ARGV[2 + S + 2 * j]), tonumber(ARGV[3 + S + 2 * j])
  local tat = tonumber(redis.call('GET', KEYS[1 + S + j]) or now)
  if tat < now then tat = now end
  if tat + span - now > tolerance then ok = false end
  out[2 + S + j] = tat
end
if not ok then return out end
out[1] = 1
for i = 1, S do
  redis.call('ZADD', KEYS[1 + i], now + lease, rid)
  redis.call('PEXPIRE', KEYS[1 + i], math.ceil(lease / 1000) + 1)
  out[2 + i] = out[2 + i] + 1
end
for j = 1, #KEYS - 1 - S do
  local new = out[2 + S + j] + tonumber(ARGV[2 + S + 2 * j])
  if new > now then
    redis.call('SET', KEYS[1 + S + j], string.format('%d', new), 'PX', math.ceil((new - now) / 1000))
  end
  out[2 + S + j] = new
end
return out
"""

# KEYS: tombstone, one open-set per scope (S), one key per token limit.
# ARGV: reservation id, S, 1 to abandon (leave a tombstone if the reservation is not open) or 0,
#       tombstone ms, then per token limit the TAT delta in µs (< 0 refunds, > 0 charges).
# Only an open reservation is settled: a retried settle, or the release of a reservation that
# was never made or whose lease ran out, changes nothing. Returns 1 if the reservation was open.
_SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rid, S = ARGV[1], tonumber(ARGV[2])
local was_open = 0
for i = 1, S do
  if redis.call('ZREM', KEYS[1 + i], rid) == 1 then was_open = 1 end
end
if was_open == 0 and ARGV[3] == '1' then
  redis.call('SET', KEYS[1], '1', 'PX', tonumber(ARGV[4]))
end
for j = 1, #KEYS - 1 - S do
  local d = tonumber(ARGV[4 + j])
  if was_open == 1 then
    local key = KEYS[1 + S + j]
    local tat = tonumber(redis.call('GET', key) or now)
    local new
    if d >= 0 then new = math.max(tat, now) + d else new = math.max(tat + d, now) end
    if new > now then
      redis.call('SET', key, string.format('%d', new), 'PX', math.ceil((new - now) / 1000))
    else
      redis.call('DEL', key)
    end
  end
end
return was_open
"""

# KEYS: one scope's open-set. ARGV: lease µs, then reservation ids.
# Moves the lease end of each id still in the set to now + lease (ZADD XX adds none back).
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
local args = {}
for i = 2, #ARGV do
  args[#args + 1] = now + lease
  args[#args + 1] = ARGV[i]
end
redis.call('ZADD', KEYS[1], 'XX', unpack(args))
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) + 1)
end
return 0
"""

_SHORT = {REQUESTS_PER_MINUTE: "rpm", TOKENS_PER_MINUTE: "tpm", TOKENS_PER_DAY: "tpd"}
_POOL_SIZE = 64
_TOMBSTONE_MS = 600_000  # far longer than any command waits in Redis's input buffer
_ABANDON_RETRY_DELAYS_S = (0.0, 0.5, 2.0)  # then the lease and the buckets' drain bound the damage


def _tenant_tag(scope: Scope) -> str:
    return "{" + scope.id.split("/", 1)[0] + "}"


def redis_key(prefix: str, scope: Scope, what: str) -> str:
    """`keel:{acme}:key:acme/key-1:tpm`; the tenant in braces keeps a tenant in one cluster slot.

    `what` is a limit name, or "open" for the scope's open reservations.
    """
    return f"{prefix}:{_tenant_tag(scope)}:{scope.name}:{scope.id}:{_SHORT.get(what, what)}"


# Commands are written in the Redis protocol (RESP) here, not through redis-py's command layer:
# its per-command machinery (argument encoding, connection pool, retry and observability hooks,
# a Task per write for the socket timeout) cost several times what the call itself does.


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _bulk_int(value: int) -> bytes:
    digits = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(digits), digits)


class _Script:
    """A Lua script as the head of an EVALSHA command, and of an EVAL one for when Redis lacks it."""

    def __init__(self, lua: str):
        body = lua.encode()
        self.evalsha = _bulk(b"EVALSHA") + _bulk(hashlib.sha1(body).hexdigest().encode())
        self.eval = _bulk(b"EVAL") + _bulk(body)  # EVAL also caches the script: EVALSHA works after


_RESERVE = _Script(_RESERVE_LUA)
_SETTLE = _Script(_SETTLE_LUA)
_RENEW = _Script(_RENEW_LUA)


class RedisQuotaBackend:
    """Counters in Redis, shared by every gateway replica; Redis's clock is the one clock.

    Each key expires once its state equals "empty" (a TAT in the past, no open reservation), so
    idle tenants leave nothing behind.

    Connections are redis-py's (URL, TLS, AUTH, database, handshake, socket timeouts, parser), at
    most _POOL_SIZE, each running one command at a time; the backend keeps the idle ones itself.
    """

    def __init__(self, cfg: QuotaBackendConfig):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._cfg = cfg
        self._lease_us = round(cfg.lease_s * _US)
        # No retries: a quota check must answer within about timeout_s or let the gateway decide.
        # The pool is only a factory of configured connections: nothing is taken from it.
        self._factory = aioredis.ConnectionPool.from_url(
            cfg.redis_url,
            socket_timeout=cfg.timeout_s,
            socket_connect_timeout=cfg.timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._connections: list = []  # every connection made, for close()
        self._idle: list = []  # last in, first out: a few stay busy, the rest idle
        self._slots = asyncio.Semaphore(_POOL_SIZE)
        # Waiting for a connection is bounded too, but longer: under a burst, it is normal.
        self._slot_wait_s = max(1.0, 4 * cfg.timeout_s)
        self._keys: dict[tuple[str, str], tuple[str, bytes, dict[str, bytes]]] = {}
        self._background: set[asyncio.Task] = set()  # settles and abandons nobody waits for
        self._closing = asyncio.Event()
        self._renewals = _Renewals(self._lease_us, self.renew)

    # --- the Redis call ---

    async def _call(self, script: _Script, keys: list[bytes], args: list[bytes]) -> Any:  # the script's reply
        """EVALSHA `script` with `keys` and `args` (each already a RESP bulk string)."""
        import redis.exceptions

        try:
            body = b"".join([_bulk_int(len(keys)), *keys, *args])
            head = b"*%d\r\n" % (3 + len(keys) + len(args))
            conn = await self._acquire()
            try:
                try:
                    return await self._roundtrip(conn, head + script.evalsha + body)
                except redis.exceptions.NoScriptError:  # a restarted or flushed Redis
                    return await self._roundtrip(conn, head + script.eval + body)
            except redis.exceptions.ResponseError:
                raise  # an answer: the connection is in step
            except BaseException:
                try:
                    await conn.disconnect(nowait=True)  # it may get a late reply: never reuse it as is
                except Exception:  # noqa: BLE001 - the error being raised is the one to report
                    pass
                raise
            finally:
                self._idle.append(conn)
                self._slots.release()
        except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as e:
            raise QuotaBackendError(f"quota store {self._cfg.redis_url}: {type(e).__name__}: {e}") from e

    async def _acquire(self):
        import redis.exceptions

        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self._slot_wait_s)
            except asyncio.TimeoutError:
                raise redis.exceptions.ConnectionError("No connection available.") from None
        else:
            await self._slots.acquire()  # returns at once
        if self._idle:
            return self._idle.pop()
        try:
            conn = self._factory.make_connection()  # not connected yet: no I/O here
        except BaseException:
            self._slots.release()
            raise
        self._connections.append(conn)
        return conn

    async def _roundtrip(self, conn, command: bytes) -> object:
        import redis.exceptions

        if conn.is_connected:
            # As redis-py's pool does: a connection Redis closed (restart, idle timeout), or one
            # holding unread data, is replaced instead of failing the call.
            try:
                stale = await _can_read(conn)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                stale = True
            if stale:
                await conn.disconnect()
        if not conn.is_connected:
            await conn.connect()
        elif conn.health_check_interval:  # set by the URL's health_check_interval: PING if idle that long
            await conn.check_health()
        writer = getattr(conn, "_writer", None)  # redis-py's stream (4.2 to 8.x at least)
        if writer is None:
            await conn.send_packed_command(command, check_health=False)  # slower: a Task per write
        else:
            try:
                # No drain: one command of a few hundred bytes at a time never fills the transport's
                # buffer, and the reply's socket timeout bounds a Redis that does not answer.
                writer.write(command)
            except RuntimeError as e:  # uvloop: the transport is already closed
                raise redis.exceptions.ConnectionError(f"Error writing to {self._cfg.redis_url}: {e}") from e
        return await conn.read_response()

    # --- keys and arguments ---

    def _scope_keys(self, scope: Scope) -> tuple[str, bytes, dict[str, bytes]]:
        """(tombstone key prefix, open-set key, key per rate limit), the keys as RESP bulk strings."""
        keys = self._keys.get((scope.name, scope.id))
        if keys is None:
            prefix = self._cfg.key_prefix
            keys = (
                f"{prefix}:{_tenant_tag(scope)}:gone:",
                _bulk(redis_key(prefix, scope, "open").encode()),
                {name: _bulk(redis_key(prefix, scope, name).encode()) for name in _PERIOD_US},
            )
            if len(self._keys) >= 65536:  # scopes come from the configuration: this is a backstop
                self._keys.clear()
            self._keys[(scope.name, scope.id)] = keys
        return keys

    def _tombstone(self, scopes: list[Scope], rid: str) -> bytes:
        return _bulk((self._scope_keys(scopes[0])[0] + rid).encode())

    async def reserve(self, scopes: list[Scope], tokens: int, request_id: str) -> Admission:
        _check_tokens(tokens)
        limits, limited, rid = _limits_of(scopes), _limited(scopes), _reservation_id(request_id)
        if not limits:
            return Admission(True, Reservation(rid, tuple(scopes), tokens, time.time()))
        rates = [lim for lim in limits if lim.is_rate]
        keys = [self._tombstone(limited, rid)]
        keys += [self._scope_keys(s)[1] for s in limited]
        keys += [self._scope_keys(lim.scope)[2][lim.name] for lim in rates]
        args = [_bulk(rid.encode()), _bulk_int(self._lease_us), _bulk_int(len(limited))]
        args += [_bulk_int(s.limits.concurrent_requests or 0) for s in limited]
        for lim in rates:
            never = lim.cost(tokens) > lim.capacity  # a tolerance of -1 makes the script reject it
            args += [_bulk_int(lim.span_us(lim.cost(tokens))), _bulk_int(-1 if never else lim.tolerance_us)]
        # Shielded: a caller going away does not cut the call (and its connection) short, and
        # once it ends we know whether there is anything to release.
        task = asyncio.ensure_future(self._call(_RESERVE, keys, args))
        try:
            reply = [int(x) for x in await asyncio.shield(task)]
        except asyncio.CancelledError:
            self._keep(task)
            task.add_done_callback(lambda t: self._abandon_unless_rejected(t, limited, tokens, rid))
            raise
        except QuotaBackendError:
            self._abandon(limited, tokens, rid)  # the script may have run, or may run later
            raise
        if reply[0] == 2:
            raise QuotaBackendError(f"reservation {rid} was abandoned")  # unreachable: ids are unique
        admitted, now, opens, tats = reply[0], reply[1], reply[2 : 2 + len(limited)], reply[2 + len(limited) :]
        open_of = {(s.name, s.id): n for s, n in zip(limited, opens)}
        tat_of = iter(tats)
        states = [next(tat_of) if lim.is_rate else open_of[(lim.scope.name, lim.scope.id)] for lim in limits]
        worst, retry_us, never_fits = -1, 0, False
        if not admitted:
            # Same arithmetic, same state: this names the limit and tells "never fits" from "wait".
            worst, retry_us, never_fits = _verdict(limits, tokens, now, states)
        adm = _admission(limits, scopes, tokens, rid, now, states, worst, retry_us, never_fits)
        if adm.allowed:
            assert adm.reservation is not None  # an admission holds its reservation
            self._renewals.opened(adm.reservation)
        return adm

    async def renew(self, reservations: list[Reservation]) -> None:
        """Extends the lease of each reservation still open to now + lease (Redis's clock): one
        call per scope. Raises QuotaBackendError."""
        by_scope: dict[bytes, list[bytes]] = {}
        for r in reservations:
            for scope in _limited(r.scopes):
                by_scope.setdefault(self._scope_keys(scope)[1], []).append(_bulk(r.id.encode()))
        failed: QuotaBackendError | None = None
        for key, ids in by_scope.items():  # every scope, even after one failed
            for at in range(0, len(ids), 1000):  # bounded arguments per call
                try:
                    await self._call(_RENEW, [key], [_bulk_int(self._lease_us), *ids[at : at + 1000]])
                except QuotaBackendError as e:
                    failed = failed or e
        if failed is not None:
            raise failed

    def _abandon_unless_rejected(self, task: asyncio.Task, limited, tokens: int, rid: str) -> None:
        if not task.cancelled() and task.exception() is None and int(task.result()[0]) == 0:
            return  # rejected: nothing was taken
        self._abandon(limited, tokens, rid)

    def _keep(self, task: asyncio.Task) -> None:
        """Hold a task nobody may await until it ends (close waits for it)."""
        self._background.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # marked retrieved: its caller may have gone away

    def _abandon(self, limited: list[Scope], tokens: int, rid: str) -> None:
        self._keep(asyncio.ensure_future(self._abandon_with_retries(limited, tokens, rid)))

    async def _abandon_with_retries(self, limited: list[Scope], tokens: int, rid: str) -> None:
        keys, args = self._settle_call(limited, tokens, 0, rid, abandon=True)
        for delay in _ABANDON_RETRY_DELAYS_S:
            if delay:
                try:
                    await asyncio.wait_for(self._closing.wait(), delay)
                    return  # closing: the lease and the drain take it from here
                except asyncio.TimeoutError:
                    pass
            try:
                await self._call(_SETTLE, keys, args)
                return
            except QuotaBackendError:
                continue

    def _settle_call(self, limited: list[Scope], reserved: int, actual: int, rid: str, abandon: bool):
        token_limits = [lim for lim in _limits_of(limited) if lim.name in _TOKEN_LIMITS]
        keys = [self._tombstone(limited, rid)] + [self._scope_keys(s)[1] for s in limited]
        keys += [self._scope_keys(lim.scope)[2][lim.name] for lim in token_limits]
        args = [_bulk(rid.encode()), _bulk_int(len(limited)), _bulk_int(int(abandon)), _bulk_int(_TOMBSTONE_MS)]
        args += [_bulk_int(_settle_delta_us(lim, reserved, actual)) for lim in token_limits]
        return keys, args

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        _check_tokens(actual_tokens)
        limited = _limited(reservation.scopes)
        if reservation.settled or not limited:
            return
        self._renewals.closed(reservation)  # settled or not, this gateway stops renewing it
        keys, args = self._settle_call(limited, reservation.tokens, actual_tokens, reservation.id, abandon=False)
        # Shielded and kept: a settle the caller stops waiting for still happens. On an error the
        # caller may retry: the script is idempotent.
        task = asyncio.ensure_future(self._call(_SETTLE, keys, args))
        self._keep(task)
        await asyncio.shield(task)
        reservation.settled = True

    async def close(self) -> None:
        """Waits briefly for settles and abandons still in flight, then disconnects."""
        self._closing.set()
        self._renewals.close()
        deadline = time.monotonic() + max(1.0, 4 * self._cfg.timeout_s)
        while self._background and time.monotonic() < deadline:  # a reserve ending here adds an abandon
            await asyncio.wait(set(self._background), timeout=deadline - time.monotonic())
        for task in self._background:
            task.cancel()
        # As redis-py's pool disconnects: all at once, the first failure raised.
        results = await asyncio.gather(*(c.disconnect() for c in self._connections), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed


async def _can_read(conn) -> bool:
    """Whether a connection has data waiting or was closed (redis-py 5 names it can_read_destructive)."""
    check = getattr(conn, "can_read", None) or conn.can_read_destructive
    return await check()


def make_backend(cfg: QuotaBackendConfig) -> QuotaBackend:
    if cfg.backend == "redis":
        return RedisQuotaBackend(cfg)
    return MemoryQuotaBackend(lease_s=cfg.lease_s)
