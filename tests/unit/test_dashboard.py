"""The Grafana dashboard: generated, valid PromQL, only metrics Keel exports, a loadable model."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from grafana_foundation_sdk.models.dashboard import Dashboard

from serving.cli import main
from serving.config import REPO_ROOT, ConfigError, load_config
from serving.gateway.metrics import GatewayMetrics
from serving.ops.cost_config import CostConfig
from serving.ops.dashboard import (
    SLO_WINDOWS,
    all_panels,
    build_dashboard,
    dashboard_json,
    expand,
    panel_queries,
    replica_hour_prices,
)
from serving.ops.slo_events import SloJudge

LOCAL = REPO_ROOT / "configs" / "local.yaml"
COMMITTED = REPO_ROOT / "deploy" / "grafana" / "keel.json"
# The SLO part's recording rules (`keel slo rules`; the objective series is recorded beside them).
SLO_RULES = {f"keel:slo_errors:ratio_rate{w}" for w in SLO_WINDOWS} | {
    "keel:slo_error_budget_remaining:ratio",
    "keel:slo_objective:ratio",
}
PROMETHEUS_BUILTIN = {"ALERTS"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


@pytest.fixture(scope="module")
def cfg():
    return load_config(LOCAL, check_engine_args=False)


@pytest.fixture(scope="module")
def dash(cfg):
    return build_dashboard(cfg)


def _promtool_check(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make setup` installs Debian's prometheus package"
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [{"record": f"keel:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)],
                    }
                ]
            }
        )
    )
    return subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (strings, matchers, ranges and label lists cut)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", e):
        if m.group() in _KEYWORDS or e[m.end() :].lstrip().startswith("("):
            continue  # a keyword, a function or an aggregation
        names.add(m.group())
    return names


def exported_metric_names() -> set[str]:
    """Series names the gateway's registry exposes, plus the vLLM engine's (from vLLM's own source)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    metrics = GatewayMetrics()
    metrics.use_slos(SloJudge({}))  # the TTFT/TPOT histograms: made with the first policy's SLOs
    names = {f.name + s for f in metrics.registry.collect() for s in suffixes.get(f.type, ("",))}
    spec = importlib.util.find_spec("vllm")
    assert spec and spec.origin, "vllm is not installed (make setup)"
    loggers = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    found = re.findall(r"_(counter|gauge|histogram)_cls\(\s*name=\"(vllm:\w+)\"", loggers)
    assert len(found) > 10, "vLLM's metric definitions moved: update exported_metric_names"
    names |= {n + s for kind, n in found for s in suffixes[kind]}
    return names


def test_committed_dashboard_is_what_keel_dashboard_writes(tmp_path, capsys):
    out = tmp_path / "keel.json"
    assert main(["dashboard", str(LOCAL), "--out", str(out)]) == 0
    assert "panels" in capsys.readouterr().out
    assert out.read_text() == COMMITTED.read_text(), (
        "deploy/grafana/keel.json is stale: run `keel dashboard configs/local.yaml`"
    )


def test_out_dash_prints_the_dashboard(capsys):
    assert main(["dashboard", str(LOCAL), "--out", "-"]) == 0
    assert capsys.readouterr().out == COMMITTED.read_text()


def test_every_panel_query_is_valid_promql(dash, tmp_path):
    queries = panel_queries(dash)
    assert len(queries) >= 30
    result = _promtool_check(queries, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promql_check_catches_a_broken_query(tmp_path):
    result = _promtool_check(["sum by (model) (rate(keel_requests_total[1m])"], tmp_path)
    assert result.returncode != 0 and "parse error" in result.stdout + result.stderr


def test_every_metric_a_panel_reads_is_one_keel_exports(dash):
    used = set().union(*(metric_names(q) for q in panel_queries(dash)))
    assert {"keel_requests_total", "vllm:num_requests_running", "keel:slo_errors:ratio_rate1h"} <= used
    known = exported_metric_names() | SLO_RULES | PROMETHEUS_BUILTIN
    assert used - known == set()


def test_metric_names_reads_names_not_functions_or_labels():
    expr = (
        'sum by (model, le) (rate(vllm:x_bucket{model_name=~"a(@.+)?"}[1m])) / on (model) '
        'group_left () max by (model) (keel_y{model="z"}) or ALERTS'
    )
    assert metric_names(expr) == {"vllm:x_bucket", "keel_y", "ALERTS"}


def test_dashboard_loads_as_a_grafana_dashboard_model(dash):
    data = json.loads(dashboard_json(dash))
    assert data["schemaVersion"] >= 39 and data["uid"] == "keel"
    back = Dashboard.from_json(data)
    assert dashboard_json(back) == dashboard_json(dash)  # the SDK's model reads every field back
    panels = all_panels(back)
    ids = [p.id_val for p in panels]
    assert None not in ids and len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p.grid_pos
        assert g.w > 0 and g.h > 0 and g.x >= 0 and g.x + g.w <= 24, (p.title, g.to_json())
        mine = {(x, y) for x in range(g.x, g.x + g.w) for y in range(g.y, g.y + g.h)}
        assert not mine & cells, f"panel {p.title!r} overlaps another"
        cells |= mine


def test_rows_cover_every_part_of_the_stack(dash):
    rows = [p.title for p in all_panels(dash) if p.type_val == "row"]
    assert rows == [
        "Request path",
        "Engines",
        "Quotas",
        "Guardrails",
        "Experiments and rollouts",
        "SLOs",
        "Cost",
        "Anomalies",
    ]


def test_template_variables_pick_datasource_model_and_tenant(dash):
    variables = {v.name: v for v in dash.templating.list_val}
    assert set(variables) == {"datasource", "model", "tenant"}
    assert variables["datasource"].query == "prometheus"
    for name in ("model", "tenant"):
        assert variables[name].query == f"label_values(keel_requests_total, {name})"
        assert variables[name].multi and variables[name].include_all and variables[name].all_value == ".*"
    for p in all_panels(dash):
        if p.type_val != "row":
            assert p.datasource.uid == "${datasource}"
    assert any('tenant=~"$tenant"' in t.expr for p in all_panels(dash) for t in getattr(p, "targets", None) or [])


def test_panel_queries_expand_grafana_variables(dash):
    assert all("$" not in q for q in panel_queries(dash))
    one = panel_queries(dash, {"model": "demo", "tenant": "acme"})
    assert any('model=~"demo", tenant=~"acme"' in q for q in one)
    assert expand("rate(x[$__rate_interval]) * ${__range_s}") == "rate(x[1m]) * 3600"
    with pytest.raises(ValueError, match=r"\$nope"):
        expand('x{a=~"$nope"}')


def _cost_queries(dash) -> list[str]:
    cost = next(p for p in all_panels(dash) if p.title.startswith("Cost per hour by model"))
    return [t.expr for t in cost.targets]


def test_cost_prices_the_cpu_demo_model_as_the_cpu_profile(dash):
    assert _cost_queries(dash) == ['sum by (model) (max by (model) (keel_engine_replicas_ready{model="demo"}) * 0.05)']


def test_without_costs_gpu_models_are_priced_by_their_tensor_parallel_size(tmp_path):
    raw = yaml.safe_load(LOCAL.read_text())
    raw.pop("costs", None)
    raw["models"]["big"] = {
        **raw["models"]["demo"],
        "engine": {"tensor_parallel_size": 2},
        "deployment": {"num_replicas": 1, "num_gpus": 2},
    }
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(raw))
    prices = replica_hour_prices(load_config(tmp_path / "gpu.yaml", check_engine_args=False))
    assert (prices["demo"].profile, prices["demo"].per_replica_hour) == ("cpu-2core", 0.05)
    assert (prices["big"].profile, prices["big"].per_replica_hour) == ("h100-80gb-tp2", 5.0)


def _with_costs(cfg, **costs):
    return cfg.model_copy(update={"costs": CostConfig(**costs)})


def test_costs_block_names_the_profile_and_token_weights(cfg):
    priced = _with_costs(cfg, hardware={"demo": "h100-80gb"}, token_weights={"prompt": 0.5, "completion": 2.0})
    dash = build_dashboard(priced)
    assert "* 2.5)" in _cost_queries(dash)[0]
    tenant = next(p for p in all_panels(dash) if p.title.startswith("Cost per hour by tenant"))
    assert '* 2 + sum by (tenant, model) (rate(keel_tokens_total{kind="prompt"' in tenant.targets[0].expr
    assert "* 0.5)" in tenant.targets[0].expr


def test_costs_block_naming_an_unknown_profile_is_a_clear_error(cfg):
    with pytest.raises(ConfigError, match="no hardware profile `tpu-v9`.*cpu-2core"):
        replica_hour_prices(_with_costs(cfg, hardware={"demo": "tpu-v9"}))


def test_models_with_no_price_are_named_in_the_cost_panels(cfg):
    dash = build_dashboard(_with_costs(cfg, hardware={}))  # no default_hardware: demo gets no price
    cost = next(p for p in all_panels(dash) if p.title.startswith("Cost per hour by model"))
    assert cost.targets in (None, []) and "Not priced: demo" in cost.description


def test_bad_config_is_refused_with_the_key_path(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(LOCAL.read_text().replace("port: 8000", "port: 99999"))
    assert main(["dashboard", str(bad), "--out", str(tmp_path / "x.json")]) == 2
    assert "server.port" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_provisioning_loads_the_dashboard_file_with_a_prometheus_datasource(dash):
    prov = REPO_ROOT / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "keel-prometheus.yaml").read_text())["datasources"]
    variable = next(v for v in dash.templating.list_val if v.name == "datasource")
    assert source["type"] == variable.query == "prometheus" and source["isDefault"] is True
    (provider,) = yaml.safe_load((prov / "dashboards" / "keel.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    readme = (REPO_ROOT / "deploy" / "grafana" / "README.md").read_text()
    assert provider["options"]["path"] in readme  # where the README copies keel.json


def _promtool_test(
    tmp_path: Path, series: dict[str, str], checks: list[tuple[str, str, list[dict]]], rules: Path | None = None
):
    """`promtool test rules` with synthetic series: each (expr, eval_time, expected samples)."""
    (tmp_path / "none.yml").write_text("groups: []\n")
    tests = {
        "rule_files": [str(rules) if rules else "none.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "promql_expr_test": [{"expr": e, "eval_time": t, "exp_samples": exp} for e, t, exp in checks],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "test", "rules", "tests.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _query(dash, title: str, i: int = 0) -> str:
    panel = next(p for p in all_panels(dash) if p.title == title)
    return expand(panel.targets[i].expr, {"__rate_interval": "5m"})


def test_cost_per_tenant_splits_the_model_cost_by_weighted_tokens(cfg, tmp_path):
    dash = build_dashboard(_with_costs(cfg, hardware={"demo": "h100-80gb"}))
    # demo: 1 replica (two gateways report it: counted once) x 2.50/h. Tokens per second:
    # a: 1 completion + 4 prompt -> 1 + 4 x 0.25 = 2; b: 6 completion -> 6. Shares 1/4 and 3/4.
    series = {
        'keel_engine_replicas_ready{instance="g1", model="demo"}': "1x20",
        'keel_engine_replicas_ready{instance="g2", model="demo"}': "1x20",
    }
    for tenant, completion, prompt in (("a", 60, 240), ("b", 360, 0)):
        for kind, per_min in (("completion", completion), ("prompt", prompt)):
            labels = f'tenant="{tenant}", model="demo", variant="demo", kind="{kind}"'
            series[f"keel_tokens_total{{{labels}}}"] = f"0+{per_min}x20"
    _promtool_test(
        tmp_path,
        series,
        [
            (_query(dash, "Cost per hour by model (USD)"), "10m", [{"labels": '{model="demo"}', "value": 2.5}]),
            (
                _query(dash, "Cost per hour by tenant (USD)"),
                "10m",
                [{"labels": '{tenant="a"}', "value": 0.625}, {"labels": '{tenant="b"}', "value": 1.875}],
            ),
        ],
    )


def test_cost_over_the_range_is_replica_hours_times_price(dash, tmp_path):
    # 2 replicas for the whole hour at 0.05 per replica-hour: 0.10.
    _promtool_test(
        tmp_path,
        {'keel_engine_replicas_ready{model="demo"}': "2x90"},
        [(_query(dash, "Cost over the time range (USD)"), "80m", [{"labels": '{model="demo"}', "value": 0.1}])],
    )


def test_error_ratio_and_traffic_share_by_variant(dash, tmp_path):
    # candidate: 1 req/s, all 500; stable: 3 req/s 200 and 1 req/s 499 (the client's, left out).
    base = 'tenant="t", model="demo"'
    series = {
        f'keel_requests_total{{{base}, variant="demo", status="200"}}': "0+180x20",
        f'keel_requests_total{{{base}, variant="demo", status="499"}}': "0+60x20",
        f'keel_requests_total{{{base}, variant="demo@candidate", status="500"}}': "0+60x20",
    }
    _promtool_test(
        tmp_path,
        series,
        [
            (
                _query(dash, "Error ratio (5xx)"),
                "10m",
                [
                    {"labels": '{model="demo", variant="demo"}', "value": 0},
                    {"labels": '{model="demo", variant="demo@candidate"}', "value": 1},
                ],
            ),
            (
                _query(dash, "Traffic share by variant"),
                "10m",
                [
                    {"labels": '{model="demo", variant="demo"}', "value": 0.8},
                    {"labels": '{model="demo", variant="demo@candidate"}', "value": 0.2},
                ],
            ),
        ],
    )


def test_burn_rate_is_the_error_ratio_over_the_error_budget(dash, tmp_path):
    # Objective 0.9375 (a budget of 0.0625, exact in binary, so promtool's exact compare holds),
    # as `keel slo rules` records it; each SLO is divided by its own budget.
    series = {
        'keel:slo_objective:ratio{slo="avail", kind="availability", window="28d"}': "0.9375x5",
        'keel:slo_objective:ratio{slo="ttft", kind="ttft", window="28d"}': "0.5x5",
        'keel:slo_errors:ratio_rate1h{slo="avail", model="demo"}': "0.9x5",
        'keel:slo_errors:ratio_rate1h{slo="ttft", model="demo", tenant="a"}': "0.25x5",
    }
    _promtool_test(
        tmp_path,
        series,
        [
            (
                _query(dash, "Burn rate", 1),
                "2m",
                [
                    {"labels": '{slo="avail", model="demo"}', "value": 14.4},
                    {"labels": '{slo="ttft", model="demo", tenant="a"}', "value": 0.5},
                ],
            )
        ],
    )


def test_burn_rate_panel_reads_the_rules_keel_slo_rules_writes(dash, tmp_path):
    # deploy/prometheus's rules for local.yaml: demo-availability, objective 0.99. 9 bad in 60
    # events a minute: an error ratio of 0.15, 15 times the budget (rounded: 1 - 0.99 is inexact).
    rules = REPO_ROOT / "deploy" / "prometheus" / "keel-slo-rules.yaml"
    series = {
        'keel_slo_events_total{slo="demo-availability", model="demo", tenant="demo", good="false"}': "0+9x120",
        'keel_slo_events_total{slo="demo-availability", model="demo", tenant="demo", good="true"}': "0+51x120",
    }
    _promtool_test(
        tmp_path,
        series,
        [
            (
                f"round({_query(dash, 'Burn rate', 1)}, 0.001)",
                "90m",
                [{"labels": '{slo="demo-availability", model="demo"}', "value": 15}],
            )
        ],
        rules=rules,
    )
