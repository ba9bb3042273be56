"""A replica model for the simulator, calibrated from a `keel bench` result file
(serving/bench/records.py): the service curve (TTFT, TPOT and output throughput against the
requests a replica runs at once), its maximum concurrency, cold start, price and the SLO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# vLLM's default max_num_seqs, when neither the setting nor the flags give one.
DEFAULT_MAX_NUM_SEQS = 256


class CalibrationError(ValueError):
    """The bench file cannot calibrate a replica; the message says what is missing."""


@dataclass(frozen=True)
class ServiceCurve:
    """Latency of one replica against the requests it runs at once, interpolated linearly
    between measured load points; below the lowest point the lowest's values, above the highest
    the highest's (the simulation notes how often it went past what was measured)."""

    concurrency: tuple[float, ...]  # increasing
    ttft_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    output_tps: tuple[float, ...] = ()  # tok/s per replica, for the record

    def __post_init__(self):
        n = len(self.concurrency)
        if n == 0 or len(self.ttft_s) != n or len(self.tpot_s) != n:
            raise CalibrationError("a service curve needs at least one point, with TTFT and TPOT each")
        if any(b <= a for a, b in zip(self.concurrency, self.concurrency[1:])):
            raise CalibrationError("service curve points must have increasing concurrency")

    def ttft(self, n: float) -> float:
        return float(np.interp(n, self.concurrency, self.ttft_s))

    def tpot(self, n: float) -> float:
        return float(np.interp(n, self.concurrency, self.tpot_s))

    @classmethod
    def constant(cls, ttft_s: float, tpot_s: float) -> ServiceCurve:
        return cls((1.0,), (ttft_s,), (tpot_s,))


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    percentile: float = 99.0  # a setting meets the SLO when this share of requests meets it

    def describe(self) -> str:
        parts = [
            f"{k} <= {v:g} ms"
            for k, v in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("E2EL", self.e2el_ms))
            if v is not None
        ]
        return f"{self.percentile:g}% of requests with " + (", ".join(parts) or "no limit")


@dataclass(frozen=True)
class ReplicaModel:
    curve: ServiceCurve
    max_concurrency: int  # requests a replica runs at once (the engine's max_num_seqs)
    cold_start_s: float  # from the decision to start a replica to it taking requests
    price_per_replica_hour: float = 0.0
    currency: str = "USD"
    kv_cache_tokens: float | None = None  # tokens one replica's KV cache holds (kv_cache_usage)
    source: str = ""
    notes: list[str] = field(default_factory=list)


