"""Builders: the only code that knows the stack runs on Ray Serve.

One Serve application, `keel`:
- `endpoint-registry` (1 replica): where engine replicas advertise their HTTP address;
- `engine-<model>` per configured model: EngineReplica, replicas/autoscaling from the config;
- `gateway` (ingress, N replicas sharing the port): the OpenAI-compatible front door.
Ray's own HTTP proxy is disabled: no request or token crosses Ray (docs/architecture.md).

Engines answer only requests that carry the stack's secret (serving.engine.auth); gateways send
it. Both get it from `stack_secret()` when their replica starts, never from the deployed config.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

from ray import serve

from serving.autoscaling import POLICY_PATH
from serving.config import KeelConfig, load_manifest
from serving.engine.args import to_cli_args
from serving.engine.replica import EngineReplica, EngineSpec
from serving.gateway.replica import GatewayReplica
from serving.registry import EndpointRegistry

APP_NAME = "keel"
_SECRET_NS = "keel"
_SECRET_KEY = f"{APP_NAME}/engine-api-key"
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


def stack_secret() -> str:
    """The secret every engine of the stack requires and every gateway sends.

    Made by whichever replica asks first and kept in the Ray cluster's own key-value store (the
    GCS), where a put that does not overwrite is atomic: every replica, on any node, started now
    or after a `keel apply` or an engine restart, reads the same one, and none of Serve's
    configs, status or logs shows it. It lives as long as the cluster."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_SECRET_KEY, secrets.token_urlsafe(32), overwrite=False, namespace=_SECRET_NS)
    return internal_kv._internal_kv_get(_SECRET_KEY, namespace=_SECRET_NS).decode()


class EngineDeployment(EngineReplica):
    async def __init__(self, spec: EngineSpec, registry_handle):
        await super().__init__(replace(spec, api_key=stack_secret()), _RegistryClient(registry_handle))


class GatewayDeployment(GatewayReplica):
    async def __init__(self, config: dict, registry_handle, **engines):
        # `engines` only puts the engine deployments into the application graph.
        await super().__init__(config, registry_handle, engine_api_key=stack_secret())


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


def build_app(cfg: KeelConfig, *, with_policy: bool = True) -> serve.Application:
    """with_policy=False leaves the gateway's user_config to the deploy schema (`keel serve`,
    `keel apply`), so that a policy change is a user_config change: reconfigure, no restart."""
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
    gateway_opts = {}
    if with_policy:
        gateway_opts["user_config"] = cfg.policy_dict()
    return serve.deployment(
        GatewayDeployment,
        name="gateway",
        num_replicas=cfg.server.gateway_replicas,
        ray_actor_options={"num_cpus": 0, "resources": dict(cfg.server.gateway_resources)},
        logging_config=_QUIET,
        **gateway_opts,
    ).bind(cfg.stack_dict(), registry, **engines)


def app_builder(args: dict) -> serve.Application:
    """The application as Serve config files build it (`import_path: serving.app:app_builder`).

    `args: {config: /path/to/keel.yaml}` (KubeRay RayService): the whole file, policy included.
    `args: {stack: {...}}` (`keel serve`, `keel apply`): the stack part only; the policy arrives
    as the gateway deployment's user_config in the same schema.
    """
    from serving.config import load_config, parse_config

    if "config" in args:
        return build_app(load_config(args["config"]))
    return build_app(parse_config(args["stack"], source="<deployed stack>", check_engine_args=False),
                     with_policy=False)


def deploy_schema(cfg: KeelConfig) -> dict:
    """The Serve deploy schema of a stack: what `keel serve` and `keel apply` submit."""
    return {"applications": [{
        "name": APP_NAME,
        "import_path": "serving.app:app_builder",
        "route_prefix": None,
        "args": {"stack": cfg.stack_dict()},
        "deployments": [{"name": "gateway", "user_config": cfg.policy_dict()}],
    }]}


def submit(cfg: KeelConfig) -> None:
    """Deploy (or update) the stack on the connected Ray cluster. Only a changed policy: the
    gateways reconfigure in place. A changed stack part: Serve redeploys."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(deploy_schema(cfg)))


def deployed_schema() -> dict | None:
    """The schema the running stack was last deployed with (None: no stack)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = (details.get("applications") or {}).get(APP_NAME)
    return (app or {}).get("deployed_app_config")
