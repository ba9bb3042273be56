"""The four autoscaling signals, read from one scrape of a vLLM engine's /metrics page.

Metric names as vLLM 0.29 and 0.32 export them (vllm/v1/metrics/loggers.py): num_requests_running and
num_requests_waiting (gauges), kv_cache_usage_perc (a gauge, 0..1 despite its name) and
cache_config_info (an info gauge whose labels carry the cache config, num_gpu_blocks and
block_size among them). Parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_INFO = "vllm:cache_config_info"


class MetricsUnreadable(ValueError):
    """The page lacks what the signals need: the replica reports nothing (never 0)."""


def read_signals(metrics_text: str) -> dict[str, float]:
    """requests_in_flight, waiting_requests, kv_cache_usage and tokens_in_flight from one page.
    Engines behind one API server (data parallel) add up; KV usage is their mean."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    capacity = 0.0  # KV-cache slots, in tokens: num_gpu_blocks x block_size per engine
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                if sample.name in (RUNNING, WAITING, KV_USAGE):
                    sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
                    counts[sample.name] = counts.get(sample.name, 0) + 1
                elif sample.name == CACHE_INFO:
                    blocks, size = sample.labels.get("num_gpu_blocks"), sample.labels.get("block_size")
                    if blocks not in (None, "None") and size not in (None, "None"):
                        capacity += float(blocks) * float(size)
    except ValueError as e:
        raise MetricsUnreadable(f"unparsable /metrics page: {e}") from None
    missing = [name for name in (RUNNING, WAITING, KV_USAGE) if name not in sums]
    if missing:
        raise MetricsUnreadable(f"/metrics lacks {', '.join(missing)}")
    usage = sums[KV_USAGE] / counts[KV_USAGE]
    out = {
        "requests_in_flight": sums[RUNNING] + sums[WAITING],
        "waiting_requests": sums[WAITING],
        "kv_cache_usage": usage,
    }
    if capacity > 0:  # tokens held in the KV cache now
        out["tokens_in_flight"] = usage * capacity
    return out
