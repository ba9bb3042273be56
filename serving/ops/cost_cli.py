"""`keel cost report` and `keel cost forecast`: cost per tenant from the audit log, and next month's.

The audit log is the source (serving.ops.usage): it holds every request with its exact tokens
for as long as its files are kept, and the gateways' replica counts (serving.ops.replica_time).
Prometheus counters restart at 0 with each gateway and Prometheus keeps 15 days by default,
less than the month a report covers.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from pathlib import Path

DAY_S = 86_400
MAX_SINCE_DAYS = 3660  # ten years of audit log
_DURATION = re.compile(r"(\d+)([mhdw])")
_UNIT_S = {"m": 60, "h": 3600, "d": DAY_S, "w": 7 * DAY_S}


class CostCliError(ValueError):
    """Bad arguments or unreadable input; str() is what the user reads."""


def add_parser(sub) -> None:
    from serving.cli import DEFAULT_CONFIG

    p = sub.add_parser("cost", help="cost per tenant from the audit log (report) and a forecast")
    csub = p.add_subparsers(dest="cost_cmd", required=True)
    r = csub.add_parser(
        "report",
        help="per tenant and model: requests, tokens, cost, cost per million "
        "tokens; idle replica time as (unallocated)",
    )
    f = csub.add_parser(
        "forecast",
        help="daily cost and tokens per tenant, fitted with trend + weekly "
        "season, summed over a horizon with an interval; flags quotas and budgets passed",
    )
    for c in (r, f):
        c.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
        c.add_argument("--audit-dir", default=None, help="audit files to read (default: the config's audit.dir)")
        c.add_argument("--format", choices=("table", "json"), default="table")
        c.add_argument(
            "--prometheus",
            metavar="URL",
            default=None,
            help="replica-time from this Prometheus (avg keel_engine_replicas_ready) instead of "
            "the audit log's replica records, e.g. for logs older than those records",
        )
    r.add_argument("--since", default="30d", help="period: the last N m|h|d|w (default 30d)")
    r.add_argument("--until", default=None, help="end of the period, ISO 8601 (default: now)")
    f.add_argument("--horizon", default="30d", help="days to forecast: N d|w (default 30d, at most 366d)")
    f.add_argument("--history", default="90d", help="days of history to fit on (default 90d)")
    f.add_argument("--level", type=float, default=0.9, help="interval coverage (default 0.9)")


def parse_duration(text: str, what: str) -> float:
    """'30d' -> seconds; CostCliError for anything else."""
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) == 0:
        raise CostCliError(f"{what} {text!r}: give a whole number and a unit, e.g. 30d, 12h, 4w, 90m")
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds > MAX_SINCE_DAYS * DAY_S:
        raise CostCliError(f"{what} {text!r}: at most {MAX_SINCE_DAYS} days")
    return float(seconds)


def run(args) -> int:
    from serving.config import ConfigError
    from serving.ops.usage import UsageError

    try:
        if args.cost_cmd == "report":
            return _report(args)
        return _forecast(args)
    except (CostCliError, UsageError, ConfigError) as e:
        print(f"keel cost: {e}", file=sys.stderr)
        return 2


def _setup(args):
    from serving.config import load_config

    cfg = load_config(args.config, check_engine_args=False)
    audit_dir = Path(args.audit_dir) if args.audit_dir else Path(cfg.audit.dir)
    return cfg, audit_dir


def _allocate(cfg, audit_dir: Path, since: float, until: float, config_path: str, prometheus: str | None):
    from serving.ops.cost import allocate, load_prices
    from serving.ops.replica_time import integrate
    from serving.ops.usage import read_usage

    usage = read_usage(audit_dir, since, until)
    if prometheus:
        from serving.ops.prometheus_replicas import PrometheusError, replica_time

        try:
            replicas = replica_time(prometheus, since, until)
        except PrometheusError as e:
            raise CostCliError(str(e)) from None
    else:
        replicas = integrate(usage.replica_events, since, until)
    models = {m for (_, m, _) in usage.tokens} | set(replicas.seconds)
    prices, notes = load_prices(cfg.costs, models, base=Path(config_path).parent)
    alloc = allocate(usage, cfg.costs, prices, replicas)
    if prometheus:
        notes.append(f"replica-time from Prometheus {prometheus}, not the audit log's replica records")
    alloc.notes[:0] = notes
    return usage, alloc


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _report(args) -> int:
    from serving.ops.cost import report

    span = parse_duration(args.since, "--since")
    if args.until:
        try:
            until_dt = dt.datetime.fromisoformat(args.until)
        except ValueError:
            raise CostCliError(f"--until {args.until!r}: not an ISO 8601 time (e.g. 2026-12-01T00:00Z)") from None
        until = (until_dt if until_dt.tzinfo else until_dt.replace(tzinfo=dt.timezone.utc)).timestamp()
    else:
        until = time.time()
    cfg, audit_dir = _setup(args)
    usage, alloc = _allocate(cfg, audit_dir, until - span, until, args.config, args.prometheus)
    rep = report(usage, alloc)
    if args.format == "json":
        print(json.dumps(_report_json(rep, usage, audit_dir), indent=2))
    else:
        print(_report_table(rep, usage, audit_dir))
    return 0


def _line_json(line) -> dict:
    return {
        "tenant": line.tenant,
        "model": line.model,
        "requests": line.requests,
        "prompt_tokens": line.prompt_tokens,
        "completion_tokens": line.completion_tokens,
        "cost": round(line.cost, 6),
        "cost_per_million_tokens": None if line.cost_per_million is None else round(line.cost_per_million, 6),
    }


def _report_json(rep, usage, audit_dir: Path) -> dict:
    a = rep.allocation
    total = _line_json(rep.total)
    del total["tenant"], total["model"]
    return {
        "since": _iso(usage.since),
        "until": _iso(usage.until),
        "audit_dir": str(audit_dir),
        "files": usage.files,
        "currency": a.currency,
        "lines": [_line_json(line) for line in rep.lines],
        "unallocated": {m: round(c, 6) for m, c in sorted(rep.idle.items())},
        "total": total,
        "replica_hours": {m: round(h, 4) for m, h in a.replica_hours.items()},
        "prices": {m: {"profile": p.profile, "per_replica_hour": p.per_replica_hour} for m, p in a.prices.items()},
        "unobserved_hours": round(a.unobserved_s / 3600, 4),
        "skipped": usage.skipped,
        "notes": a.notes,
    }


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _table(header: list[str], rows: list[list[str]], left=(0, 1)) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _money(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


def _report_table(rep, usage, audit_dir: Path) -> str:
    a = rep.allocation
    cur = a.currency or "?"
    out = [
        f"keel cost report: {_utc(usage.since)} .. {_utc(usage.until)} "
        f"({(usage.until - usage.since) / DAY_S:.1f} days), from the audit log {audit_dir} ({usage.files} files)"
    ]
    rows = [
        [
            ln.tenant,
            ln.model,
            f"{ln.requests:,}",
            f"{ln.prompt_tokens:,}",
            f"{ln.completion_tokens:,}",
            _money(ln.cost),
            _money(ln.cost_per_million),
        ]
        for ln in rep.lines
    ]
    rows += [["(unallocated)", m, "-", "-", "-", _money(c), "-"] for m, c in sorted(rep.idle.items())]
    t = rep.total
    rows.append(
        [
            "total",
            "",
            f"{t.requests:,}",
            f"{t.prompt_tokens:,}",
            f"{t.completion_tokens:,}",
            _money(t.cost),
            _money(t.cost_per_million),
        ]
    )
    out.append(
        _table(
            ["tenant", "model", "requests", "prompt tokens", "completion tokens", f"cost ({cur})", f"{cur} / M tokens"],
            rows,
        )
    )
    prices = ", ".join(
        f"{m} {a.replica_hours.get(m, 0):,.1f} replica-h x {p.per_replica_hour:g} ({p.profile})"
        for m, p in a.prices.items()
    )
    out.append(
        f"replica time: {prices or 'none priced'}; (unallocated) = replica hours in which the "
        f"model served no tokens (costs.idle: unallocated)"
    )
    if a.unobserved_s >= 60:  # float dust below that
        out.append(
            f"no replica record for {a.unobserved_s / 3600:,.2f} h of the period (no gateway running, "
            "or before the records existed): counted as 0 replicas"
        )
    for why, n in sorted(usage.skipped.items()):
        out.append(f"skipped {n:,} records: {why}")
    out += [f"note: {n}" for n in a.notes]
    return "\n".join(out)


def _forecast(args) -> int:
    import numpy as np

    from serving.ops.forecast import forecast

    horizon_s = parse_duration(args.horizon, "--horizon")
    history_s = parse_duration(args.history, "--history")
    if horizon_s % DAY_S or history_s % DAY_S:
        raise CostCliError("--horizon and --history are whole days (e.g. 30d, 4w)")
    horizon = int(horizon_s // DAY_S)
    if horizon > 366:
        raise CostCliError(f"--horizon {args.horizon!r}: at most 366d")
    if not 0.5 <= args.level < 1:
        raise CostCliError(f"--level {args.level}: between 0.5 and 1")
    cfg, audit_dir = _setup(args)
    until = time.time() // DAY_S * DAY_S  # whole days only: today so far would look like a drop
    usage, alloc = _allocate(cfg, audit_dir, until - history_s, until, args.config, args.prometheus)
    days = int(history_s // DAY_S)
    day0 = until - history_s
    cost: dict[str, np.ndarray] = {}  # tenant -> daily cost
    tokens: dict[str, np.ndarray] = {}
    total = np.zeros(days)
    for (tenant, _, hour), amount in alloc.cost.items():
        cost.setdefault(tenant, np.zeros(days))[int((hour - day0) // DAY_S)] += amount
    for (_, hour), amount in alloc.idle.items():
        total[int((hour - day0) // DAY_S)] += amount
    for (tenant, _, hour), (_, prompt, completion) in usage.tokens.items():
        tokens.setdefault(tenant, np.zeros(days))[int((hour - day0) // DAY_S)] += prompt + completion
    for series in cost.values():
        total += series
    used = [s for s in tokens.values() if s.any()]
    if not used:
        raise CostCliError(f"{audit_dir}: no requests with tokens in the last {days} full days")
    first_any = min(int(np.flatnonzero(s)[0]) for s in used)
    rows = []
    budgets, horizon_share = cfg.costs.budgets, horizon / 30
    for tenant in sorted(tokens, key=lambda t: -cost.get(t, np.zeros(1)).sum()):
        tok = tokens[tenant]
        start = int(np.flatnonzero(tok)[0]) if tok.any() else first_any
        fc = forecast(cost.get(tenant, np.zeros(days))[start:], horizon, args.level)
        ft = forecast(tok[start:], horizon, args.level)
        flags = []
        tc = cfg.tenants.get(tenant)
        quota = tc.quotas.tokens_per_day if tc is not None else None
        if quota is not None:
            if ft.peak > quota:
                flags.append(f"tokens/day forecast {ft.peak:,.0f} passes quota {quota:,}")
            elif ft.daily_upper.max() > quota:
                flags.append(f"tokens/day may pass quota {quota:,} (interval up to {ft.daily_upper.max():,.0f})")
        if tenant in budgets:
            budget = budgets[tenant] * horizon_share
            if fc.total > budget:
                flags.append(f"forecast passes budget {budget:,.2f}")
            elif fc.upper > budget:
                flags.append(f"may pass budget {budget:,.2f}")
        rows.append((tenant, fc, ft, flags))
    ftotal = forecast(total[first_any:], horizon, args.level)
    if args.format == "json":
        print(json.dumps(_forecast_json(rows, ftotal, alloc, usage, horizon, args.level), indent=2))
    else:
        print(_forecast_table(rows, ftotal, alloc, usage, horizon, args.level, audit_dir))
    return 0


def _fc_json(f) -> dict:
    return {
        "method": f.method,
        "history_days": f.history_days,
        "total": round(f.total, 4),
        "lower": round(f.lower, 4),
        "upper": round(f.upper, 4),
        "peak_day": round(f.peak, 4),
    }


def _forecast_json(rows, ftotal, alloc, usage, horizon: int, level: float) -> dict:
    return {
        "from": _iso(usage.until),
        "horizon_days": horizon,
        "level": level,
        "currency": alloc.currency,
        "tenants": [
            {"tenant": t, "cost": _fc_json(fc), "tokens": _fc_json(ft), "flags": flags} for t, fc, ft, flags in rows
        ],
        "total_cost": _fc_json(ftotal),
        "notes": alloc.notes,
    }


def _forecast_table(rows, ftotal, alloc, usage, horizon: int, level: float, audit_dir: Path) -> str:
    cur = alloc.currency or "?"
    end = usage.until + horizon * DAY_S
    out = [
        f"keel cost forecast: {_utc(usage.until)[:10]} .. {_utc(end)[:10]} ({horizon} days), fitted on "
        f"daily cost and tokens from the audit log {audit_dir}; {level:.0%} intervals"
    ]
    table = [
        [
            t,
            fc.method,
            str(fc.history_days),
            _money(fc.total),
            f"{_money(fc.lower)} .. {_money(fc.upper)}",
            f"{ft.peak:,.0f}",
            "; ".join(flags) or "-",
        ]
        for t, fc, ft, flags in rows
    ]
    table.append(
        [
            "total",
            ftotal.method,
            str(ftotal.history_days),
            _money(ftotal.total),
            f"{_money(ftotal.lower)} .. {_money(ftotal.upper)}",
            "",
            "incl. (unallocated) idle",
        ]
    )
    out.append(
        _table(
            ["tenant", "method", "days", f"cost ({cur})", "interval", "peak tokens/day", "flags"], table, left=(0, 1, 6)
        )
    )
    out.append(
        "method: of the cost series (--format json has the tokens' too); flat below 14 days of "
        "history, where a weekly season cannot be told from noise. The total is fitted on its own "
        "series: its interval is not the sum of the tenants'."
    )
    out += [f"note: {n}" for n in alloc.notes]
    return "\n".join(out)
