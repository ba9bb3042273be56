"""`keel apply`'s plan: what each config change does to each model, and what Serve is given."""

from __future__ import annotations

import copy

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serving.config import REPO_ROOT, parse_config
from serving.plan import (
    ADDED,
    CONTROL_APP,
    MODEL_APP_PREFIX,
    REMOVED,
    REPLACED,
    SCALED,
    UNCHANGED,
    desired,
    from_serve,
    make_plan,
    render,
    schema,
)


def raw() -> dict:
    return yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())


def state(doc: dict):
    return desired(parse_config(doc, check_engine_args=False))


def plan_for(change) -> tuple:
    before = raw()
    after = copy.deepcopy(before)
    change(after)
    p = make_plan(state(before), state(after))
    return p, {m.model: m for m in p.models}


def test_the_same_config_changes_nothing():
    p, models = plan_for(lambda c: None)
    assert p.empty and models["demo"].kind == UNCHANGED
    assert render(p) == "  demo  unchanged"


def test_autoscaling_is_a_scale_change_not_a_restart():
    def change(c):
        c["models"]["demo"]["deployment"] = {"num_cpus": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 2}}

    p, models = plan_for(change)
    assert models["demo"].kind == SCALED
    assert any(line.startswith("autoscaling") for line in models["demo"].changes)
    assert not p.restart and p.gateway == ("autoscaling settings the gateways publish: demo",)


def test_a_policy_setting_change_is_live_and_reads_as_the_key_ops_wrote():
    def autoscaled(c, **kw):
        c["models"]["demo"]["deployment"] = {
            "num_cpus": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "signal": "requests_in_flight", "target": 8, **kw},
        }

    before, after = raw(), raw()
    autoscaled(before)
    autoscaled(after, target=4, schedules=[{"start": "09:00", "end": "17:00", "min_replicas": 2}])
    p = make_plan(state(before), state(after))
    (demo,) = p.models
    assert demo.kind == SCALED and "no engine restarts" in demo.note
    assert "autoscaling.target: 8.0 -> 4.0" in demo.changes
    assert any(line.startswith("autoscaling.schedules: [] -> ") for line in demo.changes)
    # What the policy reads: the settings the gateways publish. Ray's policy entry names only
    # the model: a change there would change the application's code version and restart it.
    assert state(after).gateway["models"]["demo"]["autoscaling"]["target"] == 4
    assert "autoscaling settings the gateways publish: demo" in p.gateway
    assert "models the gateways route to: demo" not in p.gateway

    def policy(st):
        return st.models["demo"].overrides["autoscaling_config"]["policy"]

    assert (
        policy(state(before))
        == policy(state(after))
        == {
            "policy_function": "serving.autoscaling.ray_policy:KeelAutoscalingPolicy",
            "policy_kwargs": {"model": "demo"},
        }
    )


@pytest.mark.parametrize(
    "key, value", [("drain_timeout_s", 5), ("health_check_period_s", 3), ("num_replicas", 2), ("max_surge_percent", 0)]
)
def test_live_deployment_options_scale_in_place(key, value):
    p, models = plan_for(lambda c: c["models"]["demo"]["deployment"].update({key: value}))
    assert models["demo"].kind == SCALED, models["demo"]
    assert any(line.startswith(key) for line in models["demo"].changes), models["demo"].changes


@pytest.mark.parametrize(
    "change, names",
    [
        (lambda m: m["engine"].update(max_model_len=256), "engine.max_model_len: 512 -> 256"),
        (lambda m: m["env"].update(VLLM_CPU_KVCACHE_SPACE="2"), 'env.VLLM_CPU_KVCACHE_SPACE: "1" -> "2"'),
        (lambda m: m["deployment"].update(num_cpus=2), "ray_actor_options.num_cpus: 1.0 -> 2.0"),
    ],
)
def test_engine_arguments_env_and_resources_replace_only_that_model(change, names):
    before = raw()
    before["models"]["demo-b"] = copy.deepcopy(before["models"]["demo"])
    after = copy.deepcopy(before)
    change(after["models"]["demo"])
    p = make_plan(state(before), state(after))
    models = {m.model: m for m in p.models}
    assert models["demo"].kind == REPLACED and names in models["demo"].changes
    assert "surge-first" in models["demo"].note
    assert models["demo-b"].kind == UNCHANGED


def test_replacing_without_surge_says_capacity_dips():
    before = raw()
    before["models"]["demo"]["deployment"].update(max_surge_percent=0, num_replicas=2)
    after = copy.deepcopy(before)
    after["models"]["demo"]["engine"]["max_model_len"] = 256
    (m,) = make_plan(state(before), state(after)).models
    assert m.kind == REPLACED and "capacity dips by 1 of 2" in m.note


def test_adding_and_removing_models():
    def add(c):
        c["models"]["demo-b"] = copy.deepcopy(c["models"]["demo"])

    p, models = plan_for(add)
    assert models["demo-b"].kind == ADDED and models["demo"].kind == UNCHANGED
    assert p.gateway == ("models the gateways route to: demo, demo-b",)

    before = raw()
    add(before)
    p = make_plan(state(before), state(raw()))
    models = {m.model: m for m in p.models}
    assert models["demo-b"].kind == REMOVED and "drain" in models["demo-b"].note
    assert models["demo"].kind == UNCHANGED


def test_a_policy_change_is_live_and_names_sections_not_values():
    p, models = plan_for(lambda c: c["tenants"]["demo"]["quotas"].update(requests_per_minute=5))
    assert models["demo"].kind == UNCHANGED and not p.restart
    assert p.gateway == ("policy: tenants changed",)
    assert "sha256" not in render(p)


