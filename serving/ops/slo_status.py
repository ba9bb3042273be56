"""`keel slo status`: the SLOs as a Prometheus server running `keel slo rules` sees them.

Reads the recording rules (objective, error ratio per window, budget left) and the burn-rate
alerts through the HTTP API (/api/v1/query) and turns them into one row per SLO and model
(and tenant): plain data, rendered as a table by the command.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import httpx

from serving.ops.slo_config import SloConfig, duration_s
from serving.ops.slo_rules import ALERT, BUDGET_RULE, OBJECTIVE_RULE

QUERY_TIMEOUT_S = 10.0
_ERRORS = re.compile(r"^keel:slo_errors:ratio_rate(\d+[smhdw])$")


class PrometheusError(Exception):
    """Prometheus could not be reached or refused a query; the message says which and why."""


def query(url: str, promql: str, timeout_s: float = QUERY_TIMEOUT_S) -> list[dict]:
    """An instant query's result vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
    endpoint = url.rstrip("/") + "/api/v1/query"
    try:
        r = httpx.get(endpoint, params={"query": promql}, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise PrometheusError(f"cannot reach Prometheus at {url}: {e or type(e).__name__}") from None
    try:
        body = r.json()
    except ValueError:
        raise PrometheusError(
            f"{endpoint} answered {r.status_code} with no JSON: is {url} a Prometheus server?"
        ) from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus refused `{promql}`: {body.get('error', r.status_code)}")
    return body["data"]["result"]


@dataclass
class SloRow:
    slo: str
    model: str
    tenant: str | None
    kind: str
    objective: float
    window: str
    sli: float | None = None  # the share of good events over the window
    budget_left: float | None = None  # 1 = untouched, 0 = spent, < 0 = overspent
    burn: dict[str, float] = field(default_factory=dict)  # rate window -> burn rate (1 = on budget)
    alerts: list[str] = field(default_factory=list)  # "page 1h/5m firing"


def _value(sample: dict) -> float:
    return float(sample["value"][1])


def _key(metric: dict) -> tuple[str, str, str | None]:
    return metric.get("slo", ""), metric.get("model", ""), metric.get("tenant")


def collect(url: str, slos: dict[str, SloConfig] | None = None) -> list[SloRow]:
    """One row per SLO series Prometheus has. `slos` (from a config) limits the SLOs shown and
    names those with no series yet; without it the objectives come from the recording rules."""
    objectives = {}
    for s in query(url, OBJECTIVE_RULE):
        m = s["metric"]
        objectives[m.get("slo", "")] = (m.get("kind", "?"), _value(s), m.get("window", "?"))
    if slos is not None:
        objectives = {n: (s.kind, s.objective, s.window) for n, s in slos.items()}
    rows: dict[tuple, SloRow] = {}

    def row(metric: dict) -> SloRow | None:
        key = _key(metric)
        if key[0] not in objectives:
            return None
        if key not in rows:
            kind, objective, window = objectives[key[0]]
            rows[key] = SloRow(key[0], key[1], key[2], kind, objective, window)
        return rows[key]

    for s in query(url, '{__name__=~"keel:slo_errors:ratio_rate.+"}'):
        m = _ERRORS.match(s["metric"].get("__name__", ""))
        r = row(s["metric"])
        if m is None or r is None:
            continue
        ratio = _value(s)
        if m.group(1) == r.window:
            r.sli = None if math.isnan(ratio) else 1 - ratio
        else:
            r.burn[m.group(1)] = ratio / (1 - r.objective)
    for s in query(url, BUDGET_RULE):
        r = row(s["metric"])
        if r is not None:
            v = _value(s)
            r.budget_left = None if math.isnan(v) else v
    for s in query(url, f'ALERTS{{alertname="{ALERT}"}}'):
        m = s["metric"]
        r = row(m)
        if r is not None:
            r.alerts.append(
                f"{m.get('severity', '?')} {m.get('long_window', '?')}/{m.get('short_window', '?')} "
                f"{m.get('alertstate', '?')}"
            )
    missing = [n for n in objectives if not any(k[0] == n for k in rows)]
    out = sorted(rows.values(), key=lambda r: (r.slo, r.model, r.tenant or ""))
    for n in missing:
        kind, objective, window = objectives[n]
        out.append(SloRow(n, "-", None, kind, objective, window))
    return out


def burn_windows(rows: list[SloRow]) -> list[str]:
    return sorted({w for r in rows for w in r.burn}, key=duration_s)


def _pct(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _burn(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.2f}x"


def table_rows(rows: list[SloRow]) -> tuple[list[str], list[list[str]]]:
    """The header and cells `keel slo status` prints."""
    windows = burn_windows(rows)
    tenants = any(r.tenant is not None for r in rows)
    header = [
        "slo",
        "model",
        *(["tenant"] if tenants else []),
        "kind",
        "objective",
        "window",
        "SLI",
        "budget left",
        *[f"burn {w}" for w in windows],
        "alerts",
    ]
    cells = []
    for r in rows:
        cells.append(
            [
                r.slo,
                r.model,
                *([r.tenant or "-"] if tenants else []),
                r.kind,
                _pct(r.objective),
                r.window,
                _pct(r.sli),
                _pct(r.budget_left, 1),
                *[_burn(r.burn.get(w)) for w in windows],
                ", ".join(r.alerts) or "-",
            ]
        )
    return header, cells