def load_bench(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or "keel_bench" not in doc:
        raise CalibrationError(f"{path}: not a `keel bench` result file (no keel_bench version)")
    return doc


def pick_setting(doc: dict, name: str | None, source: str = "") -> dict:
    """The setting called `name`; by default the recommendation's, else the first with points."""
    settings = [s for s in doc.get("settings", []) if s.get("points")]
    if not settings:
        raise CalibrationError(f"{source}: no setting with measured load points")
    if name is None:
        rec = doc.get("recommendation") or {}
        name = rec.get("setting") if any(s["name"] == rec.get("setting") for s in settings) else settings[0]["name"]
    for s in settings:
        if s["name"] == name:
            return s
    raise CalibrationError(
        f"{source}: no setting {name!r} with points (settings: {', '.join(s['name'] for s in settings)})"
    )


def curve_from_points(points: list[dict], replicas: int, max_concurrency: int | None = None) -> ServiceCurve:
    """Each point's mean TTFT and TPOT at the requests one replica ran at once: the load value
    per replica for closed-loop (concurrency) points, Little's law (req/s x mean E2EL) for
    open-loop ones. Points above max_concurrency are left out: their TTFT holds time queued in
    the engine, which the simulator models itself."""
    rows = []
    for p in points:
        if p.get("completed", 0) <= 0:
            continue
        if p["load"]["kind"] == "concurrency":
            n = p["load"]["value"] / replicas
        else:
            n = p["request_throughput"] * p["mean_e2el_ms"] / 1000 / replicas
        if max_concurrency is not None and n > max_concurrency:
            continue
        rows.append((n, p["mean_ttft_ms"] / 1000, p["mean_tpot_ms"] / 1000, p["output_throughput"] / replicas))
    rows.sort()
    dedup: dict[float, tuple] = {}
    for r in rows:
        dedup.setdefault(round(r[0], 9), r)  # two points at one concurrency: the first
    rows = list(dedup.values())
    if not rows:
        raise CalibrationError("no completed load point at or below the replica's maximum concurrency")
    return ServiceCurve(*(tuple(c) for c in zip(*rows)))


def _cold_start(setting: dict) -> tuple[float | None, str]:
    """A replica's cold start from a bench setting, and a note saying where it came from."""
    replica_s = setting.get("replica_start_s")
    if replica_s is not None:
        return float(replica_s), (
            f"cold start {replica_s:.1f} s: the bench's replica start, its Ray worker's start to engine ready"
        )
    stack_s = setting.get("startup_s")
    if stack_s is None:
        return None, ""
    return float(stack_s), (
        f"cold start {stack_s:.1f} s: the bench's stack start to ready, Ray's start "
        "included (this file has no replica_start_s: an upper bound; "
        "--cold-start-s overrides it)"
    )


def calibrate(
    path: str | Path,
    setting: str | None = None,
    *,
    cold_start_s: float | None = None,
    price: float | None = None,
    max_concurrency: int | None = None,
    kv_cache_tokens: float | None = None,
) -> tuple[ReplicaModel, SLO, dict]:
    """The replica model, the bench's SLO and the setting used, from a result file. Flags win
    over the file: cold_start_s over the setting's replica_start_s (the seconds its slowest
    replica took from its Ray worker's start to its engine ready) or, in files without it, startup_s
    (the stack's start to ready, Ray's own included: an upper bound), price over the hardware
    block, max_concurrency over the setting's max_num_seqs (vLLM's default 256 without either)."""
    doc = load_bench(path)
    s = pick_setting(doc, setting, str(path))
    notes = [f"calibrated from {path}, setting {s['name']!r}"]
    replicas = int(s.get("replicas") or 1)
    engine = s.get("engine") or {}
    rec = doc.get("recommendation") or {}
    if max_concurrency is None and rec.get("setting") == s["name"]:
        engine = {**(rec.get("engine") or {}), **engine}  # the recommendation's has the base config's too
    if max_concurrency is None:
        max_concurrency = engine.get("max_num_seqs")
        if max_concurrency is None:
            max_concurrency = DEFAULT_MAX_NUM_SEQS
            notes.append(
                f"max concurrency: vLLM's default max_num_seqs {DEFAULT_MAX_NUM_SEQS} (the setting names none)"
            )
    if cold_start_s is None:
        cold_start_s, note = _cold_start(s)
        if cold_start_s is None:
            raise CalibrationError(
                f"{path}: setting {s['name']!r} has neither replica_start_s nor startup_s "
                "(bench files before they were recorded): give --cold-start-s"
            )
        notes.append(note)
    hw = doc.get("hardware") or {}
    if price is None:
        price = hw.get("price_per_replica_hour")
        if price is None:
            raise CalibrationError(f"{path}: no hardware.price_per_replica_hour: give --price")
    try:
        curve = curve_from_points(s["points"], replicas, int(max_concurrency))
    except CalibrationError as e:
        raise CalibrationError(f"{path}: setting {s['name']!r}: {e}") from None
    model = ReplicaModel(
        curve,
        int(max_concurrency),
        float(cold_start_s),
        float(price),
        hw.get("currency") or "USD",
        kv_cache_tokens,
        str(path),
        notes,
    )
    slo_doc = doc.get("slo") or {}
    slo = SLO(
        slo_doc.get("ttft_ms"), slo_doc.get("tpot_ms"), slo_doc.get("e2el_ms"), float(slo_doc.get("percentile") or 99)
    )
    return model, slo, s
