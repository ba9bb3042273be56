"""Prices: what a million output tokens costs at a load point, and the cheapest setting and
replica count that carry a target peak inside the SLO, as a config block to paste.

A setting's capacity is read at its slo_max point (the highest load that met the SLO), divided
by the replicas it was measured with: requests per second per replica, and requests in flight
per replica (the load value for concurrency loads; Little's law, throughput x mean E2EL, for
rate loads). The target then needs ceil(peak_rps / per-replica req/s) or
ceil(peak_concurrency / per-replica in-flight) replicas.
"""

from __future__ import annotations

import math
import textwrap

import yaml

from serving.bench.metrics import percentile_word
from serving.bench.spec import HardwareProfile, SLOSpec, TargetSpec

# Deployment keys the recommendation decides; the rest of a base deployment carries over.
_DECIDED = {"num_replicas", "autoscaling"}
_AUTOSCALING_DECIDED = {"min_replicas", "max_replicas", "initial_replicas", "signal", "target"}


def cost_per_million_output_tokens(
    output_throughput: float, replicas: int, price_per_replica_hour: float
) -> float | None:
    """Price of 1M output tokens at `output_throughput` tok/s from `replicas` replicas; None
    when nothing was produced."""
    if output_throughput <= 0:
        return None
    return price_per_replica_hour * replicas / (output_throughput * 3600) * 1_000_000


def per_replica_capacity(setting: dict) -> dict | None:
    """What one replica of `setting` carried at its slo_max point: request_throughput (req/s),
    output_throughput (tok/s) and in_flight (requests); None without an slo_max."""
    point = setting.get("slo_max")
    if point is None:
        return None
    replicas = setting["replicas"]
    if point["load"]["kind"] == "concurrency":
        in_flight = point["load"]["value"] / replicas
    else:  # open loop: Little's law gives the requests in flight
        in_flight = point["request_throughput"] * point["mean_e2el_ms"] / 1000 / replicas
    return {
        "request_throughput": point["request_throughput"] / replicas,
        "output_throughput": point["output_throughput"] / replicas,
        "in_flight": in_flight,
    }


def replicas_needed(per_replica: dict, target: TargetSpec) -> int | None:
    """Replicas that carry the target's peak at `per_replica` capacity; None when a replica
    carries nothing."""
    if target.peak_rps is not None:
        peak, each = target.peak_rps, per_replica["request_throughput"]
    else:
        assert target.peak_concurrency is not None  # TargetSpec holds exactly one of the two
        peak, each = target.peak_concurrency, per_replica["in_flight"]
    if each <= 0:
        return None
    # round first: a quotient can land a hair above a whole number (2.1 / 0.3 = 7.000000000000001)
    return max(1, math.ceil(round(peak / each, 9)))


def recommend(
    settings: list[dict],
    target: TargetSpec,
    slo: SLOSpec,
    hardware_name: str,
    hardware: HardwareProfile,
    model: str,
    weights: str,
    base_engine: dict,
    base_model: dict | None = None,
) -> dict | None:
    """The setting and replica count that carry `target` inside `slo` for the lowest price per
    hour (ties: the lower cost per million output tokens, then the earlier setting), with an
    autoscaling block and `config_yaml`, a `models:` block to paste into a Keel config.

    `settings` are result-file settings (name, engine, replicas, points, slo_max). `base_model`
    is the model's entry as the Keel config wrote it: its env and deployment keys (GPUs,
    timeouts, autoscaling delays) carry into config_yaml; the replica count is replaced.
    None when no setting meets the SLO at any load; `no_recommendation_reason` says why."""
    candidates = []
    for index, setting in enumerate(settings):
        per_replica = per_replica_capacity(setting)
        if per_replica is None:
            continue
        needed = replicas_needed(per_replica, target)
        if needed is None:
            continue
        point = setting["slo_max"]
        cpm = cost_per_million_output_tokens(
            point["output_throughput"], setting["replicas"], hardware.price_per_replica_hour
        )
        cost_per_hour = needed * hardware.price_per_replica_hour
        key = (cost_per_hour, cpm if cpm is not None else math.inf, index)
        candidates.append((key, setting, per_replica, needed, cpm))
    if not candidates:
        return None
    (cost_per_hour, _, _), setting, per_replica, needed, cpm = min(candidates, key=lambda c: c[0])

    engine = {**base_engine, **setting.get("engine", {})}
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": needed,
        "signal": "requests_in_flight",
        "target": _target_in_flight(per_replica["in_flight"]),
    }
    reasoning = _reasoning(
        setting["name"], per_replica, needed, cost_per_hour, hardware, hardware_name, slo, target, len(candidates)
    )
    return {
        "setting": setting["name"],
        "engine": engine,
        "replicas": needed,
        "per_replica": per_replica,
        "measured": {"load": setting["slo_max"]["load"], "replicas": setting["replicas"]},
        "hardware": hardware_name,
        "cost_per_hour": cost_per_hour,
        "cost_per_million_output_tokens": cpm,
        "currency": hardware.currency,
        "slo": slo.model_dump(exclude_none=True),
        "target": target.model_dump(exclude_none=True),
        "reasoning": reasoning,
        "autoscaling": autoscaling,
        "config_yaml": _config_yaml(model, weights, engine, autoscaling, base_model, reasoning),
    }


