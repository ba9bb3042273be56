"""Arrival traces for `keel autoscale simulate`: read, written, taken from Keel's audit log, or
generated (steady Poisson, diurnal, bursty gamma), always seeded.

A trace file is JSONL, one request a line, arrivals in seconds from the trace's start:

    {"t": 0.42, "prompt_tokens": 212, "output_tokens": 96}
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

# Generated traces start on a Monday at midnight UTC, so schedules in settings line up the same
# way on every run; --start moves it.
DEFAULT_EPOCH = dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc).timestamp()


# The most requests one trace may hold: ~70 hours at 8 req/s, a few minutes of simulation per
# setting and ~1 GB of memory; a larger file or --rate x --duration is refused, not swapped.
MAX_REQUESTS = 2_000_000


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file and line."""


def _too_many(where: str) -> TraceError:
    return TraceError(
        f"{where}: more than {MAX_REQUESTS:,} requests (the most a trace may hold: replay a shorter span)"
    )


@dataclass(frozen=True)
class Request:
    t: float  # arrival, s from the trace's start
    prompt_tokens: int
    output_tokens: int


@dataclass
class Trace:
    requests: list[Request]  # by arrival time
    duration: float  # s; at least the last arrival
    epoch: float = DEFAULT_EPOCH  # Unix time of t = 0 (the policy's clock, for schedules)
    source: str = ""
    notes: list[str] = field(default_factory=list)  # what reading it skipped, and why


