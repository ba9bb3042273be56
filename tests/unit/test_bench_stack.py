"""How `keel bench` turns a Keel config into the stack it starts for one setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.bench.spec import BenchSpec, SettingSpec
from serving.bench.stack import _ephemeral_range, free_port, keel_doc
from serving.config import parse_config

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "configs" / "local.yaml"


def test_a_setting_overrides_engine_arguments_and_fixes_the_replica_count(tmp_path):
    src = yaml.safe_load(LOCAL.read_text())
    dep = src["models"]["demo"].setdefault("deployment", {})
    dep.pop("num_replicas", None)
    dep["autoscaling"] = {"min_replicas": 1, "max_replicas": 3}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(src))
    doc = keel_doc(path, 18123, model="demo", engine={"max_num_seqs": 4}, replicas=2)
    cfg = parse_config(doc, check_engine_args=False)
    demo = cfg.models["demo"]
    assert cfg.server.port == 18123
    assert demo.engine["max_num_seqs"] == 4
    assert demo.engine["max_model_len"] == src["models"]["demo"]["engine"]["max_model_len"]  # kept
    assert demo.deployment.num_replicas == 2 and demo.deployment.autoscaling is None
    assert cfg.tenants == parse_config(src, check_engine_args=False).tenants  # policies as configured


def test_policies_off_removes_every_policy_key_and_the_audit():
    cfg = parse_config(keel_doc(LOCAL, 18124, policies=False), check_engine_args=False)
    assert not cfg.tenants and not cfg.guardrails and not cfg.experiments and not cfg.audit.enabled


def test_settings_are_named_after_their_overrides_and_must_differ():
    assert SettingSpec(engine={"max_num_seqs": 8}).label() == "max_num_seqs=8"
    assert SettingSpec(engine={"max_num_seqs": 8}, replicas=2).label() == "max_num_seqs=8, replicas=2"
    base = {"config": "c.yaml", "load": {"levels": [1]}, "slo": {"ttft_ms": 100}, "hardware": "cpu-2core"}
    with pytest.raises(ValueError, match="same name"):
        BenchSpec.model_validate({**base, "settings": [{"engine": {"max_num_seqs": 8}}] * 2})


def test_server_ports_lie_outside_the_ephemeral_range_that_client_sockets_draw_from():
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(20)]
    assert all(not low <= p <= high for p in ports) and all(1024 < p < 65536 for p in ports)
