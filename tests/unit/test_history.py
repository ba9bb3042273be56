"""The history of changes: the structured diff, masking, the version, and the record `keel apply`
and `keel serve` write (Ray stood in for at the boundary: the deployed state and submit)."""

from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import yaml

from serving import launcher
from serving.config import REPO_ROOT, parse_config
from serving.ops import history
from serving.plan import desired
from serving.policy.identity import key_digest

ADMIN_KEY = "sk-keel-admin-for-tests-0123456789"
HF_TOKEN = "plain-s3cret-no-known-prefix"  # masked by its name, not its shape
REDIS_PASSWORD = "hunter2-redis"


def raw(tmp_path) -> dict:
    doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    doc["audit"]["dir"] = str(tmp_path / "audit")
    return doc


def config(doc: dict):
    return parse_config(copy.deepcopy(doc), check_engine_args=False)


def view(doc: dict) -> dict:
    return history.config_view(desired(config(doc)))


def by_path(changes: list[dict]) -> dict[str, dict]:
    return {".".join(c["path"]): c for c in changes}


def add_model(doc, name="demo-b"):
    doc["models"][name] = copy.deepcopy(doc["models"]["demo"])


# -- the diff ------------------------------------------------------------------------------------


def test_diff_names_an_added_tenant_a_changed_quota_a_removed_model_and_a_changed_engine_arg(tmp_path):
    before = raw(tmp_path)
    add_model(before)
    after = copy.deepcopy(before)
    after["tenants"]["acme"] = {
        "keys": [{"id": "acme-1", "digest": key_digest("sk-keel-acme"), "role": "app"}],
        "quotas": {"requests_per_minute": 60},
    }
    after["tenants"]["demo"]["quotas"]["requests_per_minute"] = 100
    del after["models"]["demo-b"]
    after["models"]["demo"]["engine"]["max_num_seqs"] = 64

    changes = by_path(history.diff(view(before), view(after)))

    assert set(changes) == {
        "policy.tenants.acme",
        "policy.tenants.demo.quotas.requests_per_minute",
        "models.demo-b",
        "models.demo.engine.max_num_seqs",
    }
    assert changes["policy.tenants.acme"]["op"] == "added"
    assert changes["policy.tenants.acme"]["new"]["quotas"] == {"requests_per_minute": 60}
    assert changes["policy.tenants.demo.quotas.requests_per_minute"] == {
        "path": ["policy", "tenants", "demo", "quotas", "requests_per_minute"],
        "op": "changed",
        "old": 6000,
        "new": 100,
    }
    assert (
        changes["models.demo-b"]["op"] == "removed" and changes["models.demo-b"]["old"]["engine"]["max_num_seqs"] == 128
    )
    assert (
        changes["models.demo.engine.max_num_seqs"]["old"] == 128
        and changes["models.demo.engine.max_num_seqs"]["new"] == 64
    )


def test_a_scale_change_reads_as_the_config_key_not_rays_rendering(tmp_path):
    before = raw(tmp_path)
    after = copy.deepcopy(before)
    after["models"]["demo"]["deployment"]["num_replicas"] = 2
    assert history.diff(view(before), view(after)) == [
        {"path": ["models", "demo", "deployment", "num_replicas"], "op": "changed", "old": 1, "new": 2}
    ]


def test_a_tenants_keys_are_compared_by_id(tmp_path):
    before = raw(tmp_path)
    after = copy.deepcopy(before)
    after["tenants"]["demo"]["keys"].append({"id": "ops", "digest": key_digest(ADMIN_KEY), "role": "admin"})
    (change,) = history.diff(view(before), view(after))
    assert change["path"] == ["policy", "tenants", "demo", "keys", "ops"] and change["op"] == "added"
    assert change["new"]["role"] == "admin"


def test_the_same_config_diffs_to_nothing_and_keeps_its_version(tmp_path):
    doc = raw(tmp_path)
    assert history.diff(view(doc), view(doc)) == []
    assert history.version(history.mask(view(doc))) == history.version(history.mask(view(copy.deepcopy(doc))))
    changed = copy.deepcopy(doc)
    changed["tenants"]["demo"]["quotas"]["concurrent_requests"] = 8
    assert history.version(history.mask(view(changed))) != history.version(history.mask(view(doc)))


# -- masking -------------------------------------------------------------------------------------


def secret_doc(tmp_path, *, token=HF_TOKEN, password=REDIS_PASSWORD) -> dict:
    doc = raw(tmp_path)
    doc["models"]["demo"]["env"].update(HF_TOKEN=token, AWS_SECRET_ACCESS_KEY=token, VLLM_CPU_OMP_THREADS_BIND="nobind")
    doc["models"]["demo"]["engine"]["api_key"] = token
    doc["quotas"] = {"backend": "redis", "redis_url": f"redis://keel:{password}@127.0.0.1:6379/0"}
    doc["tenants"]["demo"]["keys"].append({"id": "ops", "digest": key_digest(ADMIN_KEY), "role": "admin"})
    return doc


