"""Online anomaly detection per (tenant, model): plain Python, no gateway, no Ray.

Each request that ends adds to its series' open bucket (`observe`: a few counters, O(1)); the
gateway closes every bucket once per `bucket_s` (`close`), off the request path. A closed
bucket gives one value per signal, judged against two baselines:

- the recent level (check "level"): an exponentially weighted level and spread (half-life
  `level_halflife_buckets`), which follows a daily cycle (it changes slowly next to a bucket)
  and catches what changes within minutes: a spike, an error burst, a tenant sending 10x tokens;
- the daily profile (check "daily"; `season_slots` per day, learnt over days): a smoothed
  difference between the values and the profile at the same time of day catches what the
  recent level would follow: a slow drift.

Counts are judged in log space (log1p: a doubling is the same step at 10 or 10000 requests),
latency as log(p95 of time to first byte), the error rate by a binomial z-score against the
series' own rate. Robust to outliers: a residual moves a baseline by at most `_CLIP` spreads,
and an anomalous bucket does not teach the spreads or the profile, so one past anomaly does
not widen what counts as normal. A series alarms only after `warmup_buckets`; the daily
check only after `season_warmup_days` (and its own spread's warm-up). An anomaly lasting
`adapt_after_buckets` is taken as the new normal: it ends ("adapted") and the baselines move to it.

Why not a library: statsmodels' seasonal models (STL, ExponentialSmoothing, UnobservedComponents)
fit a whole series at once; refitting one per series, signal and minute costs milliseconds
each, thousands of times a minute, and their online `append` still re-filters. What is needed
here is a few float updates per bucket, with bounded state; that is written out below.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from serving.ops.anomaly_config import AnomalyConfig

DAY_S = 86400
PROFILE_DAYS = 3  # the daily profile's memory
IDLE_DROP_DAYS = 7  # a series with no request for this long is forgotten (tenants that left)
_CLIP = 3.0  # a residual moves a baseline by at most this many spreads
_MEAN_ABS_TO_SIGMA = 1.2533  # mean absolute deviation of a normal -> its standard deviation
_START = 5  # the first buckets set a baseline unclipped (there is no spread yet to clip with)
# The least spread (log space) a baseline assumes: a flat series must not alarm on 1%.
_MIN_SPREAD = {"requests": 0.05, "tokens": 0.05, "latency": 0.05, "guardrail_hits": 0.05}
_MIN_SEASON_SPREAD = 0.02
_MIN_ERRORS = 3  # fewer 5xx in a bucket never make an error-rate anomaly
# Latency per bucket: a histogram of 64 log-spaced bins (x1.25 each, from 1 ms to ~20 min).
_LAT_BINS, _LAT_BASE, _LAT_RATIO = 64, 0.001, 1.25
_LOG_RATIO = math.log(_LAT_RATIO)
_ORDER = ("requests", "tokens", "error_rate", "latency", "guardrail_hits")
TWO_SIDED = frozenset({"requests", "tokens"})  # a drop in traffic is news; a drop in errors is not


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


@dataclass
class Anomaly:
    """One anomaly of one signal of one series, as the admin API and the audit log show it.
    value and expected are in the signal's units: per bucket (requests, tokens,
    guardrail_hits), a share (error_rate), seconds (latency: p95 time to first byte)."""

    id: str
    tenant: str
    model: str
    signal: str
    direction: str  # "up" or "down"
    check: str  # "level" (against the recent level) or "daily" (against the same time on earlier days)
    started_at: str
    value: float
    expected: float
    score: float
    peak_score: float
    buckets: int = 0
    ended_at: str | None = None
    end_reason: str | None = None  # recovered, adapted (the new normal), disabled, reset, idle, stopped

    def to_dict(self) -> dict:
        return asdict(self)


class _Bucket:
    __slots__ = ("requests", "errors", "tokens", "guardrail_hits", "latency", "timed")

    def __init__(self):
        self.requests = self.errors = self.tokens = self.guardrail_hits = self.timed = 0
        self.latency: list[int] | None = None

    def p95(self) -> float:
        assert self.latency is not None  # made by the first timed request; asked only when timed
        rank, seen = 0.95 * self.timed, 0
        for i, k in enumerate(self.latency):
            seen += k
            if seen >= rank:
                return _LAT_BASE * _LAT_RATIO ** (i + 0.5)
        return _LAT_BASE * _LAT_RATIO**_LAT_BINS


class _Baseline:
    """One log-space signal of one series: its recent level and spread, and its daily profile."""

    __slots__ = ("n", "level", "spread", "profile", "seen", "resid", "resid_spread", "resid_n", "floor")

    def __init__(self, slots: int, floor: float):
        self.n = 0
        self.level = self.spread = 0.0
        self.profile: list[float | None] = [None] * slots
        self.seen = [0] * slots
        self.resid = self.resid_spread = 0.0
        self.resid_n = 0
        self.floor = floor

    def expected_at(self, pos: float) -> float | None:
        """The profile at a position in the day (in slots), linear between slot centres."""
        slots = len(self.profile)
        x = pos - 0.5
        i = math.floor(x)
        a, b = self.profile[i % slots], self.profile[(i + 1) % slots]
        if a is None or b is None:
            return None
        return a + (b - a) * (x - i)

    def judge(
        self,
        y: float,
        pos: float | None,
        rates: tuple[float, float, float],
        seasonal: bool,
        threshold: float,
        noise=None,
    ):
        """(score, expected, check) for value y, then learn from it (less when it is anomalous).
        noise(expected count) -> the count's standard deviation by chance alone (Poisson): a
        deviation counts only as far as it is also unlikely by chance, so a series of few
        events (0, 0, 1, 0 guardrail hits) does not alarm on its first 1. rates: the weights per
        bucket of the recent level, of the profile, and of the seasonal spread."""
        alpha, beta, gamma = rates
        n = self.n
        s = max(self.spread * _MEAN_ABS_TO_SIGMA, self.floor)
        r = y - self.level
        z = r / s if n else 0.0
        if noise is not None and n:
            lam = math.expm1(self.level)
            zc = (math.expm1(y) - lam) / max(noise(lam), 0.5)
            z = math.copysign(min(abs(z), abs(zc)), z)
        expected, check = self.level, "level"
        b = self.expected_at(pos) if pos is not None else None
        if b is not None:
            # clipped: one odd bucket (a quiet minute at night) is the recent check's business
            self.resid += alpha * (max(-_CLIP * s, min(_CLIP * s, y - b)) - self.resid)
            if seasonal:
                zs = self.resid / max(self.resid_spread * _MEAN_ABS_TO_SIGMA, _MIN_SEASON_SPREAD)
                if abs(zs) > abs(z):
                    z, expected, check = zs, b, "daily"  # b: what this time of day usually is
        outlier = abs(z) >= threshold
        a = max(alpha, 1.0 / (n + 1))
        if n == 0:
            self.level = y
        elif n < _START:  # the first few set level and spread as plain means
            self.level += a * r
            self.spread += max(alpha, 1.0 / n) * (abs(r) - self.spread)
        else:
            self.level += a * max(-_CLIP * s, min(_CLIP * s, r))
            if not outlier:
                self.spread += a * (min(abs(r), _CLIP * s) - self.spread)
        self.n = n + 1
        if pos is not None and not outlier:
            self._learn_profile(y, pos, s, beta)
        if b is not None and not outlier:
            ss = max(self.resid_spread * _MEAN_ABS_TO_SIGMA, _MIN_SEASON_SPREAD)
            # slowly (a day's memory): a drift must not teach the spread it is normal
            ar = max(gamma, 1.0 / (self.resid_n + 1))
            self.resid_spread += ar * (min(abs(self.resid), _CLIP * ss) - self.resid_spread)
            self.resid_n += 1
        return z, expected, check

    def _learn_profile(self, y: float, pos: float, s: float, beta: float) -> None:
        """beta: the weight that gives a slot a memory of about PROFILE_DAYS days."""
        j = int(pos) % len(self.profile)
        p = self.profile[j]
        if p is None:
            self.profile[j] = y
        else:
            b = max(beta, 1.0 / (self.seen[j] + 1))
            self.profile[j] = p + b * max(-_CLIP * s, min(_CLIP * s, y - p))
        self.seen[j] += 1

    def adapt(self, y: float, pos: float | None) -> None:
        """Take y as the new normal: the level moves to it, the profile by y's distance from it."""
        b = self.expected_at(pos) if pos is not None else None
        step = y - (b if b is not None else self.level)
        self.level = y
        self.profile = [None if p is None else p + step for p in self.profile]
        self.resid = 0.0


