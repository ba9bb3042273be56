"""A gateway replica: runs the gateway server on its own uvloop thread, fed by the registry.

The server thread owns the listening socket and every client connection; Ray's event loop
(where this class's methods run) only polls the endpoint registry and hands snapshots over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

from serving.autoscaling import published
from serving.config import ServerConfig, default_models_dir
from serving.gateway.heap import freeze_long_lived
from serving.gateway.hold import HoldSettings
from serving.gateway.policy import ModelInfo, PolicyRuntime
from serving.gateway.server import Gateway, GatewaySettings
from serving.gateway.stages import Pipeline, default_stages
from serving.policy.config import PolicyConfig, check_policy_refs
from serving.policy.tokens import TokenCounter
from serving.priority import run_at_normal_priority
from serving.rollout.spec import TrafficSplit, check_splits

log = logging.getLogger("keel.gateway")

WATCH_TIMEOUT_S = 30.0


def load_model_info(name: str, weights_path: str, max_model_len: int | None) -> ModelInfo:
    """A model's tokenizer (for quotas and max_prompt_tokens) and context length."""
    weights = Path(weights_path)
    try:
        counter = TokenCounter.from_model_dir(weights)
    except Exception as e:  # noqa: BLE001 - the engine still serves; token limits then count output only
        log.warning("model %s: no tokenizer in %s (%s); prompt tokens will not be counted", name, weights, e)
        counter = None
    if max_model_len is None:
        try:
            max_model_len = json.loads((weights / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            max_model_len = None
    return ModelInfo(name, counter, max_model_len)


def build_gateway(server: ServerConfig, engine_api_key: str | None = None, wake=None) -> Gateway:
    """A gateway with no model yet: models and policy come with each reconfigure. `wake(model)`:
    a call that lasts until a replica of the model runs (serving.gateway.hold)."""
    return Gateway(
        GatewaySettings(
            host=server.host,
            port=server.port,
            limits=server.limits,
            connect_timeout_s=server.upstream_connect_timeout_s,
            metrics_port=server.metrics_port,
            metrics_host=server.metrics_host,
            # Only replicas of one stack share a port: a second stack started on a
            # taken port must fail, not silently take half the traffic.
            reuse_port=server.gateway_replicas > 1,
            engine_api_key=engine_api_key,
        ),
        [],
        Pipeline(default_stages([])),
        wake=wake,
    )


class GatewayThread:
    """Runs a Gateway on a dedicated uvloop event loop in a daemon thread."""

    def __init__(self, gateway: Gateway):
        import uvloop

        self.gateway = gateway
        self.loop = uvloop.new_event_loop()
        started = threading.Event()

        def run():
            run_at_normal_priority("the gateway")  # this thread only; Ray's threads keep theirs
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(started.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name="keel-gateway")
        self.thread.start()
        started.wait()

    def update_endpoints(self, snapshot: dict) -> None:
        self.loop.call_soon_threadsafe(self.gateway.update_endpoints, snapshot)

    def call(self, fn, *args, timeout: float = 30):
        """Run fn(*args) on the gateway's loop and return its result (policy objects bind to it)."""

        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def listen(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.start(), self.loop).result(timeout=30)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.gateway.stop(), self.loop).result(timeout=5)
            if self.gateway.runtime is not None:
                self.call(self.gateway.runtime.close)  # the audit log's last records reach the disk
            self.loop.call_soon_threadsafe(self.loop.stop)


class GatewayReplica:
    """The gateway listens only once it has a policy: Serve calls `reconfigure` with its
    user_config ({"policy": ..., "models": {name: {weights_path, max_model_len, hold?}}}) right
    after construction, and again whenever `keel apply` changes the policy or the models. `hold`
    ({timeout_s, max_requests}) marks a model that scales to zero (serving.gateway.hold)."""

    # Ray Serve awaits an async constructor; mypy wants __init__ to return None.
    async def __init__(  # type: ignore[misc]
        self, server: dict, registry, engine_api_key: str | None = None, wake=None
    ):
        self.settings = ServerConfig.model_validate(server)
        self.registry = registry
        self.infos: dict[str, ModelInfo] = {}
        self._loaded: dict[tuple, ModelInfo] = {}  # (name, weights, max_model_len) -> its info
        self.server = GatewayThread(build_gateway(self.settings, engine_api_key, wake))
        self.listening = False
        self._version = -1
        await self._refresh(timeout_s=0)
        self._poll = asyncio.get_running_loop().create_task(self._poll_loop())

    def reconfigure(self, user_config: dict) -> None:
        user_config = user_config or {}
        unknown = set(user_config) - {"policy", "models", "rollouts", "models_dir"}
        if unknown:
            raise ValueError(
                f"gateway user_config: unknown keys {sorted(unknown)} (policy, models, rollouts, models_dir)"
            )
        policy = PolicyConfig.model_validate(user_config.get("policy") or {})
        models = user_config.get("models") or {}
        rollouts = {m: TrafficSplit.model_validate(s) for m, s in (user_config.get("rollouts") or {}).items()}
        problems = check_policy_refs(policy, list(models)) + check_splits(rollouts, list(models))
        if problems:
            raise ValueError("invalid policy: " + "; ".join(problems))
        infos = {}
        for name, m in models.items():  # a tokenizer is loaded once per model and weights
            key = (name, m["weights_path"], m.get("max_model_len"))
            if key not in self._loaded:
                self._loaded[key] = load_model_info(name, m["weights_path"], m.get("max_model_len"))
            infos[name] = self._loaded[key]
        for name, s in rollouts.items():  # a candidate: routed to, never listed
            base = models[name]
            key = (s.candidate, s.weights_path or base["weights_path"], s.max_model_len)
            if key not in self._loaded:
                self._loaded[key] = load_model_info(s.candidate, key[1], s.max_model_len)
            infos[s.candidate] = self._loaded[key]
        self._loaded = {k: v for k, v in self._loaded.items() if infos.get(k[0]) is v}
        self.infos = infos
        gw = self.server.gateway
        model_info = {n: {"max_model_len": m["max_model_len"]} for n, m in models.items() if m.get("max_model_len")}
        holds = {n: HoldSettings.from_dict(m["hold"]) for n, m in models.items() if m.get("hold")}
        for name, s in rollouts.items():  # a candidate runs with its model's scale: zero too
            if name in holds:
                holds[s.candidate] = holds[name]

        def swap():
            # Where the admin API registers: the config's models_dir, else this node's default.
            gw.registrations.models_dir = Path(user_config.get("models_dir") or default_models_dir())
            gw.set_models(list(models), model_info, holds)
            gw.set_policy(PolicyRuntime(policy, infos, gw.metrics, previous=gw.runtime, rollouts=rollouts))
            assert gw.runtime is not None  # set just above
            return gw.runtime.version

        version = self.server.call(swap)
        # For the autoscaling policy in the Serve controller (serving.autoscaling.published).
        published.publish({n: m["autoscaling"] for n, m in models.items() if m.get("autoscaling")})
        freeze_long_lived()
        if not self.listening:
            self.server.listen()
            self.listening = True
            log.info("gateway listening on %s:%s", self.settings.host, self.settings.port)
        log.info("gateway policy %s in force (%d tenants, models: %s)", version, len(policy.tenants), ", ".join(models))

    async def _refresh(self, timeout_s: float = WATCH_TIMEOUT_S) -> None:
        self._version, snapshot = await self.registry.watch.remote(self._version, timeout_s)
        self.server.update_endpoints(snapshot)

    async def _poll_loop(self) -> None:
        """Long-polls the registry: a replica that comes or goes reaches the gateway at once."""
        while True:
            try:
                await self._refresh()
            except Exception:
                log.warning("endpoint registry unreachable; keeping the last snapshot", exc_info=True)
                await asyncio.sleep(1.0)

    async def check_health(self) -> None:
        if not self.server.alive():
            raise RuntimeError("gateway server thread died")

    async def drain_and_stop(self) -> None:
        """Stop accepting; the requests being relayed finish (up to server.drain_timeout_s)."""
        server = getattr(self, "server", None)
        if server is not None and server.alive():
            left = await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(server.gateway.drain(self.settings.drain_timeout_s), server.loop)
            )
            if left:
                log.warning(
                    "gateway stopping with %d requests still in flight after %gs", left, self.settings.drain_timeout_s
                )
        self.close()

    def __del__(self):
        self.close()

    def close(self) -> None:
        poll = getattr(self, "_poll", None)
        if poll is not None:
            poll.cancel()
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