def no_recommendation_reason(settings: list[dict], slo: SLOSpec) -> str:
    """What to tell the reader when `recommend` returns None."""
    names = ", ".join(s["name"] for s in settings) or "none"
    return (
        f"No setting met the SLO ({describe_slo(slo)}, no failed requests) even at its lowest "
        f"load (settings: {names}); measure lower loads, other settings, or relax the SLO."
    )


def describe_slo(slo: SLOSpec) -> str:
    """e.g. "p99 TTFT <= 500 ms, TPOT <= 50 ms"."""
    parts = [
        f"{name} <= {limit:g} ms"
        for name, limit in (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms), ("E2EL", slo.e2el_ms))
        if limit is not None
    ]
    word = percentile_word(slo.percentile)
    return f"{word} " + ", ".join(parts)


def _target_in_flight(in_flight: float) -> float:
    """The policy's per-replica target (requests in flight), rounded down to 0.1: a higher target would load
    replicas past what met the SLO."""
    rounded = math.floor(round(in_flight * 10, 6)) / 10
    return rounded if rounded > 0 else float(f"{in_flight:.2g}")


def _reasoning(
    name: str,
    per_replica: dict,
    needed: int,
    cost_per_hour: float,
    hardware: HardwareProfile,
    hardware_name: str,
    slo: SLOSpec,
    target: TargetSpec,
    n_candidates: int,
) -> str:
    peak = (
        f"{target.peak_rps:g} req/s" if target.peak_rps is not None else f"{target.peak_concurrency} requests in flight"
    )
    plural = "replica carries" if needed == 1 else "replicas carry"
    others = (
        f"the cheapest of {n_candidates} settings that met the SLO"
        if n_candidates > 1
        else "the only setting that met the SLO"
    )
    return (
        f"With {name}, one {hardware_name} replica carries {per_replica['request_throughput']:.3g} "
        f"req/s ({per_replica['in_flight']:.3g} in flight) within {describe_slo(slo)}. "
        f"{needed} {plural} the peak of {peak} for {cost_per_hour:.2f} "
        f"{hardware.currency}/h, {others}."
    )


def _config_yaml(
    model: str, weights: str, engine: dict, autoscaling: dict, base_model: dict | None, reasoning: str
) -> str:
    base = base_model or {}
    base_deployment = base.get("deployment") or {}
    deployment = {k: v for k, v in base_deployment.items() if k not in _DECIDED}
    kept = {k: v for k, v in (base_deployment.get("autoscaling") or {}).items() if k not in _AUTOSCALING_DECIDED}
    deployment["autoscaling"] = {**autoscaling, **kept}
    entry: dict = {"weights": weights, "engine": engine}
    if base.get("env"):
        entry["env"] = base["env"]
    entry["deployment"] = deployment
    header = "".join(f"# {line}\n" for line in textwrap.wrap("keel bench: " + reasoning, 96))
    return header + yaml.safe_dump({"models": {model: entry}}, sort_keys=False)