class _Rate:
    """The error rate of one series: its own usual rate, and a binomial z-score per bucket."""

    __slots__ = ("n", "requests", "errors")

    def __init__(self):
        self.n = 0
        self.requests = self.errors = 0.0

    def judge(self, total: int, errors: int, alpha: float, floor: float, threshold: float):
        p0 = max(self.errors / self.requests if self.requests else 0.0, floor)
        z = (errors - total * p0) / math.sqrt(total * p0 * (1 - p0))
        if errors < _MIN_ERRORS:
            z = min(z, 0.0)
        if z < threshold:  # an anomalous bucket does not teach the usual rate
            a = max(alpha, 1.0 / (self.n + 1))
            self.requests += a * (total - self.requests)
            self.errors += a * (errors - self.errors)
            self.n += 1
        return z, p0

    def adapt(self, total: int, errors: int) -> None:
        self.requests, self.errors = float(total), float(errors)


class _Series:
    __slots__ = ("tenant", "model", "bucket", "baselines", "rate", "watches", "buckets", "first_t", "idle")

    def __init__(self, tenant: str, model: str, slots: int):
        self.tenant, self.model = tenant, model
        self.bucket: _Bucket | None = None
        self.baselines = {s: _Baseline(slots, f) for s, f in _MIN_SPREAD.items()}
        self.rate = _Rate()
        self.watches: dict[str, _Watch] = {}
        self.buckets = 0
        self.first_t: float | None = None
        self.idle = 0  # buckets in a row without a request


