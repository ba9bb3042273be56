"""The measured half of benchmarks/autoscale_check.py: an on/off bursty trace, its open-loop replay
against a running Keel stack, and what the stack's replicas did meanwhile.

    trace = bursty_trace(seed=0, bursts=2, burst_s=120, gap_s=90, rate=4)
    with ReplicaWatch(keel_pid, "demo", url) as watch:
        records = asyncio.run(replay(url, "demo", trace, api_key, tokenizer))
    summary = measured_summary(trace, records, watch, slo)

Replicas are counted as Ray Serve replica actor processes of the model's engine deployment among
the descendants of `keel serve` (alive from the start of a replica's cold start to the end of its
drain: what a replica costs), sampled every `interval_s`. Scale events are the controller's own
"Upscaling/Downscaling ... from A to B replicas" lines, read from its log after the run.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime

import numpy as np
import psutil

from serving.bench.datasets import BenchRequest, _TextSampler
from serving.bench.loadgen import _send, _session, endpoint_url, request_body
from serving.bench.records import RequestRecord


def bursty_trace(
    seed: int = 0,
    bursts: int = 2,
    burst_s: float = 120.0,
    gap_s: float = 90.0,
    rate: float = 4.0,
    burstiness: float = 0.5,
    prompt_tokens: tuple[int, int] = (48, 80),
    output_tokens: tuple[int, int] = (64, 128),
) -> list[dict]:
    """Arrivals as the simulator reads them ({"t", "prompt_tokens", "output_tokens"}, t in s from
    0): `bursts` periods of `burst_s` s at `rate` req/s with gamma gaps of shape `burstiness`
    (vLLM bench's; < 1 is burstier than Poisson), `gap_s` s of silence between them. Seeded."""
    rng = random.Random(seed)
    out: list[dict] = []
    for b in range(bursts):
        start = b * (burst_s + gap_s)
        t = start + rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        while t < start + burst_s:
            out.append(
                {
                    "t": round(t, 4),
                    "prompt_tokens": rng.randint(*prompt_tokens),
                    "output_tokens": rng.randint(*output_tokens),
                }
            )
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def write_trace(trace: list[dict], path) -> None:
    with open(path, "w") as f:
        for row in trace:
            f.write(json.dumps(row) + "\n")


def read_trace(path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                missing = {"t", "prompt_tokens", "output_tokens"} - set(row)
                if missing:
                    raise ValueError(f"{path}:{n}: missing {', '.join(sorted(missing))}")
                rows.append(row)
    return sorted(rows, key=lambda r: r["t"])


def trace_requests(trace: list[dict], tokenizer, seed: int = 0) -> list[BenchRequest]:
    """A prompt of exactly prompt_tokens tokens (text only; the chat template adds a few) and
    max_tokens = output_tokens (sent with ignore_eos) per arrival."""
    rng = random.Random(seed)
    text = _TextSampler(tokenizer)
    out = []
    for row in trace:
        prompt, count = text.text(rng, int(row["prompt_tokens"]))
        out.append(BenchRequest(prompt, count, int(row["output_tokens"])))
    return out


async def replay(
    url: str,
    model: str,
    trace: list[dict],
    requests: list[BenchRequest],
    api_key: str | None,
    t0: float | None = None,
    timeout_s: float = 900.0,
) -> list[RequestRecord]:
    """Open loop: request i is sent at trace[i]["t"] s after t0 (a time.perf_counter() value;
    now by default) whatever is in flight; streaming. Records in trace order; their `start` is
    the send time relative to t0."""
    endpoint = endpoint_url(url, "chat")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter() if t0 is None else t0
    records: list[RequestRecord | None] = [None] * len(trace)
    async with _session(timeout_s) as session:

        async def arrive(i: int) -> None:
            delay = start + float(trace[i]["t"]) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = request_body(model, requests[i], "chat")
            records[i] = await _send(session, endpoint, body, headers, requests[i], start, timeout_s)

        await asyncio.gather(*(arrive(i) for i in range(len(trace))))
    return [r for r in records if r is not None]


def replica_processes(keel_pid: int, app: str, deployment: str) -> list[psutil.Process]:
    """The Serve replica actor processes of `app`/`deployment` started by `keel serve`."""
    tag = f"ServeReplica:{app}:{deployment}"
    out: list[psutil.Process] = []
    try:
        children = psutil.Process(keel_pid).children(recursive=True)
    except psutil.Error:
        return out
    for p in children:
        try:
            if tag in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def controller_pid(keel_pid: int) -> int | None:
    try:
        children = psutil.Process(keel_pid).children(recursive=True)
    except psutil.Error:
        return None
    for p in children:
        try:
            if "ServeController" in " ".join(p.cmdline()):
                return p.pid
        except psutil.Error:
            continue
    return None


class ReplicaWatch:
    """Samples, every interval_s in a thread: the model's replica processes (all states) and the
    gateway's /health count of ready replicas. samples: (t from t0, allocated, ready)."""

    def __init__(self, keel_pid: int, model: str, url: str, interval_s: float = 0.5):
        self.keel_pid, self.model, self.url, self.interval_s = keel_pid, model, url, interval_s
        self.app, self.deployment = f"keel-model-{model}", f"engine-{model}"
        self.samples: list[tuple[float, int, int | None]] = []
        self.t0 = time.perf_counter()
        self.t0_wall = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def allocated(self) -> int:
        return len(replica_processes(self.keel_pid, self.app, self.deployment))

    def ready(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                body = r.read()
        except urllib.error.HTTPError as e:  # 503 while a model has no ready replica
            body = e.read()
        except OSError:
            return None
        try:
            return int(json.loads(body)["replicas"][self.model])
        except (ValueError, KeyError, TypeError):
            return None

    def start(self, t0: float, t0_wall: float) -> ReplicaWatch:
        self.t0, self.t0_wall = t0, t0_wall
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter() - self.t0
            self.samples.append((round(t, 3), self.allocated(), self.ready()))
            self._stop.wait(self.interval_s)


_SCALE = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*?(Upscaling|Downscaling) Deployment\(name='"
    r"(?P<dep>[^']+)', app='(?P<app>[^']+)'\) from (?P<a>\d+) to (?P<b>\d+) replicas"
)


def scale_events(controller: int | None, app: str, deployment: str, t0_wall: float) -> list[dict] | None:
    """The controller's scale decisions for the deployment after t0_wall (Unix time), from its
    log (Ray writes `<session>/logs/serve/controller_<pid>.log`); None when the log is not found."""
    if controller is None:
        return None
    logs = sorted(glob.glob(f"/tmp/ray/session_*/logs/serve/controller_{controller}.log"), key=os.path.getmtime)
    if not logs:
        return None
    events = []
    with open(logs[-1], errors="replace") as f:
        for line in f:
            m = _SCALE.search(line)
            if not m or m["dep"] != deployment or m["app"] != app:
                continue
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if when >= t0_wall - 1:
                events.append({"t": round(when - t0_wall, 2), "from": int(m["a"]), "to": int(m["b"])})
    return events


def replica_seconds(samples: list[tuple[float, int, int | None]], end: float | None = None) -> float:
    """The integral of allocated replicas over the samples (each held until the next sample)."""
    total = 0.0
    for (t, n, _), (t_next, _, _) in zip(samples, samples[1:]):
        if end is not None and t >= end:
            break
        total += n * ((min(t_next, end) if end is not None else t_next) - t)
    return total


def count_changes(samples) -> int:
    return sum(a[1] != b[1] for a, b in zip(samples, samples[1:]))


def request_stats(records: list[RequestRecord], ttft_ms: float, tpot_ms: float) -> dict:
    """SLO attainment (a request meets it when it succeeded and its TTFT and TPOT are within),
    TTFT/TPOT percentiles over successful requests, failures."""
    ok = [r for r in records if r.ok]
    ttft = np.array([r.ttft * 1000 for r in ok]) if ok else np.zeros(1)
    tpot_of = lambda r: (r.e2el - r.ttft) / (r.output_tokens - 1) * 1000 if r.output_tokens > 1 else 0.0  # noqa: E731
    tpot = np.array([tpot_of(r) for r in ok]) if ok else np.zeros(1)
    good = sum(1 for r in ok if r.ttft * 1000 <= ttft_ms and tpot_of(r) <= tpot_ms)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if not r.ok})[:5],
        "slo_attainment": good / len(records) if records else 0.0,
        **{f"p{p}_ttft_ms": float(np.percentile(ttft, p)) for p in (50, 95, 99)},
        **{f"p{p}_tpot_ms": float(np.percentile(tpot, p)) for p in (50, 95, 99)},
    }