def test_no_digest_or_secret_appears_in_the_record(tmp_path):
    before = raw(tmp_path)
    after = secret_doc(tmp_path)
    record = history.change_record(
        command="apply",
        who=history.identify(ADMIN_KEY, [view(after)["policy"]]),
        old_view=view(before),
        new_view=view(after),
        plan={},
    )
    text = json.dumps(record)
    for secret in (
        HF_TOKEN,
        REDIS_PASSWORD,
        ADMIN_KEY,
        key_digest(ADMIN_KEY)[7:],
        before["tenants"]["demo"]["keys"][0]["digest"][7:],
    ):
        assert secret not in text
    env = record["config"]["models"]["demo"]["env"]
    assert env == {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "HF_TOKEN": history.MASK,
        "AWS_SECRET_ACCESS_KEY": history.MASK,
    }
    assert record["config"]["policy"]["quotas"]["redis_url"] == f"redis://keel:{history.MASK}@127.0.0.1:6379/0"
    assert record["who"]["key_id"] == "ops"


def test_a_changed_secret_shows_as_changed_without_its_values(tmp_path):
    before = secret_doc(tmp_path)
    after = secret_doc(tmp_path, token="another-s3cret", password="other-password")
    changes = by_path(history.masked_changes(history.diff(view(before), view(after))))
    assert changes["models.demo.env.HF_TOKEN"]["new"] == history.MASKED_CHANGE
    assert changes["policy.quotas.redis_url"]["new"] == history.MASKED_CHANGE
    assert "other-password" not in json.dumps(changes) and "another-s3cret" not in json.dumps(changes)


def test_a_rotated_key_shows_as_a_changed_fingerprint(tmp_path):
    before = raw(tmp_path)
    after = copy.deepcopy(before)
    after["tenants"]["demo"]["keys"][0]["digest"] = key_digest("sk-keel-rotated")
    (change,) = history.masked_changes(history.diff(view(before), view(after)))
    assert change["path"][-1] == "digest"
    assert change["old"] != change["new"] and change["new"].startswith("sha256:") and len(change["new"]) < 20


@pytest.mark.parametrize("value", ["sk-keel-abcdefghijkl", "hf_abcdefghijkl", "ghp_abcdefghijkl"])
def test_values_shaped_like_api_keys_are_masked_wherever_they_are(value):
    assert history.mask({"guardrails": {"note": value}}) == {"guardrails": {"note": history.MASK}}


def test_settings_named_like_tokens_are_not_masked():
    limits = {"tokens_per_day": 10, "max_tokens": 5, "hmac_key_file": "/etc/keel/audit.key"}
    assert history.mask({"quotas": limits}) == {"quotas": limits}


def test_long_values_and_many_changes_are_bounded(tmp_path):
    old = {f"k{i}": i for i in range(history.MAX_CHANGES + 5)}
    new = {**{k: v + 1 for k, v in old.items()}, "big": "x" * (history.MAX_VALUE_CHARS * 2)}
    record = history.change_record(command="apply", who={}, old_view=old, new_view=new, plan={})
    assert len(record["changes"]) == history.MAX_CHANGES and record["changes_omitted"] == 6
    assert all(len(json.dumps(c)) < history.MAX_VALUE_CHARS + 200 for c in record["changes"])


# -- who -----------------------------------------------------------------------------------------


def test_an_admin_key_is_recorded_by_its_id_and_other_keys_are_not(tmp_path):
    policy = view(secret_doc(tmp_path))["policy"]
    assert history.identify(ADMIN_KEY, [policy])["key_id"] == "ops"
    app = history.identify("sk-keel-demo", [policy])
    assert "key_id" not in app and "app key" in app["key_note"]
    unknown = history.identify("sk-keel-nobody", [policy])
    assert "key_id" not in unknown and "not a key of this stack" in unknown["key_note"]
    assert history.identify(None, [policy]).keys() == {"user", "host"}


# -- the hooks in `keel apply` and `keel serve` ----------------------------------------------------


class FakeServe:
    """What apply_config reaches through Ray: the deployed state, and submit."""

    def __init__(self, state):
        self.state = state
        self.fail_with: str | None = None
        self.submitted = 0

    def submit(self, state):
        self.submitted += 1
        if self.fail_with:
            raise launcher.StartupError(self.fail_with)
        self.state = state


@pytest.fixture
def serve(monkeypatch, tmp_path):
    fake = FakeServe(desired(config(raw(tmp_path))))
    ray = types.ModuleType("ray")
    ray.init = lambda **kw: None
    ray.shutdown = lambda: None
    app = types.ModuleType("serving.app")
    app.deployed_state = lambda: fake.state
    app.submit = fake.submit
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "serving.app", app)
    monkeypatch.setattr(launcher, "_wait_settled", lambda *a, **kw: None)
    monkeypatch.setattr(launcher, "ensure_weights", lambda *a, **kw: None)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    return fake


def apply(doc, **kw) -> str:
    return launcher.apply_config(config(doc), say=lambda line: None, timeout_s=1, **kw)


def changes_recorded(tmp_path) -> list[dict]:
    return [e.record for e in history.read_history(tmp_path / "audit").entries]