class _Watch:
    """Start/end state of one signal of one series."""

    __slots__ = ("above", "below", "active")

    def __init__(self):
        self.above = self.below = 0
        self.active: Anomaly | None = None


class AnomalyDetector:
    """Every series' open bucket, baselines and anomalies. Not thread-safe: one event loop
    (the gateway's) calls `observe` and `close`."""

    def __init__(self, config: AnomalyConfig):
        self.config = config
        self.series: dict[tuple[str, str], _Series] = {}
        self.recent: deque[Anomaly] = deque(maxlen=config.max_listed)
        self.untracked = 0  # observations of series past max_series, dropped
        self._rates(config)

    def _rates(self, config: AnomalyConfig) -> None:
        self._alpha = 1 - 0.5 ** (1 / config.level_halflife_buckets)
        per_slot_day = DAY_S / config.bucket_s / max(1, config.season_slots)
        beta = 1 / (PROFILE_DAYS * max(1.0, per_slot_day))
        self._weights = (self._alpha, beta, config.bucket_s / DAY_S)

    def configure(self, config: AnomalyConfig) -> list[tuple[str, Anomaly]]:
        """A new config (a policy reload). Baselines survive unless their shape changed (bucket
        size, profile slots, half-life); anomalies of signals no longer judged end."""
        old, self.config = self.config, config
        events: list[tuple[str, Anomaly]] = []
        shape = ("bucket_s", "season_slots", "level_halflife_buckets")
        if any(getattr(old, k) != getattr(config, k) for k in shape):
            events = self._end_all(lambda s, sig: True, "reset")
            self.series.clear()
            self._rates(config)
        else:
            events = self._end_all(lambda s, sig: sig not in config.signals, "disabled")
        self.recent = deque(self.recent, maxlen=config.max_listed)
        return events

    # -- the request path -------------------------------------------------------------------

    def observe(
        self, tenant: str, model: str, status: int, tokens: int, latency_s: float | None, guardrail_hits: int
    ) -> None:
        """One request that ended: O(1), a few additions to its series' open bucket."""
        key = (tenant, model)
        series = self.series.get(key)
        if series is None:
            if len(self.series) >= self.config.max_series:
                self.untracked += 1
                return
            series = self.series[key] = _Series(tenant, model, self.config.season_slots)
        b = series.bucket
        if b is None:
            b = series.bucket = _Bucket()
        b.requests += 1
        if status >= 500:
            b.errors += 1
        b.tokens += tokens
        b.guardrail_hits += guardrail_hits
        if latency_s is not None:
            if b.latency is None:
                b.latency = [0] * _LAT_BINS
            i = int(math.log(latency_s / _LAT_BASE) / _LOG_RATIO) if latency_s > _LAT_BASE else 0
            b.latency[min(i, _LAT_BINS - 1)] += 1
            b.timed += 1

    # -- the tick ---------------------------------------------------------------------------

    def close(self, bucket_start: float, keys=None) -> list[tuple[str, Anomaly]]:
        """Close the bucket that began at `bucket_start` (Unix seconds) of every series (or of
        those keys: a caller may close them in slices); returns the anomalies that started or
        ended, as ("start" | "end", anomaly)."""
        cfg = self.config
        events: list[tuple[str, Anomaly]] = []
        idle_limit = IDLE_DROP_DAYS * DAY_S // cfg.bucket_s
        for key in list(self.series) if keys is None else keys:
            series = self.series.get(key)
            if series is None:
                continue
            b, series.bucket = series.bucket, None
            if b is None:
                series.idle += 1
                if series.idle >= idle_limit:
                    events += self._end_series(series, "idle", bucket_start)
                    del self.series[key]
                    continue
                b = _Bucket()
            else:
                series.idle = 0
            self._judge(series, b, bucket_start, events)
        return events

    def _judge(self, series: _Series, b: _Bucket, t: float, events: list) -> None:
        cfg = self.config
        if series.first_t is None:
            series.first_t = t
        series.buckets += 1
        warm = series.buckets > cfg.warmup_buckets
        slots = cfg.season_slots
        pos = (t % DAY_S) / DAY_S * slots if slots else None
        seasonal = slots > 0 and t - series.first_t >= cfg.season_warmup_days * DAY_S
        judged = set(cfg.signals)
        reqs = series.baselines["requests"]
        lam_req = math.expm1(reqs.level) if reqs.n else 0.0  # before this bucket teaches it
        for signal in _ORDER:
            if signal == "error_rate":
                if signal not in judged:
                    continue
                if b.requests < cfg.min_requests:
                    self._no_data(series, signal, t, events)
                    continue
                z, p0 = series.rate.judge(b.requests, b.errors, self._alpha, cfg.min_error_rate, cfg.threshold)
                value, expected, check = b.errors / b.requests, p0, "level"
            else:
                if signal == "latency":
                    if signal not in judged:
                        continue
                    if b.timed < cfg.min_requests:
                        self._no_data(series, signal, t, events)
                        continue
                    y, noise = math.log(b.p95()), None
                elif signal == "tokens":
                    if signal not in judged:
                        continue
                    # tokens come in requests: by chance they vary as the requests do (and more)
                    y, noise = math.log1p(b.tokens), lambda lam: lam * math.sqrt(2 / max(lam_req, 1.0))
                else:  # requests (always learnt: tokens' noise needs it), guardrail_hits
                    y, noise = math.log1p(getattr(b, signal)), math.sqrt
                base = series.baselines[signal]
                # the daily check judges once its own spread has been learnt as long as a warm-up
                daily = seasonal and base.resid_n >= cfg.warmup_buckets
                z, ey, check = base.judge(y, pos, self._weights, daily, cfg.threshold, noise)
                if signal not in judged:
                    continue
                value, expected = _natural(signal, y), _natural(signal, ey)
            if signal not in TWO_SIDED:
                z = max(z, 0.0)
            self._step(series, signal, z, value, expected, check, warm, b, t, events)

    def _step(
        self,
        series: _Series,
        signal: str,
        z: float,
        value: float,
        expected: float,
        check: str,
        warm: bool,
        b: _Bucket,
        t: float,
        events: list,
    ) -> None:
        cfg = self.config
        w = series.watches.get(signal)
        if w is None:
            w = series.watches[signal] = _Watch()
        hot = warm and abs(z) >= cfg.threshold
        if w.active is None:
            w.above = w.above + 1 if hot else 0
            if w.above >= cfg.consecutive:
                start = t - (cfg.consecutive - 1) * cfg.bucket_s
                w.active = Anomaly(
                    id=f"{series.tenant}/{series.model}/{signal}/{int(start)}",
                    tenant=series.tenant,
                    model=series.model,
                    signal=signal,
                    direction="up" if z > 0 else "down",
                    check=check,
                    started_at=_iso(start),
                    value=round(value, 6),
                    expected=round(expected, 6),
                    score=round(z, 2),
                    peak_score=round(abs(z), 2),
                    buckets=cfg.consecutive,
                )
                w.above = w.below = 0
                events.append(("start", w.active))
            return
        a = w.active
        a.buckets += 1
        a.value, a.score = round(value, 6), round(z, 2)
        a.peak_score = max(a.peak_score, round(abs(z), 2))
        w.below = 0 if hot else w.below + 1
        if w.below >= cfg.consecutive:
            events.append(self._end(w, "recovered", t + cfg.bucket_s))
        elif a.buckets >= cfg.adapt_after_buckets:
            if signal == "error_rate":
                series.rate.adapt(b.requests, b.errors)
            else:
                y = math.log(b.p95()) if signal == "latency" else math.log1p(getattr(b, signal))
                slots = cfg.season_slots
                series.baselines[signal].adapt(y, (t % DAY_S) / DAY_S * slots if slots else None)
            events.append(self._end(w, "adapted", t + cfg.bucket_s))

    def _no_data(self, series: _Series, signal: str, t: float, events: list) -> None:
        """A bucket too thin to judge (error_rate, latency): no evidence that an active anomaly
        goes on, so it counts towards its end (traffic that stops ends an error burst)."""
        w = series.watches.get(signal)
        if w is None or w.active is None:
            return
        w.active.buckets += 1
        w.below += 1
        if w.below >= self.config.consecutive:
            events.append(self._end(w, "recovered", t + self.config.bucket_s))

    def _end(self, w: _Watch, reason: str, t: float) -> tuple[str, Anomaly]:
        a, w.active = w.active, None
        assert a is not None  # callers end an active anomaly
        w.above = w.below = 0
        a.ended_at, a.end_reason = _iso(t), reason
        self.recent.append(a)
        return "end", a

    def _end_series(self, series: _Series, reason: str, t: float) -> list:
        return [self._end(w, reason, t) for w in series.watches.values() if w.active is not None]

    def end_all(self, reason: str) -> list[tuple[str, Anomaly]]:
        """End every active anomaly (detection stops)."""
        return self._end_all(lambda s, sig: True, reason)

    def _end_all(self, which, reason: str) -> list:
        now = time.time()
        return [
            self._end(w, reason, now)
            for s in self.series.values()
            for sig, w in s.watches.items()
            if w.active is not None and which(s, sig)
        ]

    # -- what the admin API shows ------------------------------------------------------------

    def active(self) -> list[Anomaly]:
        return [w.active for s in self.series.values() for w in s.watches.values() if w.active is not None]

    def snapshot(self) -> dict:
        return {
            "active": [a.to_dict() for a in self.active()],
            "recent": [a.to_dict() for a in reversed(self.recent)],
            "series": len(self.series),
            "untracked_requests": self.untracked,
        }


def _natural(signal: str, y: float) -> float:
    return math.exp(y) if signal == "latency" else math.expm1(y)
