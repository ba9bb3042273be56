"""The Grafana dashboard of a Keel stack, built with Grafana's foundation SDK (its typed builders).

`build_dashboard(cfg)` is plain data in, a dashboard model out: the config only adds what it
knows (each model's price for the cost panels); every other panel reads the metric names
the gateway exports (serving/gateway/metrics.py), the engines' vllm:* families relabelled with
`replica`, the SLO recording rules (`keel slo rules`) and the anomaly gauges.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    Dashboard,
    DashboardCursorSync,
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)

from serving.bench.spec import DEFAULT_HARDWARE_FILE
from serving.config import KeelConfig, read_yaml
from serving.ops.cost import Price, load_prices

UID = "keel"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")  # keel:slo_errors:ratio_rate<W>
BURN_WINDOWS = ("5m", "1h", "6h", "3d")  # the short and long windows of the default alerts
PERCENTILES = (0.5, 0.9, 0.99)
# What panel_queries puts for each Grafana variable: every model and tenant, a 1 h range.
DEFAULT_VALUES = {
    "model": ".*",
    "tenant": ".*",
    "__rate_interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__interval": "15s",
}

M = 'model=~"$model"'
MT = 'model=~"$model", tenant=~"$tenant"'
T = 'tenant=~"$tenant"'
ENGINE = 'model_name=~"$model(@.+)?"'  # candidates' engines serve as MODEL@candidate
RATE = "$__rate_interval"


# ---------------------------------------------------------------------------------------------
# What the config adds: prices


def replica_hour_prices(
    cfg: KeelConfig, hardware_file: str | Path | None = None, base: Path | None = None
) -> dict[str, Price]:
    """Each model's price per replica-hour, as `keel cost` prices it (serving.ops.cost.load_prices):
    `costs.hardware` / `costs.default_hardware` name a profile of the hardware file (`keel bench`'s
    profiles); a model under neither has no price. A config without a `costs:` block is priced as
    its deployments look: no GPU -> cpu-2core, GPUs -> h100-80gb (-tpN for tensor_parallel_size
    N), where the file has that profile. `base`: the config's folder (a relative hardware_file)."""
    costs = cfg.costs
    if hardware_file is not None:
        costs = costs.model_copy(update={"hardware_file": str(Path(hardware_file).resolve())})
    if "costs" not in cfg.model_fields_set:
        path = Path(costs.hardware_file) if costs.hardware_file else DEFAULT_HARDWARE_FILE
        known = read_yaml(path)
        guess = {m: _profile_for_deployment(mc) for m, mc in cfg.models.items()}
        costs = costs.model_copy(
            update={"hardware": {m: p for m, p in guess.items() if isinstance(known, dict) and p in known}}
        )
    return load_prices(costs, set(cfg.models), base)[0]


def _profile_for_deployment(mc) -> str:
    if not mc.deployment.num_gpus:
        return "cpu-2core"
    tp = int(mc.engine.get("tensor_parallel_size", 1) or 1)
    return "h100-80gb" if tp == 1 else f"h100-80gb-tp{tp}"


# ---------------------------------------------------------------------------------------------
# Panels


class _Grid:
    """Hands out unique panel ids and lays panels out row by row (the SDK places them)."""

    def __init__(self, board: gd.Dashboard):
        self.board = board
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self.board.with_row(gd.Row(title).id(self._id()))

    def panel(
        self,
        builder,
        title: str,
        description: str,
        queries: list[tuple[str, str]],
        *,
        unit: str = "short",
        width: int = 12,
        height: int = 8,
    ) -> None:
        builder.id(self._id()).title(title).description(description).datasource(DS).unit(unit)
        builder.span(width).height(height)
        for i, (expr, legend) in enumerate(queries):
            q = prometheus.Dataquery().expr(expr).ref_id(chr(ord("A") + i)).datasource(DS)
            builder.with_target(q.legend_format(legend) if legend else q)
        self.board.with_panel(builder)

    def series(self, *args, **kw) -> None:
        self.panel(timeseries.Panel().fill_opacity(10), *args, **kw)

    def stat(self, *args, **kw) -> None:
        kw.setdefault("width", 6)
        kw.setdefault("height", 5)
        self.panel(stat.Panel(), *args, **kw)


