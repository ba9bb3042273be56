"""Builders: the only code that knows the stack runs on Ray Serve.

Serve applications (serving.plan says which part of the config goes where, and why):
- `keel`: `endpoint-registry` (1 replica), where engine replicas advertise their HTTP address,
  and `gateway` (ingress, N replicas sharing the port), the OpenAI-compatible front door;
- `keel-model-<name>` per configured model: its `engine-<name>` deployment (EngineReplica), so
  a change to one model rebuilds, restarts or scales that application alone.
Ray's own HTTP proxy is disabled: no request or token crosses Ray (docs/architecture.md).

Engines answer only requests that carry the stack's secret (serving.engine.auth); gateways send
it. Both get it from `stack_secret()` when their replica starts, never from the deployed config.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace

from ray import serve

from serving.config import KeelConfig
from serving.engine.args import to_cli_args
from serving.engine.replica import EngineReplica, EngineSpec
from serving.gateway.replica import GatewayReplica
from serving.plan import CONTROL_APP, MODEL_APP_PREFIX, StackState, desired, engine_deployment_name, from_serve, schema
from serving.registry import EndpointRegistry

APP_NAME = CONTROL_APP
_SECRET_NS = "keel"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # what Ray gives the head node alone (Serve's controller uses it)
_SECRET_KEY = f"{APP_NAME}/engine-api-key"
# Serve's access log would log every heartbeat and registry poll; requests never pass Ray.
_QUIET = {"enable_access_log": False}


class _RegistryClient:
    """EngineReplica's view of the registry deployment: the same two calls, over a handle."""

    def __init__(self, handle):
        self.handle = handle

    def heartbeat(self, model, replica_id, host, port, start_s=None):
        return self.handle.heartbeat.remote(model, replica_id, host, port, start_s)

    def remove(self, replica_id):
        return self.handle.remove.remote(replica_id)  # awaited when draining; else fire and forget


class EngineWaker:
    """Held demand as Ray Serve sees it (serving.gateway.hold): a call on the model's engine
    deployment. With no replica, Ray's handle queues it, reports it to the controller at once and
    every metrics_interval_s after (its router's cold-start push), where it counts as requests
    (`total_num_requests`, `total_queued_requests`) and Serve's cold-start path starts a replica;
    the call returns once one runs. Called on the gateway's own loop: the handle routes on its
    own thread and its response may be awaited from any loop."""

    def __init__(self):
        self._handles: dict = {}

    async def __call__(self, model: str) -> None:
        handle = self._handles.get(model)
        if handle is None:
            handle = self._handles[model] = serve.get_deployment_handle(
                engine_deployment_name(model), app_name=MODEL_APP_PREFIX + model, _check_exists=False
            )
        response = handle.wake.remote()
        try:
            await response
        except asyncio.CancelledError:
            response.cancel()  # no longer held: Ray stops counting it, or never sends it
            raise


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
    # Ray Serve awaits an async constructor; mypy wants __init__ to return None.
    async def __init__(self, spec: EngineSpec):  # type: ignore[misc]
        # A model's own application reaches the registry of the front application by name; at
        # the first deploy it may not exist yet, and calls on the handle wait until it does.
        handle = serve.get_deployment_handle("endpoint-registry", app_name=CONTROL_APP, _check_exists=False)
        await super().__init__(replace(spec, api_key=stack_secret()), _RegistryClient(handle))

    async def __del__(self):
        # Serve calls this when the replica stops (scale-down, replacement, removal, shutdown),
        # within graceful_shutdown_timeout_s: leave the registry, drain, then stop the engine.
        await self.drain_and_stop()


class GatewayDeployment(GatewayReplica):
    # Ray Serve awaits an async constructor; mypy wants __init__ to return None.
    async def __init__(self, server: dict, registry_handle):  # type: ignore[misc]
        await super().__init__(server, registry_handle, engine_api_key=stack_secret(), wake=EngineWaker())

    async def __del__(self):
        await self.drain_and_stop()


def engine_spec(args: dict) -> EngineSpec:
    """A model application's args (serving.plan.desired) as its replicas' EngineSpec."""
    return EngineSpec(
        model=args["model"],
        weights_path=args["weights_path"],
        cli_args=to_cli_args(args["engine"]),
        env=dict(args["env"]),
        bind_host=args["engine_host"],
        startup_timeout_s=args["startup_timeout_s"],
    )


def _registry():
    return serve.deployment(  # type: ignore[attr-defined]  # ray's overloads miss deployment(cls, **options)
        EndpointRegistry,
        name="endpoint-registry",
        num_replicas=1,
        # On the head node, as Serve pins its controller: a lost worker must not take the one
        # registry (and every gateway's view of the engines) with it.
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
        max_ongoing_requests=10_000,  # long polls from every gateway + heartbeats
        logging_config=_QUIET,
    ).bind()


def _gateway(server: dict, registry, **options):
    return serve.deployment(
        GatewayDeployment,
        name="gateway",
        num_replicas=server.get("gateway_replicas", 1),
        ray_actor_options={"num_cpus": 0, "resources": dict(server.get("gateway_resources") or {})},
        graceful_shutdown_timeout_s=server["drain_timeout_s"] + 10,
        logging_config=_QUIET,
        **options,
    ).bind(server, registry)  # type: ignore[attr-defined]  # ray's overloads miss deployment(cls, **options)


def _engine(args: dict, **options):
    return serve.deployment(
        EngineDeployment,
        name=engine_deployment_name(args["model"]),
        ray_actor_options=args["ray_actor_options"],
        # Requests reach the engine over its own port; this only keeps Serve's check that Ray
        # could route target_ongoing_requests to a replica (it warns otherwise) satisfied.
        max_ongoing_requests=100_000,
        logging_config=_QUIET,
        **options,
    ).bind(engine_spec(args))  # type: ignore[attr-defined]  # as above


def control_builder(args: dict) -> serve.Application:
    """The front application (`import_path: serving.app:control_builder`): registry + gateways.
    The gateways' policy and model list arrive as their user_config in the same schema."""
    return _gateway(args["server"], _registry())


def model_builder(args: dict) -> serve.Application:
    """One model's application (`import_path: serving.app:model_builder`); its replica count,
    autoscaling and drain timeout arrive as deployment overrides in the same schema."""
    return _engine(args)


def submit(cfg_or_state: KeelConfig | StackState) -> None:
    """Deploy (or update) the stack on the connected Ray cluster, declaratively: applications
    not in the state are deleted (their replicas drain)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    state = cfg_or_state if isinstance(cfg_or_state, StackState) else desired(cfg_or_state)
    # it raises, not returns None, when no controller runs (raise_if_no_controller_running)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(schema(state)))  # type: ignore[union-attr]


def deployed_state() -> StackState | None:
    """The state the running stack was last given (None: no stack)."""
    from ray.serve.context import _get_global_client

    # it raises, not returns None, when no controller runs (raise_if_no_controller_running)
    return from_serve(_get_global_client().get_serve_details())  # type: ignore[union-attr]