def _open(path: Path):
    """A trace or audit file for reading, line by line; a TraceError naming it if it cannot be."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None


def read_jsonl(path: str | Path, epoch: float = DEFAULT_EPOCH) -> Trace:
    path = Path(path)
    reqs: list[Request] = []
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if len(reqs) == MAX_REQUESTS:
                raise _too_many(str(path))
            try:
                doc = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TraceError(f"{path}:{n}: not JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(doc, dict):
                raise TraceError(f"{path}:{n}: expected an object with t, prompt_tokens, output_tokens")
            extra = set(doc) - {"t", "prompt_tokens", "output_tokens"}
            if extra:
                raise TraceError(
                    f"{path}:{n}: unknown key {sorted(extra)[0]!r} (keys: t, prompt_tokens, output_tokens)"
                )
            reqs.append(_request(doc, f"{path}:{n}"))
    if not reqs:
        raise TraceError(f"{path}: no requests")
    reqs.sort(key=lambda r: r.t)
    return Trace(reqs, reqs[-1].t, epoch, str(path))


def _request(doc: dict, where: str) -> Request:
    t = doc.get("t")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise TraceError(f"{where}: t must be a number of seconds >= 0 (got {json.dumps(t)})")
    counts = []
    for key, low in (("prompt_tokens", 0), ("output_tokens", 1)):
        v = doc.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise TraceError(f"{where}: {key} must be a whole number >= {low} (got {json.dumps(v)})")
        counts.append(v)
    return Request(float(t), *counts)


def write_jsonl(trace: Trace, path: str | Path) -> None:
    with open(path, "w") as f:
        for r in trace.requests:
            f.write(
                json.dumps({"t": round(r.t, 6), "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens})
                + "\n"
            )


def audit_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and the audit files (current and rotated) inside directories named."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.glob("audit-*.jsonl")))
        else:
            out.append(p)
    return out


def read_audit(paths: Iterable[str | Path], model: str | None = None) -> Trace:
    """Client requests from Keel's audit records (serving/gateway/policy.py `Audit`): arrival =
    `time` (when the request ended) - `latency_ms`; tokens from prompt_tokens and
    completion_tokens. Kept: answered requests (status 200) of `model` (any model when None);
    skipped, and counted in `notes`: rollout events, shadow copies, other statuses (a rejected
    request put no load on an engine), records without token counts."""
    arrivals: list[tuple[float, int, int]] = []
    skipped: dict[str, int] = {}
    files = audit_files(paths)
    if not files:
        raise TraceError("no audit files found (give files or a directory holding audit-*.jsonl)")
    for path in files:
        with _open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    why = _skip(rec, model)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise TraceError(f"{path}:{n}: not a JSON audit record ({e})") from None
                if why:
                    skipped[why] = skipped.get(why, 0) + 1
                    continue
                if len(arrivals) == MAX_REQUESTS:
                    raise _too_many(", ".join(map(str, files)))
                try:
                    end = dt.datetime.fromisoformat(rec["time"]).timestamp()
                    start = end - float(rec["latency_ms"]) / 1000
                except (KeyError, TypeError, ValueError) as e:
                    raise TraceError(f"{path}:{n}: audit record without a usable time and latency_ms ({e})") from None
                arrivals.append((start, int(rec["prompt_tokens"]), int(rec["completion_tokens"])))
    if not arrivals:
        raise TraceError(
            f"no answered requests{f' for model {model!r}' if model else ''} in "
            f"{', '.join(map(str, files))} (skipped: {_counts(skipped) or 'none'})"
        )
    arrivals.sort()
    epoch = arrivals[0][0]
    reqs = [Request(s - epoch, p, max(1, o)) for s, p, o in arrivals]
    notes = [f"skipped {_counts(skipped)}"] if skipped else []
    return Trace(reqs, reqs[-1].t, epoch, ", ".join(map(str, files)), notes)


def _skip(rec, model: str | None) -> str | None:
    if not isinstance(rec, dict):
        raise json.JSONDecodeError("not an object", "", 0)
    if "event" in rec:
        return "events"
    if rec.get("shadow"):
        return "shadow copies"
    if model is not None and rec.get("model") != model:
        return "other models"
    if rec.get("status") != 200:
        return f"status {rec.get('status')}"
    if not isinstance(rec.get("prompt_tokens"), int) or not isinstance(rec.get("completion_tokens"), int):
        return "without token counts"
    return None


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(d.items()))


# ---------------------------------------------------------------------------------------------
# Generated traces

Kind = Literal["steady", "diurnal", "bursty"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(frozen=True)
class Lengths:
    """Token counts per request: `uniform` draws from [mean x (1 - spread), mean x (1 + spread)]
    as vLLM bench's --random-range-ratio; `lognormal` has the given mean and sigma = spread (a
    long tail, as chat traffic); `geometric` has the given mean (memoryless: with a constant
    time per token, exponential service times for queueing checks)."""

    mean: float
    spread: float = 0.0
    dist: Literal["uniform", "lognormal", "geometric"] = "uniform"
    low: int = 0  # at least this many

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x: np.ndarray  # floats, or ints from the geometric draw
        if self.dist == "uniform":
            x = rng.uniform(self.mean * (1 - self.spread), self.mean * (1 + self.spread), n)
        elif self.dist == "lognormal":
            mu = math.log(self.mean) - self.spread**2 / 2  # keeps the mean at `mean`
            x = rng.lognormal(mu, self.spread, n)
        else:
            x = rng.geometric(1 / self.mean, n)
        return np.maximum(np.rint(x), self.low).astype(int)


def generate(
    kind: str,
    rate: float,
    duration: float,
    seed: int = 0,
    *,
    burstiness: float = 1.0,
    period_s: float = 86_400.0,
    amplitude: float = 0.5,
    prompt: Lengths = Lengths(256, 0.25),
    output: Lengths = Lengths(128, 0.25),
    epoch: float = DEFAULT_EPOCH,
) -> Trace:
    """steady: Poisson arrivals at `rate` req/s. diurnal: Poisson with the rate
    rate x (1 + amplitude x sin(2 pi t / period_s)), mean `rate`. bursty: gamma inter-arrival
    gaps of shape `burstiness` and mean 1/rate (vLLM bench's --burstiness: 1 is Poisson, lower is
    burstier)."""
    if kind not in KINDS:
        raise ValueError(f"unknown trace kind {kind!r} (kinds: {', '.join(KINDS)})")
    if not (rate > 0 and duration > 0 and math.isfinite(rate * duration)):
        raise ValueError("rate and duration must be finite numbers > 0")
    if not 0 <= amplitude <= 1:
        raise ValueError("amplitude must lie in 0..1")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError("burstiness must be a finite number > 0")
    if not (period_s > 0 and math.isfinite(period_s)):
        raise ValueError("period_s must be a finite number > 0")
    for name, lengths in (("prompt tokens", prompt), ("output tokens", output)):
        if not (1 <= lengths.mean <= 10_000_000 and 0 <= lengths.spread <= 10):
            raise ValueError(f"{name}: mean must lie in 1..10,000,000 and spread in 0..10")
    if rate * (1 + amplitude) * duration > MAX_REQUESTS:
        raise ValueError(
            f"{rate:g} req/s for {duration:g} s is more than {MAX_REQUESTS:,} requests "
            "(the most a trace may hold: simulate a shorter span)"
        )
    rng = np.random.default_rng(seed)
    if kind == "diurnal":
        peak = rate * (1 + amplitude)
        t = _poisson(rng, peak, duration)
        keep = rng.uniform(0, peak, len(t)) < rate * (1 + amplitude * np.sin(2 * np.pi * t / period_s))
        t = t[keep]  # thinning (Lewis and Shedler): a Poisson process at the varying rate
    else:
        shape = burstiness if kind == "bursty" else 1.0
        t = _gamma_arrivals(rng, rate, shape, duration)
    n = len(t)
    p, o = prompt.draw(rng, n), output.draw(rng, n)
    reqs = [Request(float(a), int(b), max(1, int(c))) for a, b, c in zip(t, p, o)]
    return Trace(reqs, duration, epoch, f"{kind} {rate:g} req/s for {duration:g} s (seed {seed})")


def _gamma_arrivals(rng: np.random.Generator, rate: float, shape: float, duration: float) -> np.ndarray:
    scale = 1 / (rate * shape)
    out, t = [], 0.0
    while t < duration:
        gaps = rng.gamma(shape, scale, max(16, int(rate * duration * 1.2) + 16))
        times = t + np.cumsum(gaps)
        out.append(times)
        t = float(times[-1])
    times = np.concatenate(out)
    return times[times < duration]


def _poisson(rng: np.random.Generator, rate: float, duration: float) -> np.ndarray:
    return _gamma_arrivals(rng, rate, 1.0, duration)