def test_the_gateways_learn_the_models_dir_live_for_the_admin_api(tmp_path):
    before = state(raw())
    assert "models_dir" not in before.gateway  # the gateways' own default, not this machine's path
    (tmp_path / "demo-tiny").mkdir()  # the manifest the config names, with the same weights
    (tmp_path / "demo-tiny" / "manifest.yaml").write_text(
        f"name: demo-tiny\npath: {(REPO_ROOT / '.keel' / 'models' / 'demo-tiny').resolve()}\n"
    )
    doc = raw()
    doc["models_dir"] = str(tmp_path)
    moved = state(doc)
    assert moved.gateway["models_dir"] == str(tmp_path)
    p = make_plan(before, moved)
    assert p.gateway == (f"models_dir (where the admin API registers): {tmp_path}",) and not p.restart


def test_a_server_change_needs_a_restart():
    p, _ = plan_for(lambda c: c["server"].update(port=8123))
    assert p.restart == ("server.port: 8000 -> 8123",)
    assert "needs --restart" in render(p)


def test_the_schema_is_valid_for_serve_and_reads_back_as_the_same_state():
    s = state(raw())
    doc = schema(s)
    ServeDeploySchema.model_validate(doc)  # what submit() hands Serve
    names = [a["name"] for a in doc["applications"]]
    assert names == [CONTROL_APP, MODEL_APP_PREFIX + "demo"]
    # What Serve reports back (get_serve_details) is what was deployed: no plan against itself.
    details = {"applications": {a["name"]: {"deployed_app_config": a} for a in doc["applications"]}}
    assert make_plan(from_serve(details), s).empty


def test_every_engine_deployment_scales_on_keels_policy():
    # A fixed count is autoscaling between equal bounds: Ray's default policy would count only
    # requests Ray routed (none) and scale a model down.
    overrides = state(raw()).models["demo"].overrides
    a = overrides["autoscaling_config"]
    assert a["policy"]["policy_function"] == "serving.autoscaling.ray_policy:KeelAutoscalingPolicy"
    assert a["min_replicas"] == a["max_replicas"] == 1
    assert overrides["graceful_shutdown_timeout_s"] > overrides["user_config"]["drain_timeout_s"]


def test_a_stack_deployed_by_an_older_keel_is_named():
    old = {"applications": {"keel": {"deployed_app_config": {"args": {"stack": {}}}}}}
    with pytest.raises(ValueError, match="older Keel"):
        from_serve(old)
    assert from_serve({"applications": {}}) is None


def test_a_newer_registered_version_replaces_what_plain_name_serves(models_base, model_dir, tmp_path):
    from serving.model_registry.store import register_version
    from tests.unit.model_registry_fixtures import copy_model, edit_json

    register_version(models_base, "m", "1", model_dir)
    doc = raw()
    doc["models_dir"] = str(models_base)
    doc["models"]["demo"]["weights"] = "m"  # the newest registered version
    before = state(doc)
    v2 = copy_model(model_dir, tmp_path / "weights-2")
    edit_json(v2 / "generation_config.json", temperature=0.7)
    register_version(models_base, "m", "2", v2)
    (m,) = make_plan(before, state(doc)).models
    assert m.kind == REPLACED and m.changes == ('weights: "m@1" -> "m@2"',)
    pinned = dict(doc, models={"demo": dict(doc["models"]["demo"], weights="m@1")})
    assert make_plan(before, state(pinned)).models[0].kind == UNCHANGED


def test_an_application_still_building_is_not_settled():
    # What Serve reports right after a new application is submitted: no deployments yet. A
    # rollout once read that as ready and sent users to a candidate with no replica (503s).
    from serving.plan import deploy_failures, unsettled

    building = {
        "keel": {"status": "RUNNING", "deployments": {"gateway": {"status": "HEALTHY", "replicas": []}}},
        "keel-model-demo@candidate": {"status": "DEPLOYING", "deployments": {}},
    }
    assert unsettled(building) == ["keel-model-demo@candidate DEPLOYING"]
    starting = {
        "keel-model-demo": {
            "status": "DEPLOYING",
            "deployments": {"engine-demo": {"status": "UPDATING", "replicas": [{"state": "STARTING"}]}},
        }
    }
    assert unsettled(starting) == ["keel-model-demo DEPLOYING: engine-demo UPDATING (STARTING)"]
    running = {
        "keel-model-demo-b": {
            "status": "RUNNING",
            "deployments": {"engine-demo-b": {"status": "HEALTHY", "replicas": [{"state": "RUNNING"}]}},
        }
    }
    assert unsettled(running) == [] and unsettled(running, gone={"keel-model-demo-b"}) == ["keel-model-demo-b draining"]
    failed = {
        "keel-model-x": {
            "status": "DEPLOY_FAILED",
            "message": "Traceback...\nRuntimeError: engine exited",
            "deployments": {},
        }
    }
    assert deploy_failures(failed) == ["keel-model-x: RuntimeError: engine exited"]


@pytest.mark.parametrize("where", ["server", "deployment"])
def test_a_drain_timeout_has_a_bound(where):
    # Ctrl-C and every replica stop wait for it: a config cannot make them wait for ever.
    from serving.config import ConfigError

    doc = raw()
    target = doc["server"] if where == "server" else doc["models"]["demo"]["deployment"]
    target["drain_timeout_s"] = 1e9
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        parse_config(doc, check_engine_args=False)
