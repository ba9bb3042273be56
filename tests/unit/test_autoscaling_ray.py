"""The Ray adapter: a fake AutoscalingContext in, and Ray's own wrapper and registration code
(ray.serve's autoscaling_policy / autoscaling_state, run in-process, no cluster) around it."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import yaml
from ray.serve._private.autoscaling_state import DeploymentAutoscalingState
from ray.serve._private.common import DeploymentID, TimeStampedValue
from ray.serve._private.config import DeploymentConfig, ReplicaConfig
from ray.serve._private.deployment_info import DeploymentInfo
from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig
from ray.serve.config import AutoscalingContext

from serving.autoscaling import published, ray_policy
from serving.autoscaling.ray_policy import KeelAutoscalingPolicy, ray_autoscaling_config
from serving.autoscaling.settings import AutoscalingConfig

NOW = 1_800_000_000.0


def settings(**kw) -> dict:
    base = dict(
        min_replicas=1,
        max_replicas=8,
        target=10,
        panic_threshold=10,
        scale_down_cooldown_s=0,
        stable_window_s=10,
        panic_window_s=2,
    )
    return AutoscalingConfig(**{**base, **kw}).model_dump(mode="json", exclude_none=True)


def kwargs(**kw) -> dict:
    """A policy given its settings inline, as a test or a one-off does."""
    return {"model": "demo", "settings": settings(**kw)}


def ray_config(**kw) -> RayAutoscalingConfig:
    return RayAutoscalingConfig(**ray_autoscaling_config("demo", AutoscalingConfig(**settings(**kw))))


@pytest.fixture
def store(monkeypatch) -> dict:
    """The settings the gateways publish (Ray's GCS key-value store in a cluster)."""
    docs: dict[str, dict] = {}
    monkeypatch.setattr(published, "read", lambda model: docs.get(model))
    monkeypatch.setattr(published, "publish", lambda by_model: docs.update(by_model))
    return docs


def series(*points) -> list:
    return [TimeStampedValue(t, v) for t, v in points]


def fake_ctx(
    replicas: int, raw: dict, now: float = NOW, queued: float = 0.0, total: float = 0.0, target: int | None = None
):
    return SimpleNamespace(
        current_time=now,
        current_num_replicas=replicas,
        raw_metrics=raw,
        target_num_replicas=replicas if target is None else target,
        total_queued_requests=queued,
        total_num_requests=total,
        deployment_name="engine-demo",
        policy_state={},
    )


def test_the_mean_of_its_fresh_points_is_a_replicas_report():
    policy = KeelAutoscalingPolicy(**kwargs())
    raw = {
        "requests_in_flight": {
            "a": series((NOW - 1.5, 8), (NOW - 0.5, 16)),  # its last push: mean 12
            "b": series((NOW - 0.4, 8)),
            "c": series((NOW - 30, 50)),  # its scrapes failed for 30 s: left out, not 0
        },
        "kv_cache_usage": {"a": series((NOW - 0.5, 0.9))},
    }
    obs = policy.observe(fake_ctx(3, raw))
    assert dict(obs.reports) == {"a": 12.0, "b": 8.0}
    assert obs.replicas == 3 and obs.held == 0
    replicas, state = policy(fake_ctx(3, raw))
    assert replicas == 3  # mean 10 x 3 replicas = 30 in flight / 10 per replica
    assert "3" in state["keel_reason"]


def test_the_chosen_signal_is_read():
    policy = KeelAutoscalingPolicy(**kwargs(signal="kv_cache_usage", target=0.5))
    raw = {"requests_in_flight": {"a": series((NOW, 1))}, "kv_cache_usage": {"a": series((NOW, 0.9))}}
    assert dict(policy.observe(fake_ctx(1, raw)).reports) == {"a": 0.9}


def test_held_demand_is_what_waits_at_handles():
    policy = KeelAutoscalingPolicy(**kwargs(min_replicas=0))
    assert policy.observe(fake_ctx(0, {}, total=3)).held == 3  # nothing runs: all of it waits
    assert policy.observe(fake_ctx(2, {}, queued=5, total=9)).held == 5
    assert policy.observe(fake_ctx(2, {}, queued=None, total=9)).held == 0


def test_ray_builds_the_policy_from_the_model_name_and_it_reads_the_published_settings(store):
    store["demo"] = settings(max_replicas=4, target=7)
    state = DeploymentAutoscalingState(DeploymentID(name="engine-demo", app_name="keel-model-demo"))
    state.register(_info(ray_config(max_replicas=4, target=7)), 1)
    inner = state._policy.__wrapped__
    assert isinstance(inner, KeelAutoscalingPolicy) and inner.model == "demo"
    state._policy(_ray_ctx(ray_config(max_replicas=4), {}, 1, 1, [7], time.time()))
    assert inner.settings.target == 7


def test_before_any_gateway_publishes_the_policy_keeps_the_count(store):
    policy = KeelAutoscalingPolicy(model="demo")
    replicas, state = policy(fake_ctx(2, {"requests_in_flight": {"a": series((NOW, 100))}}, target=3))
    assert replicas == 3 and "no settings published yet" in state["keel_reason"]


def test_a_published_change_reaches_the_running_policy(store, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(ray_policy.time, "monotonic", lambda: clock[0])
    policy = KeelAutoscalingPolicy(model="demo")
    published.publish({"demo": settings(target=7)})
    policy(fake_ctx(1, {}))
    assert policy.settings.target == 7
    published.publish({"demo": settings(target=3)})
    policy(fake_ctx(1, {}))
    assert policy.settings.target == 7  # read again every READ_TTL_S, not every tick
    clock[0] += ray_policy.READ_TTL_S
    policy(fake_ctx(1, {}))
    assert policy.settings.target == 3


def test_a_settings_change_leaves_rays_code_version_alone():
    # Ray folds each deployment's autoscaling policy entry and the application's args into the
    # application's code version; a new one replaces every replica (found by the live-changes
    # e2e: a target change restarted the engine). Only the gateways' config may carry settings.
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    from serving.config import REPO_ROOT, parse_config
    from serving.plan import desired, schema

    def apps(target: int) -> dict:
        doc = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
        doc["models"]["demo"]["deployment"] = {
            "num_cpus": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target": target},
        }
        deploy = ServeDeploySchema.model_validate(schema(desired(parse_config(doc, check_engine_args=False))))
        return {a.name: a for a in deploy.applications}

    before, after = apps(8), apps(4)
    assert get_app_code_version(before["keel-model-demo"]) == get_app_code_version(after["keel-model-demo"])
    assert get_app_code_version(before["keel"]) == get_app_code_version(after["keel"])

    def gateway(apps):
        return next(d for d in apps["keel"].deployments if d.name == "gateway").user_config

    assert gateway(before)["models"]["demo"]["autoscaling"]["target"] == 8
    assert gateway(after)["models"]["demo"]["autoscaling"]["target"] == 4


def _info(config: RayAutoscalingConfig) -> DeploymentInfo:
    return DeploymentInfo(
        deployment_config=DeploymentConfig(autoscaling_config=config),
        replica_config=ReplicaConfig.create(lambda: None),
        start_time_ms=0,
        deployer_job_id="test",
    )


def _ray_ctx(config, policy_state, replicas, target, values, now, queued=0.0):
    raw = {"requests_in_flight": {f"r{i}": series((now, v)) for i, v in enumerate(values)}}
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="engine-demo",
        app_name="keel-model-demo",
        current_num_replicas=replicas,
        target_num_replicas=target,
        running_replicas=[],
        total_num_requests=queued + sum(values),
        total_queued_requests=queued,
        aggregated_metrics={},
        raw_metrics=raw,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=policy_state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


@pytest.mark.parametrize(
    "values, expected",
    [
        ([40], 2),  # up: x2 at most a step, Ray's factor 1 and delay 0 add nothing
        ([10, 10, 10, 10], 4),  # steady: no change
    ],
)
def test_rays_wrapper_passes_the_decision_through(values, expected, store):
    store["demo"] = settings(min_replicas=1, max_replicas=8)
    config = ray_config(min_replicas=1, max_replicas=8)
    state = DeploymentAutoscalingState(DeploymentID(name="engine-demo", app_name="keel-model-demo"))
    state.register(_info(config), len(values))
    n = len(values)
    decided, _ = state._policy(_ray_ctx(config, {}, n, n, values, time.time()))
    assert decided == expected


def test_rays_wrapper_lets_the_policy_scale_down_at_once(store):
    # Ray's downscale_delay_s would hold a scale-down for 600 s by default; rendered 0, the
    # policy's own cooldown (0 here) and window decide alone.
    store["demo"] = settings()
    config = ray_config()
    state = DeploymentAutoscalingState(DeploymentID(name="engine-demo", app_name="keel-model-demo"))
    state.register(_info(config), 4)
    policy_state, t0 = {}, time.time()
    for k in range(12):  # a whole stable window (10 s) of 4 replicas carrying 1 request each
        decided, policy_state = state._policy(_ray_ctx(config, policy_state, 4, 4, [1, 1, 1, 1], t0 + k))
    assert decided == 1


def test_rays_cold_start_path_and_the_policy_agree_from_zero(store):
    store["demo"] = settings(min_replicas=0)
    config = ray_config(min_replicas=0)
    state = DeploymentAutoscalingState(DeploymentID(name="engine-demo", app_name="keel-model-demo"))
    state.register(_info(config), 0)
    decided, _ = state._policy(_ray_ctx(config, {}, 0, 0, [], time.time(), queued=5))
    assert decided == 1
    assert KeelAutoscalingPolicy(**kwargs(min_replicas=0))(fake_ctx(0, {}, total=5))[0] == 1


def test_the_rendered_config_turns_rays_own_delays_and_factors_off():
    a = ray_autoscaling_config("demo", AutoscalingConfig(min_replicas=0, max_replicas=3, metrics_interval_s=2))
    assert (a["upscale_delay_s"], a["downscale_delay_s"], a["downscale_to_zero_delay_s"]) == (0, 0, 0)
    assert (a["upscaling_factor"], a["downscaling_factor"]) == (1, 1)
    assert a["metrics_interval_s"] == 2 and a["look_back_period_s"] > a["metrics_interval_s"]
    assert a["policy"]["policy_kwargs"] == {"model": "demo"} and a["max_replicas"] == 3
