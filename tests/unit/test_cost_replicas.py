"""The gateway records its view of each model's replicas in the audit log, for `keel cost`."""

from __future__ import annotations

import json

from serving.gateway.policy import PolicyRuntime
from serving.gateway.server import Gateway, GatewaySettings
from serving.ops.replica_time import ReplicaCensus
from serving.policy.config import PolicyConfig


def endpoints(**counts: int) -> dict[str, list[dict]]:
    return {
        m: [{"replica_id": f"{m}-{i}", "host": "127.0.0.1", "port": 9000 + i} for i in range(n)]
        for m, n in counts.items()
    }


def replica_records(gw: Gateway) -> list[tuple[str, int]]:
    gw.runtime.audit_log.flush()
    lines = gw.runtime.audit_log.path.read_bytes().split(b"\n")
    return [(r["model"], r["ready"]) for r in map(json.loads, filter(None, lines)) if r.get("event") == "replicas"]


def test_the_gateway_writes_a_replicas_record_when_the_ready_set_changes(tmp_path):
    gw = Gateway(GatewaySettings(port=0), ["demo", "big"], None)
    gw.update_endpoints(endpoints(demo=1))  # before a policy: no audit log yet
    gw.set_policy(PolicyRuntime(PolicyConfig.model_validate({"audit": {"dir": str(tmp_path)}}), {}, gw.metrics))
    try:
        gw.update_endpoints(endpoints(demo=1))  # the same: nothing new
        gw.update_endpoints(endpoints(demo=2, big=1))
        gw.update_endpoints(endpoints(big=1))  # demo scaled to zero
        assert replica_records(gw) == [("demo", 1), ("big", 1), ("demo", 2), ("demo", 0)]
    finally:
        gw.runtime.close()


def test_a_new_audit_log_starts_with_every_models_count(tmp_path):
    gw = Gateway(GatewaySettings(port=0), ["demo"], None)
    gw.update_endpoints(endpoints(demo=3))
    gw.set_policy(PolicyRuntime(PolicyConfig.model_validate({"audit": {"dir": str(tmp_path / "a")}}), {}, gw.metrics))
    first = gw.runtime
    gw.set_policy(
        PolicyRuntime(
            PolicyConfig.model_validate({"audit": {"dir": str(tmp_path / "b")}}), {}, gw.metrics, previous=first
        )
    )
    try:
        assert replica_records(gw) == [("demo", 3)]
    finally:
        gw.runtime.close()


def test_the_census_refreshes_unchanged_counts_so_a_stopped_stack_goes_stale():
    census = ReplicaCensus(refresh_s=600)
    assert [r["ready"] for r in census.observe({"demo": 2}, 1000.0)] == [2]
    assert census.observe({"demo": 2}, 1500.0) == []
    assert [(r["model"], r["ready"]) for r in census.observe({"demo": 2}, 1600.0)] == [("demo", 2)]
    assert census.observe({}, 1700.0)[0]["ready"] == 0
    assert census.observe({}, 9000.0) == []  # a model at zero is not re-written
