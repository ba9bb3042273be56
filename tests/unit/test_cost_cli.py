"""`keel cost report` and `keel cost forecast` as a user runs them."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from serving.cli import main
from tests.unit.test_cost import HAND_RECORDS, at, request, write_audit


@pytest.fixture
def config(tmp_path):
    (tmp_path / "hardware.yaml").write_text("small: {price_per_replica_hour: 2.0, currency: USD}\n")
    path = tmp_path / "keel.yaml"
    path.write_text(f"""
models: {{demo: {{weights: demo-tiny}}}}
tenants:
  acme: {{quotas: {{tokens_per_day: 1000}}}}
  beta: {{}}
audit: {{dir: {tmp_path / "audit"}}}
costs: {{hardware_file: hardware.yaml, hardware: {{demo: small}}, budgets: {{beta: 1.0}}}}
""")
    return str(path)


def test_report_prints_the_hand_computed_costs_as_json(config, tmp_path, capsys):
    write_audit(tmp_path / "audit", HAND_RECORDS)
    # the refresh records a gateway writes every 10 minutes, so the counts stay valid to 13:00
    write_audit(
        tmp_path / "audit",
        [
            {
                "event": "replicas",
                "time": (at(10) + dt.timedelta(minutes=m)).isoformat(),
                "model": "demo",
                "ready": 2 if m < 120 else 1,
            }
            for m in range(10, 180, 10)
        ],
    )
    rc = main(["cost", "report", config, "--since", "3h", "--until", at(13).isoformat(), "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert {line["tenant"]: line["cost"] for line in out["lines"]} == {"acme": 5.0, "beta": 3.0}
    assert out["unallocated"] == {"demo": 2.0} and out["total"]["cost"] == 10.0
    assert out["replica_hours"] == {"demo": 5.0} and out["unobserved_hours"] == 0


def test_report_table_lists_tenants_idle_time_and_the_total(config, tmp_path, capsys):
    write_audit(tmp_path / "audit", HAND_RECORDS)
    assert main(["cost", "report", config, "--since", "3h", "--until", at(13).isoformat()]) == 0
    out = capsys.readouterr().out
    # No refresh records: each count holds 15 minutes only, so hour 11 (acme's alone) costs nothing
    # and beta, 3/4 of hour 10's tokens, comes first.
    assert [line.split()[0] for line in out.splitlines()[3:7]] == ["beta", "acme", "(unallocated)", "total"]
    assert "no replica record for 2.50 h of the period" in out


@pytest.mark.parametrize("since", ["30", "30x", "0d", "-1d", "4000d"])
def test_a_bad_since_is_refused_with_the_accepted_form(config, since, capsys):
    assert main(["cost", "report", config, f"--since={since}"]) == 2
    assert "--since" in capsys.readouterr().err


def test_no_audit_files_is_an_error_not_an_empty_report(config, tmp_path, capsys):
    (tmp_path / "audit").mkdir()
    assert main(["cost", "report", config]) == 2
    assert "no audit files" in capsys.readouterr().err


def test_forecast_with_days_of_history_is_flat_says_so_and_flags_quota_and_budget(config, tmp_path, capsys):
    today = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    records = []
    for d in range(1, 4):
        day = today - dt.timedelta(days=d)
        records += [
            {"event": "replicas", "time": (day + dt.timedelta(minutes=m)).isoformat(), "model": "demo", "ready": 1}
            for m in range(0, 1440, 10)
        ]
        records += [
            request(day + dt.timedelta(hours=9), "acme", 1500, 500),
            request(day + dt.timedelta(hours=10), "beta", 100, 100),
        ]
    write_audit(tmp_path / "audit", records)
    assert main(["cost", "forecast", config, "--horizon", "30d", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_tenant = {t["tenant"]: t for t in out["tenants"]}
    assert by_tenant["acme"]["cost"]["method"] == "flat: 3 days of history (< 14)"
    assert by_tenant["acme"]["flags"] == ["tokens/day forecast 2,000 passes quota 1,000"]
    assert by_tenant["beta"]["flags"] == ["forecast passes budget 1.00"]
    # one replica at 2.00 an hour, all day: 48.00 a day, 1,440 in 30 days
    assert out["total_cost"]["total"] == pytest.approx(1440.0)


def test_forecast_horizon_must_be_whole_days(config, capsys):
    assert main(["cost", "forecast", config, "--horizon", "12h"]) == 2
    assert "whole days" in capsys.readouterr().err


def test_forecast_without_requests_in_the_history_says_so(config, tmp_path, capsys):
    write_audit(tmp_path / "audit", HAND_RECORDS)  # 2 November: before the 7 days fitted on
    assert main(["cost", "forecast", config, "--history", "7d"]) == 2
    assert "no requests with tokens in the last 7 full days" in capsys.readouterr().err
