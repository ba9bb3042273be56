"""The autoscaling simulator checked against the real stack: predicted vs measured on one trace.

    flock /tmp/keel-e2e.lock python -m benchmarks.autoscale_check [--bench FILE] [--trace FILE]

1. A bursty on/off trace (JSONL {"t", "prompt_tokens", "output_tokens"}, seeded): bursts at a
   rate that keeps about twice the policy's target in flight, and gaps long enough for the
   model to go back to zero replicas (--trace FILE replays a trace of your own instead).
2. Measured: `keel serve` of the demo model with autoscaling 0..2 (SETTINGS below), the trace
   replayed open-loop (each request streamed at its arrival time, max_tokens = output_tokens
   with ignore_eos, a random prompt of prompt_tokens tokens), per request TTFT, TPOT and ok /
   failed; the model's replica processes sampled every 0.5 s (replica-seconds) and the Serve
   controller's scale decisions (scale events), until the model is back at zero replicas.
3. Predicted: `keel autoscale simulate`'s simulator, calibrated from a `keel bench run` of the
   same model (run here on one replica of the same config, or --bench FILE), runs the same trace
   with the same settings.
Prints predicted vs measured (SLO attainment, p95 TTFT, replica-seconds, scale events) with the
relative error of each, and writes everything to benchmarks/results/autoscale-check-TIME.json.
A measurement, not a test: nothing here asserts on a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from benchmarks import autoscale_measure as am
from serving.config import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"
MODEL = "demo"
# The policy under test (the e2e test's shape): 0..2 replicas, 4 requests in flight per replica,
# short windows so a few minutes of trace see scale-ups, panics and scale-downs to zero.
SETTINGS = {
    "min_replicas": 0,
    "max_replicas": 2,
    "signal": "requests_in_flight",
    "target": 4,
    "stable_window_s": 10,
    "panic_window_s": 2,
    "scale_down_cooldown_s": 20,
    "metrics_interval_s": 1,
    "hold_timeout_s": 600,
    "hold_max_requests": 2000,
}
# The calibration run: one replica of the same config, closed-loop points spanning the requests
# in flight one replica sees in the trace (a burst's first seconds queue many at once).
BENCH_LEVELS = [1, 4, 16, 64]
BENCH_REQUESTS = 64


def stack_doc(port: int, metrics_port: int, workdir: Path, autoscaling: dict | None) -> dict:
    """configs/local.yaml with the gateway on `port`, audit records kept in workdir, the engines'
    compute threads unpinned and either `autoscaling` or one fixed replica."""
    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    doc["server"].update(port=port, metrics_port=metrics_port)
    doc["audit"] = {"dir": str(workdir / "audit")}
    doc["ray"]["num_cpus"] = 5  # logical: two engine replicas, the gateway, and room for a third starting
    model = doc["models"][MODEL]
    # vLLM's auto binding pins every engine to the first core: a second engine starting beside a
    # busy one would get almost none of it (benchmarks/README.md, live changes).
    model["env"]["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    model["deployment"] = {"num_cpus": 1, **({"autoscaling": autoscaling} if autoscaling else {"num_replicas": 1})}
    return doc


def run_bench(workdir: Path, slo: dict, trace: list[dict]) -> Path:
    """`keel bench run` of the demo model on one replica of the same config, the trace's mean
    lengths as its dataset; returns the result file."""
    from serving.bench.stack import free_port

    config = workdir / "bench-config.yaml"
    doc = stack_doc(free_port(), free_port(), workdir, None)
    config.write_text(yaml.safe_dump(doc))
    max_num_seqs = doc["models"][MODEL]["engine"]["max_num_seqs"]  # named, so the calibration reads it
    mean = lambda key: round(sum(r[key] for r in trace) / len(trace))  # noqa: E731
    spread = max(abs(r["output_tokens"] - mean("output_tokens")) for r in trace) / mean("output_tokens")
    spec = {
        "config": str(config),
        "model": MODEL,
        "label": "autoscale-check-calibration",
        "dataset": {
            "kind": "random",
            "input_len": mean("prompt_tokens"),
            "output_len": mean("output_tokens"),
            "range_ratio": round(min(spread, 0.9), 2),
        },
        "load": {"mode": "concurrency", "levels": BENCH_LEVELS, "num_requests": BENCH_REQUESTS, "warmup_requests": 4},
        "slo": slo,
        "hardware": "cpu-2core",
        "settings": [{"engine": {"max_num_seqs": max_num_seqs}}],
    }
    spec_path = workdir / "bench-spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench-autoscale-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    keel = Path(sys.executable).with_name("keel")
    print(f"calibration: keel bench run {spec_path}", flush=True)
    subprocess.run([str(keel), "bench", "run", str(spec_path), "--out", str(out)], check=True)
    return out


def wait_gateway(url: str, proc, timeout: float) -> None:
    """Until the gateway answers /health at all (503 while a model is at zero replicas is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"keel serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except urllib.error.HTTPError as e:
            if b"replicas" in e.read():
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout:.0f} s")