def _quantiles(metric: str, by: str, selector: str) -> list[tuple[str, str]]:
    legend = " / ".join("{{" + label + "}}" for label in by.split(", "))
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {legend}",
        )
        for q in PERCENTILES
    ]


def _request_path(g: _Grid) -> None:
    g.row("Request path")
    # 5xx over all but 499; a variant with no 5xx series reads 0, not "no data".
    answered = f'sum by (model, variant) (rate(keel_requests_total{{status!="499", {MT}}}[{RATE}]))'
    g.series(
        "Requests per second",
        "Requests answered by the gateway, by model and variant (the deployment that served it).",
        [(f"sum by (model, variant) (rate(keel_requests_total{{{MT}}}[{RATE}]))", "{{model}} / {{variant}}")],
        unit="reqps",
    )
    g.series(
        "Responses by status",
        "All answers by HTTP status (429: quota, 499: the client went away first, 503: no capacity).",
        [(f"sum by (status) (rate(keel_requests_total{{{MT}}}[{RATE}]))", "{{status}}")],
        unit="reqps",
    )
    g.series(
        "Error ratio (5xx)",
        "Share of answers that were 5xx, by model and variant (499s left out: the client's doing).",
        [
            (
                f'(sum by (model, variant) (rate(keel_requests_total{{status=~"5..", {MT}}}[{RATE}])) or '
                f"0 * {answered}) / {answered}",
                "{{model}} / {{variant}}",
            )
        ],
        unit="percentunit",
    )
    g.series(
        "Time to first token",
        "p50/p90/p99 by model and variant (streamed requests; the gateway's "
        "histogram, buckets bracket the SLO thresholds).",
        _quantiles("keel_time_to_first_token_seconds", "model, variant", M),
        unit="s",
    )
    g.series(
        "Time per output token",
        "p50/p90/p99 by model and variant: (end - first token) / (completion tokens - 1).",
        _quantiles("keel_time_per_output_token_seconds", "model, variant", M),
        unit="s",
    )
    g.series(
        "End-to-end latency",
        "p50/p90/p99 from request received to response end, by model (this gateway histogram has no variant label).",
        _quantiles("keel_request_duration_seconds", "model", M),
        unit="s",
    )
    g.series(
        "In flight and held",
        "Requests relayed to an engine and not finished; requests held while a model scaled to zero starts.",
        [
            (f"sum by (model) (keel_requests_in_flight{{{M}}})", "in flight {{model}}"),
            (f"sum by (model) (keel_requests_held{{{M}}})", "held {{model}}"),
        ],
    )
    g.series(
        "Tokens per second by tenant",
        "Prompt and completion tokens as the engines reported them.",
        [(f"sum by (tenant, kind) (rate(keel_tokens_total{{{MT}}}[{RATE}]))", "{{tenant}} {{kind}}")],
    )


def _engines(g: _Grid) -> None:
    g.row("Engines")
    g.series(
        "Running requests per replica",
        "vLLM's requests in the batch, per engine replica.",
        [(f"sum by (model_name, replica) (vllm:num_requests_running{{{ENGINE}}})", "{{model_name}} {{replica}}")],
    )
    g.series(
        "Waiting requests per replica",
        "vLLM's queue, per engine replica.",
        [(f"sum by (model_name, replica) (vllm:num_requests_waiting{{{ENGINE}}})", "{{model_name}} {{replica}}")],
    )
    g.series(
        "KV cache usage per replica",
        "Share of the KV cache blocks in use (1 = full).",
        [(f"max by (model_name, replica) (vllm:kv_cache_usage_perc{{{ENGINE}}})", "{{model_name}} {{replica}}")],
        unit="percentunit",
    )
    g.series(
        "Tokens per second per replica",
        "Generated and prompt tokens per second, per engine replica.",
        [
            (
                f"sum by (model_name, replica) (rate(vllm:generation_tokens_total{{{ENGINE}}}[{RATE}]))",
                "generated {{model_name}} {{replica}}",
            ),
            (
                f"sum by (model_name, replica) (rate(vllm:prompt_tokens_total{{{ENGINE}}}[{RATE}]))",
                "prompt {{model_name}} {{replica}}",
            ),
        ],
    )
    g.series(
        "Replicas ready",
        "Engine replicas the gateways can route to (max over gateways: each reports its own view).",
        [(f"max by (model) (keel_engine_replicas_ready{{{M}}})", "{{model}}")],
        width=24,
        height=6,
    )


