"""`keel autoscale simulate`: replay a trace through the policy with several settings, before
applying one. Parsers, the settings grid, and the run."""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from serving.autoscaling.settings import AutoscalingConfig

# Settings compared in one run: each is a whole simulation of the trace.
MAX_SETTINGS = 64


class UsageError(ValueError):
    """Flags or files that do not make a simulation; the message names the flag, file or key."""


def add_parser(sub) -> None:
    p = sub.add_parser("autoscale", help="autoscaling: what-if simulation of settings against a trace")
    asub = p.add_subparsers(dest="autoscale_cmd", required=True)
    s = asub.add_parser(
        "simulate",
        help="replay a trace through replicas calibrated from a `keel bench` result, "
        "under one or more autoscaling settings; print SLO attainment, latency, cost, and the "
        "cheapest setting that meets the SLO as a block to paste",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--bench", required=True, metavar="FILE", help="a `keel bench run` result (JSON)")
    s.add_argument(
        "--bench-setting",
        default=None,
        metavar="NAME",
        help="which of its settings to calibrate from (default: its recommendation's, else the first)",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", metavar="FILE", help="JSONL: {t, prompt_tokens, output_tokens} per line")
    src.add_argument(
        "--audit",
        metavar="PATH",
        action="append",
        help="Keel audit files or directories (repeatable); with --model, that model's requests only",
    )
    src.add_argument("--generate", choices=("steady", "diurnal", "bursty"), help="a generated trace")
    s.add_argument("--model", default=None, help="--audit: the model whose requests to replay")
    g = s.add_argument_group("generated traces")
    g.add_argument("--rate", type=float, default=1.0, help="mean requests per second")
    g.add_argument("--duration", type=float, default=3600.0, help="seconds")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--burstiness", type=float, default=0.5, help="bursty: gamma shape (1 = Poisson, lower = burstier)")
    g.add_argument("--period-s", type=float, default=86_400.0, help="diurnal: the period")
    g.add_argument("--amplitude", type=float, default=0.5, help="diurnal: peak is rate x (1 + amplitude)")
    g.add_argument("--prompt-tokens", type=float, default=256, help="mean prompt tokens")
    g.add_argument("--output-tokens", type=float, default=128, help="mean output tokens")
    g.add_argument("--length-dist", choices=("uniform", "lognormal", "geometric"), default="uniform")
    g.add_argument("--length-spread", type=float, default=0.25, help="uniform: the range ratio; lognormal: sigma")
    g.add_argument("--write-trace", metavar="FILE", help="also write the trace as JSONL")
    s.add_argument(
        "--start",
        default=None,
        metavar="ISO",
        help="the trace's t=0 as a date-time (schedules use it); default: an audit trace's "
        "first arrival, else Monday 2026-01-05 00:00 UTC",
    )
    c = s.add_argument_group("settings to compare")
    c.add_argument("--settings", metavar="FILE", help="YAML: {name: autoscaling block, ...}")
    c.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a grid: every combination of the values given (repeatable), over each --settings entry",
    )
    r = s.add_argument_group("replica model and SLO (default: from the bench file)")
    r.add_argument(
        "--cold-start-s",
        type=float,
        default=None,
        help="seconds from a scale-up to a ready replica (default: the bench setting's replica_start_s, "
        "else its startup_s)",
    )
    r.add_argument("--price", type=float, default=None, help="price per replica-hour")
    r.add_argument("--max-concurrency", type=int, default=None, help="requests a replica runs at once (max_num_seqs)")
    r.add_argument(
        "--kv-cache-tokens",
        type=float,
        default=None,
        help="tokens one replica's KV cache holds (signal kv_cache_usage)",
    )
    r.add_argument("--slo-ttft-ms", type=float, default=None)
    r.add_argument("--slo-tpot-ms", type=float, default=None)
    r.add_argument("--slo-e2el-ms", type=float, default=None)
    r.add_argument("--slo-percentile", type=float, default=None, help="share of requests (%%) that must meet it")
    o = s.add_argument_group("output")
    o.add_argument("--plot", metavar="PNG", help="demand against replicas over time, one panel per setting")
    o.add_argument("--json", metavar="FILE", help="every result, its scale events and timeline")
    o.add_argument("--events", type=int, default=10, metavar="N", help="scale events shown per setting")


def parse_value(text: str):
    """A --set value as YAML reads it: 4 -> int, 0.5 -> float, null -> None, else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def settings_grid(named: dict[str, dict], sets: list[str], source: str = "--settings") -> dict[str, AutoscalingConfig]:
    """Every named block crossed with every combination of the --set values, validated."""
    axes: list[tuple[str, list]] = []
    for item in sets:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise UsageError(f"--set {item!r}: write KEY=V1,V2,...")
        if key not in AutoscalingConfig.model_fields:
            raise UsageError(
                f"--set {item!r}: {key!r} is not an autoscaling key (keys: {', '.join(AutoscalingConfig.model_fields)})"
            )
        axes.append((key, [parse_value(v) for v in values.split(",")]))
    combos = math.prod(len(vals) for _, vals in axes) * max(1, len(named or {}))
    if combos > MAX_SETTINGS:
        raise UsageError(f"{combos} settings to compare (blocks x --set values): at most {MAX_SETTINGS}")
    out: dict[str, AutoscalingConfig] = {}
    for name, block in (named or {"default": {}}).items():
        for combo in itertools.product(*(vals for _, vals in axes)):
            doc = {**block, **{k: v for (k, _), v in zip(axes, combo)}}
            label = " ".join(f"{k}={v}" for (k, _), v in zip(axes, combo))
            full = name if not label else (label if name == "default" and not named else f"{name} {label}")
            try:
                out[full] = AutoscalingConfig.model_validate(doc)
            except ValidationError as e:
                from serving.config import format_validation_error

                raise UsageError(format_validation_error(e, f"{source}: setting {full!r}", AutoscalingConfig)) from None
    return out


def load_settings_file(path: str) -> dict[str, dict]:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not YAML: {e}") from None
    if not isinstance(doc, dict) or not doc or not all(isinstance(v, dict) for v in doc.values()):
        raise UsageError(f"{path}: expected named autoscaling blocks: {{name: {{min_replicas: 1, ...}}, ...}}")
    return {str(k): v for k, v in doc.items()}


def _epoch(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--start {text!r}: not an ISO date-time (e.g. 2026-01-05T09:00:00+00:00)") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()


def _trace(args):
    from serving.autoscaling import traces

    epoch = _epoch(args.start)
    if args.trace:
        return traces.read_jsonl(args.trace, epoch if epoch is not None else traces.DEFAULT_EPOCH)
    if args.audit:
        t = traces.read_audit(args.audit, args.model)
        if epoch is not None:
            t.epoch = epoch
        return t
    lengths = {"spread": args.length_spread, "dist": args.length_dist}
    try:
        return traces.generate(
            args.generate,
            args.rate,
            args.duration,
            args.seed,
            burstiness=args.burstiness,
            period_s=args.period_s,
            amplitude=args.amplitude,
            prompt=traces.Lengths(args.prompt_tokens, **lengths),
            output=traces.Lengths(args.output_tokens, low=1, **lengths),
            epoch=epoch if epoch is not None else traces.DEFAULT_EPOCH,
        )
    except ValueError as e:
        raise UsageError(f"--generate {args.generate}: {e}") from None


def run(args) -> int:
    from rich.console import Console

    from serving.autoscaling import report
    from serving.autoscaling.calibrate import SLO, CalibrationError, calibrate
    from serving.autoscaling.simulate import simulate
    from serving.autoscaling.traces import TraceError, write_jsonl

    def fail(msg: str) -> int:
        print(f"keel autoscale simulate: {msg}", file=sys.stderr)
        return 2

    try:
        named = load_settings_file(args.settings) if args.settings else {}
        grid = settings_grid(named, args.set, args.settings or "--set")
        model, bench_slo, _ = calibrate(
            args.bench,
            args.bench_setting,
            cold_start_s=args.cold_start_s,
            price=args.price,
            max_concurrency=args.max_concurrency,
            kv_cache_tokens=args.kv_cache_tokens,
        )
        trace = _trace(args)
    except (UsageError, CalibrationError, TraceError) as e:
        return fail(str(e))
    slo = SLO(
        *(
            flag if flag is not None else getattr(bench_slo, key)
            for flag, key in (
                (args.slo_ttft_ms, "ttft_ms"),
                (args.slo_tpot_ms, "tpot_ms"),
                (args.slo_e2el_ms, "e2el_ms"),
                (args.slo_percentile, "percentile"),
            )
        )
    )
    if args.write_trace:
        write_jsonl(trace, args.write_trace)
    print(
        f"trace: {trace.source}: {len(trace.requests)} requests over {trace.duration:.0f} s; "
        f"replica: max {model.max_concurrency} at once, cold start {model.cold_start_s:g} s, "
        f"{model.price_per_replica_hour:g} {model.currency}/h"
    )
    results = []
    for name, settings in grid.items():
        try:
            results.append(simulate(trace, model, settings, slo, name))
        except ValueError as e:
            return fail(f"setting {name!r}: {e}")
    # wide enough for the longest setting's name: a table piped to a file is not cut
    Console(width=max(Console().width, 112 + max(len(r.name) for r in results))).print(report.table(results, slo))
    for note in dict.fromkeys(n for r in results for n in r.notes):
        print(f"note: {note}")
    if args.events:
        for r in results:
            print(f"scale events, {r.name}:\n{report.events_text(r, args.events)}")
    if args.plot:
        print(f"plot: {report.plot(results, args.plot, trace.source)}")
    if args.json:
        meta = {
            "bench": args.bench,
            "trace": trace.source,
            "requests": len(trace.requests),
            "command": "keel " + " ".join(getattr(args, "argv", []) or sys.argv[1:]),
        }
        print(f"json: {report.write_json(results, slo, args.json, meta)}")
    best = report.cheapest(results)
    if best is None:
        print(
            f"No setting met the SLO ({slo.describe()}): try a higher max_replicas, a lower target, "
            "or a shorter panic window."
        )
        return 0
    print(f"\nThe cheapest setting that meets the SLO: {best.name}\n")
    print(report.paste_block(best, slo), end="", flush=True)
    return 0
