"""Builders: the only code that knows the stack runs on Ray Serve.

One Serve application, `keel`:
- `endpoint-registry` (1 replica): where engine replicas advertise their HTTP address;
- `engine-<model>` per configured model: EngineReplica, replicas/autoscaling from the config;
- `gateway` (ingress, N replicas sharing the port): the OpenAI-compatible front door.
Ray's own HTTP proxy is disabled: no request or token crosses Ray (docs/architecture.md).
"""

from __future__ import annotations

from ray import serve

from serving.autoscaling import POLICY_PATH
from serving.config import KeelConfig, load_manifest
from serving.engine.args import to_cli_args
from serving.engine.replica import EngineReplica, EngineSpec
from serving.gateway.replica import GatewayReplica
from serving.registry import EndpointRegistry

APP_NAME = "keel"
# Serve's access log would log every heartbeat and registry poll; requests never pass Ray.
_QUIET = {"enable_access_log": False}


class _RegistryClient:
    """EngineReplica's view of the registry deployment: the same two calls, over a handle."""

    def __init__(self, handle):
        self.handle = handle

    def heartbeat(self, model, replica_id, host, port):
        return self.handle.heartbeat.remote(model, replica_id, host, port)

    def remove(self, replica_id):
        self.handle.remove.remote(replica_id)  # fire and forget: the replica is going away


class EngineDeployment(EngineReplica):
    async def __init__(self, spec: EngineSpec, registry_handle):
        await super().__init__(spec, _RegistryClient(registry_handle))


class GatewayDeployment(GatewayReplica):
    async def __init__(self, config: dict, registry_handle, **engines):
        # `engines` only puts the engine deployments into the application graph.
        await super().__init__(config, registry_handle)


def engine_spec(cfg: KeelConfig, name: str) -> EngineSpec:
    mc = cfg.models[name]
    _, weights = load_manifest(cfg, mc.weights)
    return EngineSpec(
        model=name,
        weights_path=str(weights),
        cli_args=to_cli_args(mc.engine),
        env=dict(mc.env),
        bind_host=cfg.server.engine_host,
        startup_timeout_s=mc.deployment.startup_timeout_s,
    )


def engine_deployment_options(cfg: KeelConfig, name: str) -> dict:
    d = cfg.models[name].deployment
    actor = {"num_cpus": d.num_cpus}
    if d.num_gpus:
        actor["num_gpus"] = d.num_gpus
    if d.resources:
        actor["resources"] = dict(d.resources)
    opts = {
        "name": f"engine-{name}",
        "ray_actor_options": actor,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": 30,
        "logging_config": _QUIET,
    }
    if d.autoscaling is not None:
        opts["autoscaling_config"] = {
            **d.autoscaling.model_dump(exclude_none=True),
            "policy": {"policy_function": POLICY_PATH},
        }
    else:
        opts["num_replicas"] = d.num_replicas or 1
    return opts


def build_app(cfg: KeelConfig) -> serve.Application:
    registry = serve.deployment(
        EndpointRegistry,
        name="endpoint-registry",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,  # long polls from every gateway + heartbeats
        logging_config=_QUIET,
    ).bind()
    engines = {
        f"engine_{i}": serve.deployment(EngineDeployment, **engine_deployment_options(cfg, name)).bind(
            engine_spec(cfg, name), registry
        )
        for i, name in enumerate(cfg.models)
    }
    return serve.deployment(
        GatewayDeployment,
        name="gateway",
        num_replicas=cfg.server.gateway_replicas,
        ray_actor_options={"num_cpus": 0, "resources": dict(cfg.server.gateway_resources)},
        logging_config=_QUIET,
    ).bind(cfg.model_dump(mode="json"), registry, **engines)


def app_builder(args: dict) -> serve.Application:
    """For Serve config files and KubeRay RayService: `import_path: serving.app:app_builder`,
    `args: {config: /path/to/keel.yaml}`."""
    from serving.config import load_config

    return build_app(load_config(args["config"]))
