"""The simulator against queueing theory. With replicas that run one request at a time and a
fixed replica count, the simulated gateway is a FIFO multi-server queue:

- one server: every request's wait equals Lindley's recursion exactly (to float precision);
- c servers, Poisson arrivals, exponential service (M/M/c): the share of requests that wait and
  the mean wait match Erlang C, P(wait) = C(c, a) and Wq = C / (c mu - lambda);
- one server, constant service (M/D/1): the mean wait matches Pollaczek-Khinchine, rho / (2 mu (1 - rho)).

Service is TTFT 0 plus (output_tokens - 1) x TPOT: exponential when output tokens are geometric
with a large mean (coefficient of variation 1.0025 at mean 200), constant when they are fixed.
Tolerance: these are 30,000 s traces (36,000 to 90,000 requests), seeded. Over seeds 0-5 the
largest errors seen were 0.009 on P(wait) and 5.6% on Wq; the tests allow 0.02 and 8%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.autoscaling.calibrate import ReplicaModel, ServiceCurve
from serving.autoscaling.settings import AutoscalingConfig
from serving.autoscaling.simulate import simulate
from serving.autoscaling.traces import Lengths, generate
from tests.unit.autoscale_doubles import Fixed

DURATION_S = 30_000
MEAN_TOKENS = 200


def erlang_c(c: int, a: float) -> float:
    """The probability that an arrival waits in M/M/c with offered load a = lambda / mu < c."""
    below = sum(a**k / math.factorial(k) for k in range(c))
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (below + top)


def single_request_replicas(mean_service_s: float, tokens: int = MEAN_TOKENS) -> ReplicaModel:
    return ReplicaModel(ServiceCurve.constant(0.0, mean_service_s / (tokens - 1)), max_concurrency=1, cold_start_s=0.0)


def fixed(c: int) -> AutoscalingConfig:
    return AutoscalingConfig(min_replicas=c, max_replicas=c, metrics_interval_s=60)


@pytest.mark.parametrize("c,lam,seed", [(2, 1.2, 0), (4, 3.0, 1), (3, 1.5, 2)])
def test_mmc_waiting_probability_and_mean_wait_match_erlang_c(c, lam, seed):
    mu = 1.0
    trace = generate(
        "steady", lam, DURATION_S, seed, prompt=Lengths(10), output=Lengths(MEAN_TOKENS, dist="geometric", low=1)
    )
    r = simulate(trace, single_request_replicas(1 / mu), fixed(c), policy=Fixed)
    p_wait = erlang_c(c, lam / mu)
    wq = p_wait / (c * mu - lam)
    assert r.waited == pytest.approx(p_wait, abs=0.02)
    assert r.mean_wait_s == pytest.approx(wq, rel=0.08)
    assert r.failed == 0 and r.completed == r.requests


def test_md1_mean_wait_matches_pollaczek_khinchine():
    lam, service = 0.6, 1.0  # constant: 11 tokens at 0.1 s after the first
    trace = generate("steady", lam, DURATION_S, 3, prompt=Lengths(10), output=Lengths(11))
    r = simulate(trace, ReplicaModel(ServiceCurve.constant(0.0, 0.1), 1, 0.0), fixed(1), policy=Fixed)
    rho = lam * service
    assert r.mean_wait_s == pytest.approx(rho * service / (2 * (1 - rho)), rel=0.08)
    assert r.waited == pytest.approx(rho, abs=0.02)  # M/G/1: an arrival waits when the server is busy


def test_one_replica_waits_follow_lindleys_recursion_exactly():
    trace = generate(
        "bursty", 0.8, 2_000, 7, burstiness=0.3, prompt=Lengths(10), output=Lengths(50, dist="geometric", low=1)
    )
    tpot = 0.02
    r = simulate(trace, ReplicaModel(ServiceCurve.constant(0.0, tpot), 1, 0.0), fixed(1), policy=Fixed)
    t = np.array([q.t for q in trace.requests])
    service = np.array([(q.output_tokens - 1) * tpot for q in trace.requests])
    waits = np.zeros(len(t))
    for i in range(1, len(t)):
        waits[i] = max(0.0, waits[i - 1] + service[i - 1] - (t[i] - t[i - 1]))
    np.testing.assert_allclose(r.wait_s, waits, atol=1e-9)
