"""The Ray adapter: a fake AutoscalingContext in, and Ray's own wrapper and registration code
(ray.serve's autoscaling_policy / autoscaling_state, run in-process, no cluster) around it."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from ray.serve._private.autoscaling_state import DeploymentAutoscalingState
from ray.serve._private.common import DeploymentID, TimeStampedValue
from ray.serve._private.config import DeploymentConfig, ReplicaConfig
from ray.serve._private.deployment_info import DeploymentInfo
from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig, AutoscalingContext

from serving.autoscaling.ray_policy import KeelAutoscalingPolicy, ray_autoscaling_config
from serving.autoscaling.settings import AutoscalingConfig

NOW = 1_800_000_000.0


def kwargs(**kw) -> dict:
    base = dict(min_replicas=1, max_replicas=8, target=10, panic_threshold=10,
                scale_down_cooldown_s=0, stable_window_s=10, panic_window_s=2)
    return ray_autoscaling_config(AutoscalingConfig(**{**base, **kw}))["policy"]["policy_kwargs"]


def series(*points) -> list:
    return [TimeStampedValue(t, v) for t, v in points]


def fake_ctx(replicas: int, raw: dict, now: float = NOW, queued: float = 0.0, total: float = 0.0):
    return SimpleNamespace(current_time=now, current_num_replicas=replicas, raw_metrics=raw,
                           total_queued_requests=queued, total_num_requests=total,
                           deployment_name="engine-demo", policy_state={})


def test_the_mean_of_its_fresh_points_is_a_replicas_report():
    policy = KeelAutoscalingPolicy(**kwargs())
    raw = {"requests_in_flight": {
        "a": series((NOW - 1.5, 8), (NOW - 0.5, 16)),  # its last push: mean 12
        "b": series((NOW - 0.4, 8)),
        "c": series((NOW - 30, 50)),  # its scrapes failed for 30 s: left out, not 0
    }, "kv_cache_usage": {"a": series((NOW - 0.5, 0.9))}}
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


def test_a_class_policy_is_built_once_from_the_settings_by_ray():
    config = RayAutoscalingConfig(**ray_autoscaling_config(AutoscalingConfig(
        min_replicas=1, max_replicas=4, target=7, stable_window_s=10, panic_window_s=2)))
    state = DeploymentAutoscalingState(DeploymentID(name="engine-demo", app_name="keel-model-demo"))
    state.register(_info(config), 1)
    inner = state._policy.__wrapped__
    assert isinstance(inner, KeelAutoscalingPolicy) and inner.settings.target == 7


def test_a_settings_change_gets_a_new_policy_from_the_new_kwargs():
    # `keel apply` changes only the deployment's autoscaling_config: Ray re-registers it and
    # instantiates the class again from the new policy_kwargs; no engine restarts.
    state = DeploymentAutoscalingState(DeploymentID(name="engine-demo", app_name="keel-model-demo"))
    for target in (7, 3):
        config = RayAutoscalingConfig(**ray_autoscaling_config(AutoscalingConfig(
            min_replicas=1, max_replicas=4, target=target, stable_window_s=10, panic_window_s=2)))
        state.register(_info(config), 1)
        assert state._policy.__wrapped__.settings.target == target


def _info(config: RayAutoscalingConfig) -> DeploymentInfo:
    return DeploymentInfo(deployment_config=DeploymentConfig(autoscaling_config=config),
                          replica_config=ReplicaConfig.create(lambda: None),
                          start_time_ms=0, deployer_job_id="test")


def _ray_ctx(config, policy_state, replicas, target, values, now, queued=0.0):
    raw = {"requests_in_flight": {f"r{i}": series((now, v)) for i, v in enumerate(values)}}
    return AutoscalingContext(
        deployment_id=None, deployment_name="engine-demo", app_name="keel-model-demo",
        current_num_replicas=replicas, target_num_replicas=target, running_replicas=[],
        total_num_requests=queued + sum(values), total_queued_requests=queued,
        aggregated_metrics={}, raw_metrics=raw, capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas, policy_state=policy_state,
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)


@pytest.mark.parametrize("values, expected", [
    ([40], 2),  # up: x2 at most a step, Ray's factor 1 and delay 0 add nothing
    ([10, 10, 10, 10], 4),  # steady: no change
])
def test_rays_wrapper_passes_the_decision_through(values, expected):
    config = RayAutoscalingConfig(**ray_autoscaling_config(AutoscalingConfig(**{
        **kwargs(), "min_replicas": 1, "max_replicas": 8})))
    state = DeploymentAutoscalingState(DeploymentID(name="engine-demo", app_name="keel-model-demo"))
    state.register(_info(config), len(values))
    n = len(values)
    decided, _ = state._policy(_ray_ctx(config, {}, n, n, values, time.time()))
    assert decided == expected


def test_rays_wrapper_lets_the_policy_scale_down_at_once():
    # Ray's downscale_delay_s would hold a scale-down for 600 s by default; rendered 0, the
    # policy's own cooldown (0 here) and window decide alone.
    config = RayAutoscalingConfig(**ray_autoscaling_config(AutoscalingConfig(**kwargs())))
    state = DeploymentAutoscalingState(DeploymentID(name="engine-demo", app_name="keel-model-demo"))
    state.register(_info(config), 4)
    policy_state, t0 = {}, time.time()
    for k in range(12):  # a whole stable window (10 s) of 4 replicas carrying 1 request each
        decided, policy_state = state._policy(_ray_ctx(config, policy_state, 4, 4, [1, 1, 1, 1], t0 + k))
    assert decided == 1


def test_rays_cold_start_path_and_the_policy_agree_from_zero():
    config = RayAutoscalingConfig(**ray_autoscaling_config(AutoscalingConfig(**kwargs(min_replicas=0))))
    state = DeploymentAutoscalingState(DeploymentID(name="engine-demo", app_name="keel-model-demo"))
    state.register(_info(config), 0)
    decided, _ = state._policy(_ray_ctx(config, {}, 0, 0, [], time.time(), queued=5))
    assert decided == 1
    assert KeelAutoscalingPolicy(**kwargs(min_replicas=0))(fake_ctx(0, {}, total=5))[0] == 1


def test_the_rendered_config_turns_rays_own_delays_and_factors_off():
    a = ray_autoscaling_config(AutoscalingConfig(min_replicas=0, max_replicas=3, metrics_interval_s=2))
    assert (a["upscale_delay_s"], a["downscale_delay_s"], a["downscale_to_zero_delay_s"]) == (0, 0, 0)
    assert (a["upscaling_factor"], a["downscaling_factor"]) == (1, 1)
    assert a["metrics_interval_s"] == 2 and a["look_back_period_s"] > a["metrics_interval_s"]
    assert AutoscalingConfig.model_validate(a["policy"]["policy_kwargs"]).max_replicas == 3
