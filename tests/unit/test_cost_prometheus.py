"""Replica-time from a Prometheus range query (`keel cost report --prometheus URL`)."""

from __future__ import annotations

import httpx
import pytest

from serving.cli import main
from serving.ops.prometheus_replicas import QUERY, PrometheusError, replica_time

T0 = 1_790_000_000 // 3600 * 3600  # an hour boundary


def prometheus(result: list[dict], seen: list | None = None, status: int = 200) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(dict(request.url.params))
        if status != 200:
            return httpx.Response(status, json={"status": "error", "error": "bad query"})
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": result}})

    return httpx.MockTransport(answer)


def test_each_sample_counts_for_one_step_into_its_hour():
    # one sample a minute: 2 replicas for the first 90 minutes, then 1 for 30
    values = [[T0 + 60 * i, "2" if i < 90 else "1"] for i in range(120)]
    seen = []
    rt = replica_time(
        "http://prom:9090", T0, T0 + 7200, prometheus([{"metric": {"model": "demo"}, "values": values}], seen)
    )
    assert seen[0]["query"] == QUERY and seen[0]["step"] == "60"
    assert rt.seconds["demo"] == {T0: pytest.approx(2 * 3600), T0 + 3600: pytest.approx(2 * 1800 + 1 * 1800)}
    assert rt.unobserved_s == 0


def test_missing_samples_are_unobserved_time_and_a_long_period_widens_the_step():
    seen = []
    rt = replica_time("http://prom:9090", T0, T0 + 30 * 86400, prometheus([], seen))
    assert int(seen[0]["step"]) == 260  # 30 days in at most 10,000 points
    assert rt.unobserved_s == 30 * 86400


def test_a_prometheus_error_names_the_server():
    with pytest.raises(PrometheusError, match="http://prom:9090: 400 bad query"):
        replica_time("http://prom:9090", T0, T0 + 60, prometheus([], status=400))


def test_an_unreachable_prometheus_is_a_clear_cli_error(tmp_path, capsys):
    from tests.unit.test_cost import HAND_RECORDS, write_audit

    write_audit(tmp_path / "audit", HAND_RECORDS)
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(f"models: {{demo: {{weights: demo-tiny}}}}\naudit: {{dir: {tmp_path / 'audit'}}}\n")
    assert main(["cost", "report", str(cfg), "--prometheus", "http://127.0.0.1:1"]) == 2
    assert "http://127.0.0.1:1: no answer" in capsys.readouterr().err
