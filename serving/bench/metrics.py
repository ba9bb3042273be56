"""One load point's records -> the numbers `vllm bench serve` reports, under its field names.

The definitions follow vLLM's `calculate_metrics` (vllm/benchmarks/serve.py), so a Keel point
and a `vllm bench serve` result compare field for field:

- TTFT and E2EL: over successful requests.
- TPOT: (e2el - ttft) / (output_tokens - 1), only for requests with more than one output token.
- ITL: every gap between text chunks of every successful request.
- Token totals and throughputs count successful requests only; rates are per `duration` s.
- Latency statistics of an empty set are 0, as vLLM's (`np.mean(xs or 0)`); look at
  `completed` before reading them.
- Goodput: a successful request is good when its own ttft, tpot (0 for a one-token request)
  and e2el each meet the SLO threshold given (<=); request_goodput = good / duration.

Keel adds failures_by_status ({"503": 2, "0": 1}; "0" = no response, "200" = an empty
stream), good_requests and sample_errors.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from serving.bench.records import RequestRecord
from serving.bench.spec import SLOSpec

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
MAX_SAMPLE_ERRORS = 3


def percentile_word(p: float) -> str:
    """99 -> "p99", 99.9 -> "p99.9" (vLLM's naming)."""
    return "p" + (str(int(p)) if int(p) == p else str(p))


def percentile_key(p: float, metric: str) -> str:
    """vLLM's field name: (99, "ttft") -> "p99_ttft_ms", (99.9, "ttft") -> "p99.9_ttft_ms"."""
    return f"{percentile_word(p)}_{metric}_ms"


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    slo: SLOSpec | None = None,
    percentiles: tuple[float, ...] = (50, 90, 99),
) -> dict:
    """The metrics of one load point that ran `records` over `duration_s` seconds. With an SLO,
    request_goodput and good_requests are counted and the SLO's percentile is always among the
    pNN fields; without one they are None. A duration of 0 gives rates of 0."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    samples: dict[str, list[float]] = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2el for r in ok],
    }
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    good = _count_good(ok, slo) if slo is not None else None

    def rate(n: float) -> float:
        return n / duration_s if duration_s > 0 else 0.0

    out: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": rate(len(ok)),
        "request_goodput": rate(good) if good is not None else None,
        "output_throughput": rate(total_output),
        "total_token_throughput": rate(total_input + total_output),
    }
    pcts = sorted(set(percentiles) | ({slo.percentile} if slo is not None else set()))
    for metric in LATENCY_METRICS:
        xs = samples[metric] or [0.0]  # vLLM's `xs or 0`: an empty set reads as 0
        out[f"mean_{metric}_ms"] = float(np.mean(xs)) * 1000
        out[f"median_{metric}_ms"] = float(np.median(xs)) * 1000
        out[f"std_{metric}_ms"] = float(np.std(xs)) * 1000
        for p in pcts:
            out[percentile_key(p, metric)] = float(np.percentile(xs, p)) * 1000
    out["good_requests"] = good
    out["failures_by_status"] = dict(Counter(str(r.status) for r in failed))
    out["sample_errors"] = list(dict.fromkeys(r.error for r in failed if r.error))[:MAX_SAMPLE_ERRORS]
    return out


def _count_good(ok: list[RequestRecord], slo: SLOSpec) -> int:
    """Successful requests whose own latencies meet every threshold the SLO gives."""
    good = 0
    for r in ok:
        tpot = (r.e2el - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        # Compared in seconds against ms / 1000, as vLLM does, so borderline requests agree.
        checks = [(slo.ttft_ms, r.ttft), (slo.tpot_ms, tpot), (slo.e2el_ms, r.e2el)]
        if all(limit / 1000 >= value for limit, value in checks if limit is not None):
            good += 1
    return good