def _quotas_and_guardrails(g: _Grid) -> None:
    g.row("Quotas")
    g.series(
        "Quota rejections",
        "429s by tenant and the limit that refused them.",
        [(f"sum by (tenant, limit) (rate(keel_quota_rejections_total{{{T}}}[{RATE}]))", "{{tenant}} {{limit}}")],
        unit="reqps",
        width=8,
    )
    g.series(
        "Reserved tokens",
        "Tokens reserved by requests in flight and not yet settled.",
        [(f"sum by (tenant) (keel_quota_reserved_tokens{{{T}}})", "{{tenant}}")],
        width=8,
    )
    g.series(
        "Quota backend errors",
        "Requests that found the quota backend (Redis) unreachable, by what happened to them.",
        [(f"sum by (mode) (rate(keel_quota_backend_errors_total[{RATE}]))", "{{mode}}")],
        unit="reqps",
        width=8,
    )
    g.row("Guardrails")
    g.series(
        "Guardrail actions by guardrail",
        "Hits per second by guardrail, direction and action.",
        [
            (
                f"sum by (guardrail, direction, action) (rate(keel_guardrail_actions_total{{{T}}}[{RATE}]))",
                "{{guardrail}} {{direction}} {{action}}",
            )
        ],
    )
    g.series(
        "Guardrail actions by tenant",
        "Hits per second by tenant and action.",
        [(f"sum by (tenant, action) (rate(keel_guardrail_actions_total{{{T}}}[{RATE}]))", "{{tenant}} {{action}}")],
    )


def _variants(g: _Grid) -> None:
    g.row("Experiments and rollouts")
    g.series(
        "Traffic share by variant",
        "Each variant's share of its model's requests (a rollout's candidate is MODEL@candidate).",
        [
            (
                f"sum by (model, variant) (rate(keel_requests_total{{{MT}}}[{RATE}])) / ignoring (variant) "
                f"group_left () sum by (model) (rate(keel_requests_total{{{MT}}}[{RATE}]))",
                "{{model}} / {{variant}}",
            )
        ],
        unit="percentunit",
    )
    g.series(
        "Tokens by variant",
        "Tokens per second by variant and kind.",
        [(f"sum by (model, variant, kind) (rate(keel_tokens_total{{{MT}}}[{RATE}]))", "{{variant}} {{kind}}")],
    )
    g.series(
        "Engine TTFT p95 by variant",
        "The engines' own time to first token, by the name they serve under (what the rollout gates judge).",
        [
            (
                f"histogram_quantile(0.95, sum by (le, model_name) "
                f"(rate(vllm:time_to_first_token_seconds_bucket{{{ENGINE}}}[{RATE}])))",
                "{{model_name}}",
            )
        ],
        unit="s",
    )
    g.series(
        "Shadow requests",
        "Mirrored requests to an experiment's shadow variant, by status.",
        [
            (
                f"sum by (model, variant, status) (rate(keel_shadow_requests_total{{{M}}}[{RATE}]))",
                "{{variant}} {{status}}",
            )
        ],
        unit="reqps",
    )