def wait_replicas(watch: am.ReplicaWatch, want: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if watch.allocated() == want:
            return True
        time.sleep(1)
    return False


def measure(trace: list[dict], slo: dict, workdir: Path, tail_s: float) -> dict:
    """The trace against the real stack (see the module's docstring)."""
    from serving.bench.runner import _tokenizer
    from serving.bench.stack import free_port, start_keel, stop
    from serving.config import load_config, load_manifest
    from serving.models import ensure_weights
    from serving.policy.identity import DEMO_KEY

    port = free_port()
    doc = stack_doc(port, free_port(), workdir, SETTINGS)
    cfg_path = workdir / "check.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    cfg = load_config(cfg_path)
    ensure_weights(cfg, cfg.models[MODEL].weights)
    requests = am.trace_requests(trace, _tokenizer(load_manifest(cfg, cfg.models[MODEL].weights)[1]))
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "keel-serve.log", "wb") as log:
        proc = start_keel(doc, workdir, log, name="check")
        try:
            t_start = time.monotonic()
            wait_gateway(url, proc, 900)
            watch = am.ReplicaWatch(proc.pid, MODEL, url)
            at_zero = wait_replicas(watch, 0, 300)  # the trace starts from zero replicas, as simulated
            print(f"stack up in {time.monotonic() - t_start:.0f} s; at zero replicas: {at_zero}", flush=True)
            t0, t0_wall = time.perf_counter(), time.time()
            watch.start(t0, t0_wall)
            records = asyncio.run(am.replay(url, MODEL, trace, requests, DEMO_KEY, t0))
            last = time.perf_counter() - t0
            back_to_zero = wait_replicas(watch, 0, tail_s)
            time.sleep(1)
            watch.stop()
            events = am.scale_events(am.controller_pid(proc.pid), watch.app, watch.deployment, t0_wall)
        finally:
            stop(proc)
    end = watch.samples[-1][0]
    stats = am.request_stats(records, slo["ttft_ms"], slo["tpot_ms"])
    return {
        **stats,
        "replica_seconds": am.replica_seconds(watch.samples),
        "scale_events": len(events) if events is not None else am.count_changes(watch.samples),
        "scale_events_from": "controller log" if events is not None else "replica process count changes",
        "events": events,
        "last_request_done_s": round(last, 1),
        "end_s": end,
        "back_to_zero": back_to_zero,
        "samples": watch.samples,
        "records": [
            {
                "t": r.start,
                "ok": r.ok,
                "status": r.status,
                "ttft": r.ttft,
                "e2el": r.e2el,
                "output_tokens": r.output_tokens,
                "error": r.error,
            }
            for r in records
        ],
    }


def predict(trace_path: Path, bench: Path, slo: dict, horizon_s: float, cold_start_s: float | None = None) -> dict:
    """The simulator's run of the same trace and settings, calibrated from `bench`, over the same
    span as the measurement (so both count replica-seconds until the same moment)."""
    from serving.autoscaling.calibrate import SLO, calibrate
    from serving.autoscaling.settings import AutoscalingConfig
    from serving.autoscaling.simulate import simulate
    from serving.autoscaling.traces import read_jsonl

    model, _, setting = calibrate(bench, cold_start_s=cold_start_s)
    trace = read_jsonl(trace_path)
    trace.duration = max(trace.duration, horizon_s)
    r = simulate(
        trace,
        model,
        AutoscalingConfig(**SETTINGS),
        SLO(slo["ttft_ms"], slo["tpot_ms"], percentile=slo["percentile"]),
        name="check",
    )
    return {
        "slo_attainment": r.slo_attainment,
        "p95_ttft_ms": r.ttft_ms["p95"],
        "p50_ttft_ms": r.ttft_ms["p50"],
        "p95_tpot_ms": r.tpot_ms["p95"],
        "replica_seconds": r.replica_seconds,
        "scale_events": len(r.scale_events),
        "failed": r.failed,
        "cold_start_s": model.cold_start_s,
        "curve": {"concurrency": model.curve.concurrency, "ttft_s": model.curve.ttft_s, "tpot_s": model.curve.tpot_s},
        "events": [
            {"t": round(e.t, 2), "from": e.from_replicas, "to": e.to_replicas, "reason": e.reason}
            for e in r.scale_events
        ],
        "duration_s": r.duration_s,
        "notes": r.notes,
        "bench_setting": setting["name"],
    }


