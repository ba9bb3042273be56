"""`keel slo rules`: the rules Prometheus' own promtool accepts, whose alerts fire on the
synthetic series they must fire on and stay quiet on the others; and deploy/prometheus/ is what
the command makes from configs/local.yaml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.cli import main as keel
from serving.config import REPO_ROOT
from serving.ops.slo_config import SloConfig
from serving.ops.slo_rules import RULES_FILE, promtool_tests, rules_doc, write_all

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: `make prometheus` installs it")
FAST = {
    "kind": "availability",
    "objective": 0.9,
    "window": "1h",
    "alerts": [
        {"severity": "page", "long_window": "2m", "short_window": "20s", "factor": 5},
        {"severity": "ticket", "long_window": "10m", "short_window": "1m", "factor": 2},
    ],
}


def slos(**entries) -> dict[str, SloConfig]:
    return {n: SloConfig.model_validate(e) for n, e in entries.items()}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_name_every_window_budget_and_alert():
    doc = rules_doc(slos(avail={"kind": "availability", "objective": 0.99}))
    (group,) = doc["groups"]
    records = [r["record"] for r in group["rules"] if "record" in r]
    assert records == ["keel:slo_objective:ratio"] + [
        f"keel:slo_errors:ratio_rate{w}" for w in ("5m", "30m", "1h", "2h", "6h", "1d", "3d", "28d")
    ] + ["keel:slo_error_budget_remaining:ratio"]
    alerts = [r for r in group["rules"] if "alert" in r]
    assert [(a["labels"]["severity"], a["labels"]["long_window"]) for a in alerts] == [
        ("page", "1h"),
        ("page", "6h"),
        ("ticket", "1d"),
        ("ticket", "3d"),
    ]
    assert alerts[0]["expr"] == (
        'keel:slo_errors:ratio_rate1h{slo="avail"} > (14.4 * (1 - 0.99))\nand\n'
        'keel:slo_errors:ratio_rate5m{slo="avail"} > (14.4 * (1 - 0.99))'
    )
    assert "budget lasts 46.7 hours" in alerts[0]["annotations"]["description"]


def test_per_tenant_slo_keeps_the_tenant_label():
    (group,) = rules_doc(slos(t={**FAST, "per_tenant": True}))["groups"]
    assert "sum by (slo, model, tenant)" in group["rules"][1]["expr"]


@needs_promtool
def test_promtool_accepts_the_rules_and_their_tests_pass(tmp_path):
    write_all(
        slos(fast=FAST, tenants={**FAST, "per_tenant": True, "kind": "ttft", "threshold_ms": 500}),
        tmp_path,
        "127.0.0.1:8001",
    )
    check = promtool("check", "rules", RULES_FILE, cwd=tmp_path)
    assert check.returncode == 0 and "SUCCESS: 22 rules found" in check.stdout, check.stdout + check.stderr
    tests = sorted(p.name for p in tmp_path.glob("keel-slo-rules.test-*.yaml"))
    assert tests == ["keel-slo-rules.test-1m.yaml", "keel-slo-rules.test-20s.yaml"]
    result = promtool("test", "rules", *tests, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_promtool_tests_fail_when_an_alert_is_wrong(tmp_path):
    write_all(slos(fast=FAST), tmp_path, "127.0.0.1:8001")
    rules = tmp_path / RULES_FILE
    # a page that waits for a 6x burn instead of 5x: the "fires at 5% over the limit" case catches it
    rules.write_text(rules.read_text().replace("(5 * (1 - 0.9))", "(6 * (1 - 0.9))"))
    result = promtool("test", "rules", "keel-slo-rules.test-20s.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "KeelSLOBurnRate" in result.stdout + result.stderr


def test_each_alert_has_a_firing_and_two_quiet_cases():
    docs = promtool_tests(slos(fast=FAST))
    cases = [c for d in docs.values() for c in d["tests"]]
    assert len(cases) == 2 * 3
    fired = [c["alert_rule_test"][0]["exp_alerts"] for c in cases if "alert_rule_test" in c]
    # 5% over the page's limit (0.5) is over the ticket's (0.2) too; 5% over the ticket's is not the page's
    assert [sorted(a["exp_labels"]["severity"] for a in f) for f in fired] == [["page", "ticket"], ["ticket"]]


def test_deploy_prometheus_is_what_keel_slo_rules_makes_of_local_yaml(tmp_path, capsys):
    assert keel(["slo", "rules", str(REPO_ROOT / "configs" / "local.yaml"), "--out", str(tmp_path)]) == 0
    assert "demo-availability: availability 0.99 over 28d" in capsys.readouterr().out
    shipped = REPO_ROOT / "deploy" / "prometheus"
    for made in tmp_path.iterdir():
        assert (shipped / made.name).read_text() == made.read_text(), (
            f"{made.name} is stale: run `keel slo rules configs/local.yaml`"
        )
    prom = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:8001"]


def test_rules_refuses_a_config_without_slos(tmp_path, capsys):
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    del cfg["slos"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert keel(["slo", "rules", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "no `slos:`" in capsys.readouterr().err


@needs_promtool
def test_promtool_accepts_the_shipped_rules():
    result = promtool("check", "rules", RULES_FILE, cwd=REPO_ROOT / "deploy" / "prometheus")
    assert result.returncode == 0 and "SUCCESS: 42 rules found" in result.stdout, result.stdout + result.stderr