def _slos(g: _Grid) -> None:
    g.row("SLOs")
    g.stat(
        "Error budget left",
        "Share of each SLO's error budget left over its window (keel:slo_error_budget_remaining:ratio).",
        [(f"keel:slo_error_budget_remaining:ratio{{{M}}}", "{{slo}} {{model}} {{tenant}}")],
        unit="percentunit",
        width=8,
        height=8,
    )
    g.series(
        "SLO error ratio by window",
        "Bad events over all events, per recording-rule window.",
        [
            (f"keel:slo_errors:ratio_rate{w}{{{M}}}", "{{slo}} {{model}} {{tenant}} " + w)
            for w in ("5m", "1h", "6h", "1d")
        ],
        unit="percentunit",
        width=8,
        height=8,
    )
    # The objective comes from the rules (keel:slo_objective:ratio), so a changed `slos:` needs
    # new rules only, not a new dashboard.
    g.series(
        "Burn rate",
        "Error ratio over the error budget (1 - objective): 1 spends the budget "
        "exactly over the SLO window; the page alerts fire at 14.4 (1h and 5m) and 6 (6h and 30m).",
        [
            (
                f"keel:slo_errors:ratio_rate{w}{{{M}}} / on (slo) group_left () (1 - keel:slo_objective:ratio)",
                "{{slo}} {{model}} {{tenant}} " + w,
            )
            for w in BURN_WINDOWS
        ],
        width=8,
        height=8,
    )
    g.series(
        "Burn-rate alerts firing",
        "KeelSLOBurnRate alerts firing, by SLO and severity.",
        [('sum by (slo, severity) (ALERTS{alertname="KeelSLOBurnRate", alertstate="firing"})', "{{slo}} {{severity}}")],
        width=24,
        height=6,
    )


def _cost(g: _Grid, prices: dict[str, Price], weights: dict[str, float], unpriced: list[str]) -> None:
    g.row("Cost")
    currency = next(iter(prices.values())).currency if prices else "USD"
    priced = (
        ", ".join(
            f"{m}: {p.profile} at {p.per_replica_hour:g} {p.currency}/replica-hour" for m, p in sorted(prices.items())
        )
        or "no model priced"
    )
    note = f" Prices: {priced}." + (f" Not priced: {', '.join(unpriced)}." if unpriced else "")
    if not prices:
        g.series("Cost per hour by model", "Nothing to show." + note, [], width=24)
        return
    # Replicas ready (max over gateways) x price: cost per hour while replicas run, idle or not.
    # Over the range: a subquery stepped by $__interval (as many points as the panel is wide).
    per_model = " or ".join(
        f'max by (model) (keel_engine_replicas_ready{{model="{m}"}}) * {p.per_replica_hour:g}'
        for m, p in sorted(prices.items())
    )
    over_range = " or ".join(
        f'avg_over_time(max by (model) (keel_engine_replicas_ready{{model="{m}"}})[$__range:$__interval]) '
        f"* {p.per_replica_hour:g}"
        for m, p in sorted(prices.items())
    )
    g.stat(
        f"Cost over the time range ({currency})",
        "Replica-hours in the dashboard's time range x price per replica-hour, by model." + note,
        [(f"sum by (model) ({over_range}) * $__range_s / 3600", "{{model}}")],
        unit="none",
        width=8,
        height=8,
    )
    g.series(
        f"Cost per hour by model ({currency})",
        "Replicas ready x price per replica-hour, whether they serve or idle." + note,
        [(f"sum by (model) ({per_model})", "{{model}}")],
        unit="none",
        width=8,
        height=8,
    )
    wc, wp = weights["completion"], weights["prompt"]
    share = (
        f'(sum by (tenant, model) (rate(keel_tokens_total{{kind="completion", {MT}}}[{RATE}])) * {wc:g} + '
        f'sum by (tenant, model) (rate(keel_tokens_total{{kind="prompt", {MT}}}[{RATE}])) * {wp:g})'
    )
    total = (
        f'(sum by (model) (rate(keel_tokens_total{{kind="completion", {M}}}[{RATE}])) * {wc:g} + '
        f'sum by (model) (rate(keel_tokens_total{{kind="prompt", {M}}}[{RATE}])) * {wp:g})'
    )
    g.series(
        f"Cost per hour by tenant ({currency})",
        f"Each model's cost per hour split by the tenants' "
        f"share of its tokens (completion x {wc:g} + prompt x {wp:g}); while no tokens flow the cost "
        "is idle and stays unallocated (see by model)." + note,
        [
            (
                f"sum by (tenant) ({share} / on (model) group_left () {total} * on (model) group_left () "
                f"sum by (model) ({per_model}))",
                "{{tenant}}",
            )
        ],
        unit="none",
        width=8,
        height=8,
    )


