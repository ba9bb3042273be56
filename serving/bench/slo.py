"""Whether a load point meets the SLO, and the highest load a setting carries inside it."""

from __future__ import annotations

from serving.bench.metrics import percentile_key
from serving.bench.spec import SLOSpec


def meets_slo(point: dict, slo: SLOSpec) -> bool:
    """Every threshold the SLO gives holds at its percentile (p99_ttft_ms <= ttft_ms, ...), and
    every request succeeded: a point with a failure, or with none completed, does not count.
    The point must have been summarized with this SLO (so it has the percentile's fields)."""
    if point["failed"] > 0 or point["completed"] == 0:
        return False
    for metric, limit in (("ttft", slo.ttft_ms), ("tpot", slo.tpot_ms), ("e2el", slo.e2el_ms)):
        if limit is None:
            continue
        key = percentile_key(slo.percentile, metric)
        if key not in point:
            raise KeyError(f"the point has no {key}: summarize it with this SLO")
        if point[key] > limit:
            return False
    return True


def slo_max(points: list[dict]) -> dict | None:
    """The highest-load point that meets the SLO ("meets_slo"), walking up from the lowest load
    and stopping at the first that does not: a lucky point above a failing one does not count.
    None when the lowest load already misses it."""
    best = None
    for point in sorted(points, key=lambda p: p["load"]["value"]):
        if not point["meets_slo"]:
            break
        best = point
    return best
