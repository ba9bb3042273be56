"""Detection delay and false alarms of the anomaly detector, on synthetic traffic.

Two tenants on one model, with a daily cycle (traffic x0.4 at night to x1.6 in the afternoon,
latency rising with load) and noise (Poisson arrivals, log-normal tokens and latency, 0.3%
errors, 2% guardrail hits), fed request by request through the very detector the gateway runs
(serving.ops.anomaly.AnomalyDetector, its default config). Three days: the first two are
history; on the third one kind of anomaly is injected into tenant `acme` at a random time
between 08:00 and 18:00:

  spike        requests x5 for 10 minutes
  drift        latency rising slowly: x2 over 4 hours, then staying there
  error_burst  15% of requests fail (5xx) for 10 minutes
  tokens_10x   the tenant sends 10x the tokens per request from then on

Reported: per kind, the delay from the injection to the anomaly's start event (the tick that
emits it), its signal, and false alarms (starts of anything else, either tenant); on clean
traffic, false alarms per day over days 1-3 (the seasonal check judges from day 1 on).

    python -m benchmarks.anomaly_eval [--seeds 5] [--threshold 6] [--json]

Deterministic for a seed; a few seconds on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

from serving.ops.anomaly import DAY_S, AnomalyDetector
from serving.ops.anomaly_config import AnomalyConfig

KINDS = {"spike": "requests", "drift": "latency", "error_burst": "error_rate", "tokens_10x": "tokens"}
TENANTS = {"acme": 30.0, "globex": 12.0}  # requests per minute on average
MODEL = "demo"
DAYS = 3


def daily_factor(t: float) -> float:
    """Traffic relative to the day's mean: lowest at 04:00, highest at 16:00."""
    return 1.0 + 0.6 * math.sin(2 * math.pi * (t % DAY_S - 10 * 3600) / DAY_S)


