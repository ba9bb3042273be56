"""Live signals per variant, from one scrape of the gateway's /metrics (its own counters and the
engines' vLLM histograms it gathers): plain dicts in and out, so the gates are testable by hand.

A snapshot is {series: value} for the series a rollout reads; the signals of a step are the
difference of two snapshots (a series that went down was reset by a restarted replica or gateway:
its new value is all there is since). Per variant:
  requests, errors: keel_requests_total by `variant` (the model deployment that answered);
      errors are 5xx; 499 (the client left first) is neither.
  ttft, tpot: cumulative bucket counts {upper bound: count} of vllm:time_to_first_token_seconds
      and vllm:request_time_per_output_token_seconds, by the engines' `model_name`, summed over
      replicas.
"""

from __future__ import annotations

import json
import math
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "keel_requests_total"
TTFT = "vllm:time_to_first_token_seconds_bucket"
TPOT = "vllm:request_time_per_output_token_seconds_bucket"
_HISTOGRAMS = {TTFT: "ttft", TPOT: "tpot"}
BASELINE, CANDIDATE = "baseline", "candidate"


def snapshot(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The series of `text` (Prometheus exposition) about the model deployments `names`."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == REQUESTS and s.labels.get("variant") in names:
                labels = {
                    "variant": s.labels["variant"],
                    "status": s.labels.get("status", ""),
                    "tenant": s.labels.get("tenant", ""),
                    "model": s.labels.get("model", ""),
                }
            elif s.name in _HISTOGRAMS and s.labels.get("model_name") in names:
                labels = {
                    "model_name": s.labels["model_name"],
                    "le": s.labels.get("le", "+Inf"),
                    "replica": s.labels.get("replica", ""),
                    "engine": s.labels.get("engine", ""),
                }
            else:
                continue
            key = s.name + json.dumps(labels, sort_keys=True)
            out[key] = out.get(key, 0.0) + s.value
    return out


def delta(start: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    """What happened between two snapshots, per series; a series that went down was reset."""
    out = {}
    for key, value in now.items():
        before = start.get(key, 0.0)
        out[key] = value - before if value >= before else value
    return out


def by_variant(samples: dict[str, float], baseline: str, candidate: str) -> dict[str, dict]:
    """{"baseline": {...}, "candidate": {...}} with requests, errors, ttft and tpot buckets."""
    role = {baseline: BASELINE, candidate: CANDIDATE}
    out: dict[str, dict[str, Any]] = {
        r: {"requests": 0, "errors": 0, "ttft": {}, "tpot": {}} for r in (BASELINE, CANDIDATE)
    }
    for key, value in samples.items():
        brace = key.index("{")
        name, labels = key[:brace], json.loads(key[brace:])
        if name == REQUESTS:
            v = out[role[labels["variant"]]]
            status = labels["status"]
            if status == "499":
                continue
            v["requests"] += int(value)
            if status.startswith("5"):
                v["errors"] += int(value)
        else:
            buckets = out[role[labels["model_name"]]][_HISTOGRAMS[name]]
            le = labels["le"]
            buckets[le] = buckets.get(le, 0.0) + value
    return out


def error_rate(variant: dict) -> float | None:
    return variant["errors"] / variant["requests"] if variant["requests"] else None


def histogram_quantile(q: float, buckets: dict) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper bound: count}: linear
    within the bucket the rank falls in; the highest finite bound when it falls in +Inf; None
    with no observations. Written here because prometheus_client parses but does not compute it."""
    bounds = sorted((float(le), c) for le, c in buckets.items())
    if not bounds or not math.isinf(bounds[-1][0]):
        return None  # a histogram always has +Inf; without it the counts are not a histogram
    total = bounds[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in bounds:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound
