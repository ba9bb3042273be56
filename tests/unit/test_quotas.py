"""Quotas on the in-memory backend, with a fake clock: each test runs in milliseconds."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
from pydantic import ValidationError

from serving.policy.quotas import (
    MemoryQuotaBackend,
    QuotaBackendConfig,
    QuotaLimits,
    Scope,
    format_duration,
    make_backend,
)


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def tenant(**limits) -> Scope:
    return Scope("tenant", "acme", QuotaLimits(**limits))


def key(key_id: str = "key-1", **limits) -> Scope:
    return Scope("key", f"acme/{key_id}", QuotaLimits(**limits))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def quotas(clock) -> MemoryQuotaBackend:
    return MemoryQuotaBackend(clock=clock)


def reserve(backend, scopes, tokens, request_id="req"):
    return asyncio.run(backend.reserve(scopes, tokens, request_id))


def settle(backend, admission, actual):
    asyncio.run(backend.settle(admission.reservation, actual))


def test_requests_per_minute_rejects_the_request_past_the_burst_and_names_the_limit(quotas):
    scopes = [tenant(requests_per_minute=3)]
    assert all(reserve(quotas, scopes, 10).allowed for _ in range(3))
    rejected = reserve(quotas, scopes, 10)
    assert not rejected.allowed and rejected.reservation is None
    assert (rejected.limit, rejected.scope.name, rejected.scope.id) == ("requests_per_minute", "tenant", "acme")
    assert rejected.retry_after_s == 20.0  # one request's worth: 60 s / 3
    assert not rejected.never_fits


def test_tokens_per_minute_counts_the_reserved_tokens(quotas):
    scopes = [tenant(tokens_per_minute=1000)]
    assert reserve(quotas, scopes, 600).allowed
    rejected = reserve(quotas, scopes, 500)
    assert rejected.limit == "tokens_per_minute"
    assert rejected.retry_after_s == 6.0  # 100 tokens short at 60 s / 1000 tokens


def test_tokens_per_day_rejects_once_the_day_is_used(quotas):
    scopes = [tenant(tokens_per_day=1000)]
    assert reserve(quotas, scopes, 1000).allowed
    rejected = reserve(quotas, scopes, 1)
    assert rejected.limit == "tokens_per_day"
    assert rejected.retry_after_s == 86.4  # one token's worth of a day


def test_concurrency_rejects_past_the_limit_with_a_one_second_retry(quotas):
    scopes = [tenant(concurrent_requests=2)]
    assert reserve(quotas, scopes, 1).allowed and reserve(quotas, scopes, 1).allowed
    rejected = reserve(quotas, scopes, 1)
    assert rejected.limit == "concurrent_requests" and rejected.retry_after_s == 1.0


def test_release_returns_the_concurrency_slot(quotas):
    scopes = [tenant(concurrent_requests=1)]
    first = reserve(quotas, scopes, 1)
    assert not reserve(quotas, scopes, 1).allowed
    settle(quotas, first, 0)
    assert reserve(quotas, scopes, 1).allowed


def test_rejected_request_is_admitted_exactly_at_its_retry_time(quotas, clock):
    scopes = [tenant(tokens_per_minute=700)]
    assert reserve(quotas, scopes, 700).allowed
    retry = reserve(quotas, scopes, 7).retry_after_s
    assert retry == pytest.approx(0.6)
    clock.advance(retry - 0.001)
    assert not reserve(quotas, scopes, 7).allowed
    clock.advance(0.001)
    assert reserve(quotas, scopes, 7).allowed


def test_retry_time_is_the_latest_of_all_rejecting_limits(quotas, clock):
    scopes = [tenant(requests_per_minute=1, tokens_per_minute=1000)]
    assert reserve(quotas, scopes, 900).allowed
    rejected = reserve(quotas, scopes, 500)  # tokens admit it in 24 s, requests in 60 s
    assert (rejected.limit, rejected.retry_after_s) == ("requests_per_minute", 60.0)
    clock.advance(59.999)
    assert not reserve(quotas, scopes, 500).allowed
    clock.advance(0.001)
    assert reserve(quotas, scopes, 500).allowed


def test_admitted_tokens_in_any_window_stay_within_burst_plus_rate(quotas, clock):
    limit, burst = 600, 300  # tokens per minute; burst_fraction 0.5
    scopes = [tenant(tokens_per_minute=limit, burst_fraction=0.5)]
    rng = random.Random(7)
    admitted, rejections = [], 0
    for _ in range(600):
        clock.advance(rng.uniform(0, 0.5))
        n = rng.randint(1, 120)
        if reserve(quotas, scopes, n).allowed:
            admitted.append((clock.t, n))
        else:
            rejections += 1
    assert rejections and sum(n for _, n in admitted) > burst  # the limit was hit, and refilled
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, n in admitted[i:]:
            total += n
            assert total <= burst + limit * (end - start) / 60


def test_net_tokens_in_any_window_stay_within_burst_plus_rate_when_settles_refund(quotas, clock):
    limit, burst = 600, 600
    scopes = [tenant(tokens_per_minute=limit)]
    rng = random.Random(11)
    events, is_admission, open_ = [], [], []  # (time, +reserved or -refunded)
    for _ in range(600):
        clock.advance(rng.uniform(0, 0.5))
        n = rng.randint(1, 200)
        admission = reserve(quotas, scopes, n)
        if admission.allowed:
            events.append((clock.t, n))
            is_admission.append(True)
            open_.append(admission)
        while open_ and rng.random() < 0.5:
            done = open_.pop(rng.randrange(len(open_)))
            actual = rng.randint(0, done.reservation.tokens)
            settle(quotas, done, actual)
            events.append((clock.t, actual - done.reservation.tokens))
            is_admission.append(False)
    assert any(n < 0 for _, n in events)
    for i, (start, _) in enumerate(events):
        net = 0
        for (end, n), admits in zip(events[i:], is_admission[i:]):
            net += n
            if admits:
                assert net <= burst + limit * (end - start) / 60


def test_a_rejection_by_one_limit_consumes_nothing_from_the_others(quotas):
    acme = tenant(requests_per_minute=3, tokens_per_minute=1000, concurrent_requests=2)
    strict_key = key("key-1", tokens_per_minute=300)
    assert reserve(quotas, [acme, strict_key], 200).allowed
    rejected = reserve(quotas, [acme, strict_key], 200)
    assert (rejected.limit, rejected.scope.name) == ("tokens_per_minute", "key")
    # Had the rejected request taken a request, 200 tokens or a slot from the tenant, this would fail.
    other = reserve(quotas, [acme, key("key-2")], 800)
    assert other.allowed
    assert other.headers["x-ratelimit-remaining-requests"] == "1"


def test_key_limit_stricter_than_the_tenant_rejects_with_the_key_scope(quotas):
    scopes = [tenant(requests_per_minute=100), key(requests_per_minute=1)]
    assert reserve(quotas, scopes, 1).allowed
    rejected = reserve(quotas, scopes, 1)
    assert (rejected.scope.name, rejected.scope.id, rejected.limit) == ("key", "acme/key-1", "requests_per_minute")
    assert rejected.retry_after_s == 60.0


def test_settle_refunds_the_unused_tokens(quotas):
    scopes = [tenant(tokens_per_minute=1000)]
    big = reserve(quotas, scopes, 1000)
    settle(quotas, big, 200)
    assert reserve(quotas, scopes, 800).allowed
    assert not reserve(quotas, scopes, 1).allowed


def test_settle_charges_usage_beyond_the_reservation_and_later_requests_wait(quotas):
    scopes = [tenant(tokens_per_minute=600)]  # 10 tokens per second
    settle(quotas, reserve(quotas, scopes, 100), 700)  # 100 tokens of debt beyond the full minute
    rejected = reserve(quotas, scopes, 10)
    assert rejected.retry_after_s == 11.0  # 10 s of debt + 1 s for its own 10 tokens


def test_a_refund_never_makes_the_bucket_fuller_than_full(quotas, clock):
    scopes = [tenant(tokens_per_minute=600)]
    old = reserve(quotas, scopes, 600)
    clock.advance(60)  # the bucket is full again
    settle(quotas, old, 0)
    assert reserve(quotas, scopes, 600).allowed
    assert not reserve(quotas, scopes, 1).allowed


def test_settling_twice_refunds_once(quotas):
    scopes = [tenant(tokens_per_minute=1000)]
    first = reserve(quotas, scopes, 500)
    assert reserve(quotas, scopes, 500).allowed
    settle(quotas, first, 0)
    # A second settle of the same reservation from another copy of it (e.g. a retry that lost
    # the flag): the ledger, not the object's `settled` flag, must stop a second refund.
    again = dataclasses.replace(first, reservation=dataclasses.replace(first.reservation, settled=False))
    settle(quotas, again, 0)
    assert reserve(quotas, scopes, 500).allowed
    assert not reserve(quotas, scopes, 1).allowed


def test_a_release_still_counts_the_request_against_requests_per_minute(quotas):
    scopes = [tenant(requests_per_minute=1, tokens_per_minute=100)]
    settle(quotas, reserve(quotas, scopes, 100), 0)
    assert reserve(quotas, scopes, 1).limit == "requests_per_minute"


def test_a_request_larger_than_the_burst_never_fits(quotas):
    scopes = [tenant(requests_per_minute=10, tokens_per_minute=1000, burst_fraction=0.5)]
    rejected = reserve(quotas, scopes, 501)
    assert not rejected.allowed and rejected.never_fits
    assert (rejected.limit, rejected.retry_after_s) == ("tokens_per_minute", 0.0)
    assert "retry-after" not in rejected.headers  # waiting cannot help
    assert reserve(quotas, scopes, 500).allowed  # and it consumed nothing


def test_concurrency_lease_expiry_frees_a_slot_never_released(clock):
    quotas = MemoryQuotaBackend(clock=clock, lease_s=10)
    scopes = [tenant(concurrent_requests=1)]
    assert reserve(quotas, scopes, 1).allowed  # never settled: its gateway "crashed"
    clock.advance(9.999)
    assert not reserve(quotas, scopes, 1).allowed
    clock.advance(0.001)
    assert reserve(quotas, scopes, 1).allowed


def test_a_request_settled_after_its_lease_ran_out_stays_charged_as_reserved(clock):
    quotas = MemoryQuotaBackend(clock=clock, lease_s=10)
    scopes = [tenant(tokens_per_day=1000)]
    slow = reserve(quotas, scopes, 1000)
    clock.advance(10)
    settle(quotas, slow, 0)  # the lease gave its slot up; settling now could be a second settle
    assert not reserve(quotas, scopes, 100).allowed


def test_a_request_longer_than_the_lease_keeps_its_slot_and_its_refund_while_it_runs(clock):
    """The gateway renews the leases of what it holds open (every lease/3, on the event loop):
    only a gateway that stopped renewing loses its slots."""
    scopes = [tenant(concurrent_requests=1, tokens_per_day=1000)]

    async def body():
        q = MemoryQuotaBackend(clock=clock, lease_s=0.3)  # renewed every 0.1 s of real time
        try:
            long = await q.reserve(scopes, 1000, "long")
            for _ in range(10):  # a whole second of the backend's time: three leases
                clock.advance(0.1)
                await asyncio.sleep(0.12)  # a renewal tick passes meanwhile
            held = await q.reserve(scopes, 0, "other")  # 0 tokens: only the slot can refuse it
            await q.settle(long.reservation, 100)  # still open: 900 tokens come back
            return long, held, await q.reserve(scopes, 900, "after")
        finally:
            await q.close()

    long, held, after = asyncio.run(body())
    assert long.allowed
    assert not held.allowed and held.limit == "concurrent_requests"
    assert after.allowed


def test_a_failed_lease_renewal_is_retried_soon_not_a_whole_interval_later(clock, monkeypatch):
    from serving.policy.quotas import QuotaBackendError, backend

    monkeypatch.setattr(backend, "_RENEW_RETRY_S", 0.05)
    calls = []

    async def body():
        q = MemoryQuotaBackend(clock=clock, lease_s=3.0)  # renewed every second
        loop = asyncio.get_running_loop()
        renew = q._renewals._renew

        async def flaky(reservations):
            calls.append(loop.time())
            if len(calls) == 1:
                raise QuotaBackendError("redis timed out")
            await renew(reservations)

        q._renewals._renew = flaky
        try:
            await q.reserve([tenant(concurrent_requests=1)], 1, "long")
            while len(calls) < 2:
                await asyncio.sleep(0.01)
        finally:
            await q.close()

    asyncio.run(asyncio.wait_for(body(), 10))
    assert calls[1] - calls[0] < 0.5  # the retry, not the next tick a second later


def test_scopes_without_limits_admit_everything(quotas):
    admission = reserve(quotas, [tenant(), key()], 10**9)
    assert admission.allowed and admission.headers == {}
    settle(quotas, admission, 5)


def test_headers_report_limit_remaining_and_reset_in_openai_format(quotas):
    admission = reserve(quotas, [tenant(requests_per_minute=60, tokens_per_minute=6000)], 1500)
    assert admission.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "4500",
        "x-ratelimit-reset-tokens": "15s",
    }


def test_headers_report_the_scope_with_the_least_remaining(quotas):
    admission = reserve(quotas, [tenant(tokens_per_minute=10_000), key(tokens_per_minute=1000)], 400)
    assert admission.headers["x-ratelimit-limit-tokens"] == "1000"
    assert admission.headers["x-ratelimit-remaining-tokens"] == "600"
    assert admission.headers["x-ratelimit-reset-tokens"] == "24s"


def test_tokens_headers_fall_back_to_tokens_per_day_and_requests_headers_are_omitted(quotas):
    admission = reserve(quotas, [tenant(tokens_per_day=86_400)], 3600)
    assert admission.headers == {
        "x-ratelimit-limit-tokens": "86400",
        "x-ratelimit-remaining-tokens": "82800",
        "x-ratelimit-reset-tokens": "1h0m0s",
    }


def test_rejection_carries_ratelimit_and_retry_after_headers(quotas, clock):
    scopes = [tenant(requests_per_minute=2)]
    reserve(quotas, scopes, 1)
    clock.advance(0.25)
    reserve(quotas, scopes, 1)
    rejected = reserve(quotas, scopes, 1)
    assert rejected.headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "59.75s",
        "retry-after": "30",
        "retry-after-ms": "29750",
    }


@pytest.mark.parametrize(
    "us, text",
    [
        (0, "0s"),
        (250_000, "250ms"),
        (1, "1ms"),
        (1_000_000, "1s"),
        (1_500_000, "1.5s"),
        (360_000_000, "6m0s"),
        (3_723_400_000, "1h2m3.4s"),
        (3_600_000_000, "1h0m0s"),
    ],
)
def test_durations_are_formatted_like_openai(us, text):
    assert format_duration(us) == text


def test_limits_must_be_positive_and_burst_a_fraction():
    with pytest.raises(ValidationError, match="greater than 0"):
        QuotaLimits(tokens_per_minute=0)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        QuotaLimits(burst_fraction=1.5)
    with pytest.raises(ValidationError, match="Extra inputs"):
        QuotaLimits(tokens_per_hour=5)


def test_backend_config_rejects_a_non_redis_url_and_braces_in_the_prefix():
    with pytest.raises(ValidationError, match="redis://"):
        QuotaBackendConfig(redis_url="http://localhost:6379")
    with pytest.raises(ValidationError, match="hash tag"):
        QuotaBackendConfig(key_prefix="keel{x}")


def test_the_default_backend_is_in_memory():
    assert isinstance(make_backend(QuotaBackendConfig()), MemoryQuotaBackend)


def test_an_unknown_backend_is_rejected_naming_the_registered_ones():
    with pytest.raises(ValidationError, match="should be 'memory' or 'redis'"):
        QuotaBackendConfig(backend="etcd")


def test_each_registered_backend_is_allowed_by_the_config_and_built_by_make_backend():
    from serving.config import config_json_schema
    from serving.policy.quotas import BACKENDS, RedisQuotaBackend

    assert config_json_schema()["$defs"]["QuotaBackendConfig"]["properties"]["backend"]["enum"] == list(BACKENDS)
    assert isinstance(make_backend(QuotaBackendConfig(backend="redis")), RedisQuotaBackend)  # connects lazily