def traffic(seed: int, kind: str | None, bucket_s: int = 60, days: int = DAYS):
    """(bucket_start, [(tenant, status, tokens, latency_s, guardrail_hits), ...]) per bucket, and
    the injection time (None on clean traffic)."""
    rng = np.random.default_rng(seed)
    t0 = (days - 1) * DAY_S + float(rng.uniform(8, 18)) * 3600 if kind else None
    t0 = math.floor(t0 / bucket_s) * bucket_s if t0 is not None else None
    buckets = []
    for k in range(days * DAY_S // bucket_s):
        t = k * bucket_s
        f = daily_factor(t)
        reqs = []
        for tenant, rpm in TENANTS.items():
            hit = kind is not None and tenant == "acme" and t >= t0
            since = t - t0 if hit else None
            rate = rpm * f * bucket_s / 60
            if kind == "spike" and hit and since < 600:
                rate *= 5
            n = int(rng.poisson(rate))
            tokens = rng.lognormal(math.log(300), 0.5, n)
            if kind == "tokens_10x" and hit:
                tokens *= 10
            latency = rng.lognormal(math.log(0.15 * (0.7 + 0.3 * f)), 0.35, n)
            if kind == "drift" and hit:
                latency *= 1 + min(since, 4 * 3600) / (4 * 3600)
            p_err = 0.15 if kind == "error_burst" and hit and since < 600 else 0.003
            errors = rng.random(n) < p_err
            guards = rng.random(n) < 0.02
            reqs += [
                (tenant, 503 if e else 200, int(tok), float(lat), int(g))
                for e, tok, lat, g in zip(errors, tokens, latency, guards)
            ]
        buckets.append((t, reqs))
    return buckets, t0


def run_one(seed: int, kind: str | None, config: AnomalyConfig | None = None) -> dict:
    cfg = config or AnomalyConfig()
    det = AnomalyDetector(cfg)
    buckets, t0 = traffic(seed, kind, cfg.bucket_s)
    starts, close_s, closes = [], 0.0, 0
    for t, reqs in buckets:
        for tenant, status, tokens, latency, hits in reqs:
            det.observe(tenant, MODEL, status, tokens, latency, hits)
        c = time.perf_counter()
        events = det.close(t)
        close_s += time.perf_counter() - c
        closes += 1
        starts += [(t + cfg.bucket_s, a) for phase, a in events if phase == "start"]
    out = {"seed": seed, "kind": kind, "injected_at": t0, "close_us": close_s / closes * 1e6, "series": len(det.series)}
    if kind is None:
        judged_days = DAYS - cfg.warmup_buckets * cfg.bucket_s / DAY_S
        out["false_alarms"] = [_brief(at, a) for at, a in starts]
        out["false_alarms_per_day"] = len(starts) / judged_days / len(TENANTS)  # per series-day
        return out
    want = KINDS[kind]
    hit = [(at, a) for at, a in starts if at > t0 and a.tenant == "acme" and a.signal == want]
    out["detected"] = bool(hit)
    out["delay_s"] = hit[0][0] - t0 if hit else None
    out["check"] = hit[0][1].check if hit else None
    others = [(at, a) for at, a in starts if not (a.tenant == "acme" and at > t0)]
    out["false_alarms"] = [_brief(at, a) for at, a in others]
    out["other_signals"] = sorted({a.signal for at, a in starts if a.tenant == "acme" and at > t0} - {want})
    return out


def _brief(at: float, a) -> str:
    return f"{a.tenant}/{a.signal}/{a.direction} day {at / DAY_S:.2f}"


def evaluate(seeds: list[int], config: AnomalyConfig | None = None) -> dict:
    clean = [run_one(s, None, config) for s in seeds]
    kinds = {k: [run_one(s, k, config) for s in seeds] for k in KINDS}
    return {"clean": clean, "kinds": kinds}


def summary(res: dict) -> str:
    lines = ["kind         signal      detected  delay min (median, max)  check     false alarms"]
    for kind, runs in res["kinds"].items():
        delays = [r["delay_s"] / 60 for r in runs if r["detected"]]
        med = f"{statistics.median(delays):.0f}, {max(delays):.0f}" if delays else "-"
        checks = ",".join(sorted({r["check"] for r in runs if r["check"]}))
        fa = sum(len(r["false_alarms"]) for r in runs)
        lines.append(
            f"{kind:12} {KINDS[kind]:11} {sum(r['detected'] for r in runs)}/{len(runs):<7} {med:24} {checks:9} {fa}"
        )
    per_day = [r["false_alarms_per_day"] for r in res["clean"]]
    total = sum(len(r["false_alarms"]) for r in res["clean"])
    lines.append(
        f"clean traffic: {total} false alarms over {len(per_day)} seeds x {len(TENANTS)} tenants x "
        f"~{DAYS - 1 / 24:.2f} judged days = {statistics.mean(per_day):.3f} per series-day"
    )
    close_us = statistics.mean(r["close_us"] for r in res["clean"])
    lines.append(
        f"tick cost: {close_us:.0f} us per close of {res['clean'][0]['series']} series "
        f"({close_us / res['clean'][0]['series']:.0f} us per series)"
    )
    return "\n".join(lines)


def scale(series: int, buckets: int = 3, memory: bool = False) -> dict:
    """Tick time (or, with memory, the bytes held: tracemalloc slows it) with many series:
    `series` (tenant, model) pairs, 20 requests each per bucket, with a full daily profile."""
    import tracemalloc

    cfg = AnomalyConfig(max_series=series)
    if memory:
        tracemalloc.start()
    det = AnomalyDetector(cfg)
    rng = np.random.default_rng(0)
    lat = rng.lognormal(math.log(0.15), 0.35, 20).tolist()
    t, close_s, observe_s, observed = 0.0, 0.0, 0.0, 0
    for _ in range(buckets + 2 * cfg.season_slots):  # every profile slot set once
        c = time.perf_counter()
        for i in range(series):
            tenant = f"t{i}"
            for x in lat:
                det.observe(tenant, MODEL, 200, 300, x, 0)
        observe_s += time.perf_counter() - c
        observed += series * len(lat)
        c = time.perf_counter()
        det.close(t)
        close_s += time.perf_counter() - c
        t += DAY_S / cfg.season_slots / 2
    if memory:
        mem = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return {"series": series, "bytes_per_series": mem / series}
    closes = buckets + 2 * cfg.season_slots
    return {"series": series, "tick_ms": close_s / closes * 1000, "observe_us": observe_s / observed * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--threshold",
        type=float,
        default=AnomalyConfig().threshold,
        help="anomalies.threshold to evaluate (the default config's otherwise)",
    )
    ap.add_argument("--series", type=int, default=1000, help="series for the tick-cost and memory run")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    big = {**scale(args.series), **scale(args.series, memory=True)}
    res = evaluate(list(range(args.seeds)), AnomalyConfig(threshold=args.threshold))
    if args.json:
        json.dump(res, sys.stdout, indent=1, default=str)
        print()
    print(summary(res))
    print(
        f"{big['series']} series: tick {big['tick_ms']:.1f} ms per bucket, observe {big['observe_us']:.2f} us "
        f"per request, {big['bytes_per_series'] / 1024:.1f} KiB per series (tracemalloc)"
    )
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