def measured_cold_starts(measured: dict) -> list[float]:
    """Seconds from each scale-up from zero (the controller's event) to the first ready replica."""
    out = []
    for e in measured.get("events") or []:
        if e["from"] == 0 and e["to"] > 0:
            ready = next((t for t, _, n in measured["samples"] if t >= e["t"] and n), None)
            if ready is not None:
                out.append(round(ready - e["t"], 1))
    return out


ROWS = [
    ("SLO attainment", "slo_attainment", "{:.1%}"),
    ("p95 TTFT", "p95_ttft_ms", "{:,.0f} ms"),
    ("replica-seconds", "replica_seconds", "{:,.0f}"),
    ("scale events", "scale_events", "{:d}"),
]


def table(predicted: dict | None, measured: dict) -> str:
    lines = ["| | predicted | measured | error |", "|---|---|---|---|"]
    for title, key, fmt in ROWS:
        m = measured.get(key)
        p = predicted.get(key) if predicted else None
        err = f"{(p - m) / m:+.0%}" if p is not None and m else "—"
        lines.append(
            f"| {title} | {fmt.format(p) if p is not None else '—'} | "
            f"{fmt.format(m) if m is not None else '—'} | {err} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, help="a `keel bench` result file to calibrate from (default: run one here)")
    ap.add_argument("--trace", type=Path, help="a JSONL trace to replay (default: generate the bursty one)")
    ap.add_argument("--measured", type=Path, help="a previous result file: reuse its measurement, predict again")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bursts", type=int, default=2)
    ap.add_argument("--burst-s", type=float, default=120)
    ap.add_argument("--gap-s", type=float, default=90)
    ap.add_argument("--rate", type=float, default=4, help="requests/s within a burst")
    ap.add_argument("--burstiness", type=float, default=0.5, help="gamma shape of the gaps (1 = Poisson)")
    ap.add_argument("--ttft-ms", type=float, default=2000)
    ap.add_argument("--tpot-ms", type=float, default=100)
    ap.add_argument("--cold-start-s", type=float, help="override the bench file's cold start")
    ap.add_argument(
        "--tail-s",
        type=float,
        default=240,
        help="after the last request: wait this long at most for the model to be back at zero replicas",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="keel-as-check-"))
    slo = {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms, "percentile": 95}
    previous = json.loads(args.measured.read_text()) if args.measured else None
    if previous:
        trace = previous["trace"]
    elif args.trace:
        trace = am.read_trace(args.trace)
    else:
        trace = am.bursty_trace(args.seed, args.bursts, args.burst_s, args.gap_s, args.rate, args.burstiness)
    trace_path = workdir / "trace.jsonl"
    am.write_trace(trace, trace_path)
    print(f"trace: {len(trace)} requests over {trace[-1]['t']:.0f} s ({trace_path})", flush=True)

    started = time.time()
    bench_ran = args.bench is None and not (previous and previous.get("bench_file"))
    bench = args.bench or (Path(previous["bench_file"]) if previous and previous.get("bench_file") else None)
    if bench is None:
        bench = run_bench(workdir, slo, trace)
    measured = previous["measured"] if previous else measure(trace, slo, workdir, args.tail_s)
    horizon = measured["end_s"]
    cold = measured_cold_starts(measured)
    predicted = diagnostic = why = None
    try:
        predicted = predict(trace_path, bench, slo, horizon, args.cold_start_s)
        if cold:  # which part of the error is the cold start's: the same run with the one measured
            diagnostic = predict(trace_path, bench, slo, horizon, sum(cold) / len(cold))
    except Exception as e:  # noqa: BLE001 - the simulator missing or failing must not lose a 15-minute measurement
        why = f"{type(e).__name__}: {e}"
        print(f"no prediction: {why}", file=sys.stderr)

    text = table(predicted, measured)
    print(text)
    if diagnostic:
        print(
            f"\nthe same with the measured cold start ({', '.join(f'{c:g}' for c in cold)} s) instead of the "
            f"bench's {predicted['cold_start_s']:g} s:"
        )
        print(table(diagnostic, measured))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"autoscale-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python -m benchmarks.autoscale_check", *(argv or sys.argv[1:])]),
        "seconds": round(time.time() - started),
        "settings": SETTINGS,
        "slo": slo,
        "bench_file": str(bench),
        "bench_ran_here": bench_ran,
        "bench": json.loads(Path(bench).read_text()) if Path(bench).is_file() else None,
        "trace": trace,
        "measured": measured,
        "measured_cold_starts_s": cold,
        "predicted": predicted,
        "predicted_with_measured_cold_start": diagnostic,
        "no_prediction": why,
        "table": text,
    }
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
