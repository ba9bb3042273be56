"""`keel slo rules CONFIG` writes the Prometheus rules for the config's SLOs (and their promtool
tests, and an example prometheus.yml); `keel slo status --prometheus URL [CONFIG]` prints the
budget left and burn rates a Prometheus server running them sees."""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_OUT = "deploy/prometheus"
DEFAULT_PROMETHEUS = "http://127.0.0.1:9090"


def add_parser(sub) -> None:
    p = sub.add_parser("slo", help="SLOs: generate Prometheus rules and alerts, show budget left")
    slo_sub = p.add_subparsers(dest="slo_cmd", required=True)
    r = slo_sub.add_parser("rules", help="write recording rules, burn-rate alerts, promtool tests, prometheus.yml")
    r.add_argument("config", help="the Keel config (its `slos:`)")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"directory to write to (default {DEFAULT_OUT})")
    r.add_argument(
        "--interval", default=None, help="rule evaluation interval of the groups (default: Prometheus' global one)"
    )
    r.add_argument(
        "--target", default=None, help="HOST:PORT prometheus.yml scrapes (default: the config's metrics listener)"
    )
    s = slo_sub.add_parser("status", help="budget left, SLIs, burn rates and alerts from a Prometheus server")
    s.add_argument("config", nargs="?", default=None, help="limit to this config's SLOs (default: all found)")
    s.add_argument("--prometheus", default=DEFAULT_PROMETHEUS, help=f"Prometheus URL (default {DEFAULT_PROMETHEUS})")


def run(args) -> int:
    from serving.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, check_engine_args=False) if args.config else None
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.slo_cmd == "rules":
        return _rules(args, cfg)
    return _status(args, cfg)


def _rules(args, cfg) -> int:
    from serving.ops.slo_config import duration_s
    from serving.ops.slo_rules import write_all

    if not cfg.slos:
        print(f"{args.config}: no `slos:` to make rules for", file=sys.stderr)
        return 2
    if args.interval is not None:
        try:
            duration_s(args.interval)
        except ValueError as e:
            print(f"--interval: {e}", file=sys.stderr)
            return 2
    s = cfg.server
    target = args.target or f"{s.metrics_host if s.metrics_port else s.host}:{s.metrics_port or s.port}"
    paths = write_all(cfg.slos, Path(args.out), target, args.interval)
    for name, slo in cfg.slos.items():
        alerts = ", ".join(f"{a.severity} {a.long_window}/{a.short_window} {a.factor:g}x" for a in slo.burn_alerts)
        print(
            f"{name}: {slo.kind} {slo.objective:g} over {slo.window} ({', '.join(slo.models)}"
            f"{', per tenant' if slo.per_tenant else ''}); alerts: {alerts}"
        )
    for p in paths:
        print(f"wrote {p}")
    print(f"check: promtool check rules {paths[0]} && promtool test rules {' '.join(map(str, paths[2:]))}")
    if not s.metrics_port and not args.target:
        print(
            f"note: {paths[1]} scrapes the API port; with tenants, /metrics there needs an admin key: "
            "set server.metrics_port",
            file=sys.stderr,
        )
    return 0


def _status(args, cfg) -> int:
    from rich.console import Console
    from rich.table import Table

    from serving.ops.slo_status import PrometheusError, collect, table_rows

    try:
        rows = collect(args.prometheus, cfg.slos if cfg is not None else None)
    except PrometheusError as e:
        print(f"keel slo status: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"no SLO series in {args.prometheus}: load the rules from `keel slo rules` and let it scrape the gateway")
        return 1
    header, cells = table_rows(rows)
    table = Table(title=f"SLOs at {args.prometheus}")
    for h in header:
        table.add_column(h, justify="right" if h.startswith(("burn", "SLI", "budget", "objective")) else "left")
    for c in cells:
        table.add_row(*c)
    Console(width=max(120, 14 * len(header))).print(table)
    return 0