def test_apply_records_who_what_the_versions_and_the_plan(serve, tmp_path):
    before = secret_doc(tmp_path)
    serve.state = desired(config(before))
    after = copy.deepcopy(before)
    after["models"]["demo"]["deployment"]["num_replicas"] = 2
    add_model(after)

    assert apply(after, admin_key=ADMIN_KEY).startswith("keel: applied live")

    (rec,) = changes_recorded(tmp_path)
    assert rec["event"] == "config_change" and rec["command"] == "apply" and rec["outcome"] == "applied"
    assert rec["who"]["key_id"] == "ops" and rec["who"]["tenant"] == "demo"
    assert rec["plan"]["models"] == {"demo": "scaled", "demo-b": "added"}
    assert rec["previous_version"] == history.version(history.mask(view(before)))
    assert rec["version"] == history.version(history.mask(view(after))) != rec["previous_version"]
    assert {".".join(c["path"]) for c in rec["changes"]} == {"models.demo.deployment.num_replicas", "models.demo-b"}
    assert rec["diff_against"] == "deployed"
    assert HF_TOKEN not in json.dumps(rec) and ADMIN_KEY not in json.dumps(rec)


def test_a_failed_apply_is_recorded_with_its_error(serve, tmp_path):
    doc = raw(tmp_path)
    doc["tenants"]["demo"]["quotas"]["requests_per_minute"] = 5
    serve.fail_with = "keel-model-demo: engine did not start"
    with pytest.raises(launcher.StartupError):
        apply(doc)
    (rec,) = changes_recorded(tmp_path)
    assert rec["outcome"] == "failed" and rec["error"] == "keel-model-demo: engine did not start"
    assert rec["who"].keys() == {"user", "host"}


def test_a_dry_run_or_a_config_that_changes_nothing_records_nothing(serve, tmp_path):
    doc = raw(tmp_path)
    assert apply(doc) == "keel: nothing to change"
    doc["tenants"]["demo"]["quotas"]["requests_per_minute"] = 5
    assert "nothing is changed" in apply(doc, dry_run=True)
    assert not (tmp_path / "audit").exists() or changes_recorded(tmp_path) == []


def test_an_audit_dir_that_cannot_be_written_stops_the_apply_before_any_change(serve, tmp_path):
    doc = raw(tmp_path)
    (tmp_path / "audit").write_text("a file, not a directory")
    doc["tenants"]["demo"]["quotas"]["requests_per_minute"] = 5
    with pytest.raises(launcher.StartupError, match="cannot record the change in the history"):
        apply(doc)
    assert serve.submitted == 0


def test_with_audit_off_apply_records_nothing_and_says_so(serve, tmp_path):
    doc = raw(tmp_path)
    doc["audit"]["enabled"] = False
    doc["tenants"]["demo"]["quotas"]["requests_per_minute"] = 5
    said = []
    launcher.apply_config(config(doc), say=said.append, timeout_s=1)
    assert any("not recorded in the history" in line for line in said)
    assert not (tmp_path / "audit").exists()


def test_serve_diffs_against_the_last_recorded_config(tmp_path):
    first = raw(tmp_path)
    with launcher._history(config(first), "serve", None, desired(config(first)), None, None, print):
        pass
    second = copy.deepcopy(first)
    second["models"]["demo"]["engine"]["max_model_len"] = 256
    with launcher._history(config(second), "serve", None, desired(config(second)), None, None, print):
        pass
    one, two = changes_recorded(tmp_path)
    assert one["diff_against"] == "nothing" and one["previous_version"] is None
    assert one["plan"] == {"models": {"demo": "added"}, "gateways": [], "restart": []}
    assert two["diff_against"] == "recorded" and two["previous_version"] == one["version"]
    assert [(c["path"], c["old"], c["new"]) for c in two["changes"]] == [
        (["models", "demo", "engine", "max_model_len"], 512, 256)
    ]


def test_records_carry_the_configs_hmac(tmp_path):
    from serving.policy.audit import create_key_file, verify

    doc = raw(tmp_path)
    create_key_file(tmp_path / "audit.key")
    doc["audit"]["hmac_key_file"] = str(tmp_path / "audit.key")
    cfg = config(doc)
    with launcher._history(cfg, "serve", None, desired(cfg), None, None, print):
        pass
    (path,) = (tmp_path / "audit").glob("audit-*.jsonl")
    from serving.policy.audit import load_key

    assert verify(path, key=load_key(tmp_path / "audit.key")).authenticated


def test_a_record_that_cannot_be_written_after_the_change_is_said_not_raised(serve, tmp_path, monkeypatch):
    from serving.rollout.driver import AuditRecords

    def disk_full(self, rec):
        raise TimeoutError("records not on disk after 5s")

    monkeypatch.setattr(AuditRecords, "__call__", disk_full)
    doc = raw(tmp_path)
    doc["tenants"]["demo"]["quotas"]["requests_per_minute"] = 5
    said = []
    assert launcher.apply_config(config(doc), say=said.append, timeout_s=1).startswith("keel: applied")
    assert any("WARNING: the change applied, but its history record could not be written" in s for s in said)