def _anomalies(g: _Grid) -> None:
    g.row("Anomalies")
    g.series(
        "Active anomalies",
        "1 while a signal of a tenant and model is outside its own recent behaviour (keel_anomaly_active).",
        [(f"max by (tenant, model, signal) (keel_anomaly_active{{{MT}}})", "{{tenant}} {{model}} {{signal}}")],
        width=16,
    )
    g.stat(
        "Anomalies in the time range",
        "Anomalies detected, by signal.",
        [(f"sum by (signal) (increase(keel_anomalies_total{{{MT}}}[$__range]))", "{{signal}}")],
        width=8,
        height=8,
    )


# ---------------------------------------------------------------------------------------------
# The dashboard


def _variables(board: gd.Dashboard) -> None:
    board.with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    for name, label in (("model", "Model"), ("tenant", "Tenant")):
        board.with_variable(
            gd.QueryVariable(name)
            .label(label)
            .datasource(DS)
            .query(f"label_values(keel_requests_total, {name})")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )


def build_dashboard(cfg: KeelConfig, hardware_file: str | Path | None = None, base: Path | None = None) -> Dashboard:
    prices = replica_hour_prices(cfg, hardware_file, base)
    board = (
        gd.Dashboard("Keel")
        .uid(UID)
        .tags(["keel", "llm-serving"])
        .editable()
        .description(
            "Keel's request path, engines, quotas, guardrails, variants, SLOs, cost and "
            "anomalies. Generated by `keel dashboard`; edit the generator, not this JSON."
        )
        .time("now-3h", "now")
        .refresh("30s")
        .tooltip(DashboardCursorSync.CROSSHAIR)
    )
    _variables(board)
    g = _Grid(board)
    _request_path(g)
    _engines(g)
    _quotas_and_guardrails(g)
    _variants(g)
    _slos(g)
    weights = {"completion": cfg.costs.token_weights.completion, "prompt": cfg.costs.token_weights.prompt}
    _cost(g, prices, weights, sorted(set(cfg.models) - set(prices)))
    _anomalies(g)
    return board.build()


def dashboard_json(dashboard: Dashboard) -> str:
    """The provisioning-ready JSON file's text."""
    return json.dumps(dashboard, cls=JSONEncoder, indent=2) + "\n"


def all_panels(dashboard: Dashboard) -> list:
    """Every panel, rows included, and the panels inside collapsed rows."""
    out = []
    for p in dashboard.panels or []:
        out.append(p)
        out.extend(getattr(p, "panels", None) or [])
    return out


_VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def expand(expr: str, values: dict[str, str] | None = None) -> str:
    """A panel's PromQL with Grafana's variables put in (default: every model and tenant, 1 h range)."""
    values = {**DEFAULT_VALUES, **(values or {})}

    def put(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise ValueError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VAR.sub(put, expr)


def panel_queries(dashboard: Dashboard, values: dict[str, str] | None = None) -> list[str]:
    """Every panel's PromQL, variables expanded, ready for a Prometheus /api/v1/query."""
    return [
        expand(t.expr, values)
        for p in all_panels(dashboard)
        for t in (getattr(p, "targets", None) or [])
        if getattr(t, "expr", None)
    ]
