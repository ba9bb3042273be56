"""A gateway replica: runs the gateway server on its own uvloop thread, fed by the registry.

The server thread owns the listening socket and every client connection; Ray's event loop
(where this class's methods run) only polls the endpoint registry and hands snapshots over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading

from serving.config import KeelConfig, load_manifest
from serving.gateway.heap import freeze_long_lived
from serving.gateway.policy import ModelInfo, PolicyRuntime
from serving.gateway.server import Gateway, GatewaySettings
from serving.gateway.stages import Pipeline, default_stages
from serving.policy.config import PolicyConfig, check_policy_refs
from serving.policy.tokens import TokenCounter
from serving.priority import run_at_normal_priority

log = logging.getLogger("keel.gateway")

WATCH_TIMEOUT_S = 30.0


def model_infos(cfg: KeelConfig) -> dict[str, ModelInfo]:
    """Each model's tokenizer (for quotas and max_prompt_tokens) and context length."""
    infos = {}
    for name, mc in cfg.models.items():
        _, weights = load_manifest(cfg, mc.weights)
        try:
            counter = TokenCounter.from_model_dir(weights)
        except Exception as e:  # the engine still serves; token limits then count output only
            log.warning("model %s: no tokenizer in %s (%s); prompt tokens will not be counted", name, weights, e)
            counter = None
        max_len = mc.engine.get("max_model_len")
        if max_len is None:
            try:
                max_len = json.loads((weights / "config.json").read_text()).get("max_position_embeddings")
            except (OSError, ValueError):
                max_len = None
        infos[name] = ModelInfo(name, counter, max_len)
    return infos


def build_gateway(cfg: KeelConfig, engine_api_key: str | None = None) -> Gateway:
    models = list(cfg.models)
    s = cfg.server
    return Gateway(
        GatewaySettings(host=s.host, port=s.port, limits=s.limits,
                        connect_timeout_s=s.upstream_connect_timeout_s,
                        metrics_port=s.metrics_port, metrics_host=s.metrics_host,
                        # Only replicas of one stack share a port: a second stack started on a
                        # taken port must fail, not silently take half the traffic.
                        reuse_port=s.gateway_replicas > 1, engine_api_key=engine_api_key),
        models,
        Pipeline(default_stages(models)),
        model_info={m: {"max_model_len": c.engine.get("max_model_len")} for m, c in cfg.models.items()
                    if c.engine.get("max_model_len")},
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
    """The gateway listens only once it has a policy: Serve calls `reconfigure` with the policy
    (its user_config) right after construction, and again on every `keel apply`."""

    async def __init__(self, config: dict, registry, engine_api_key: str | None = None):
        self.cfg = KeelConfig.model_validate(config)
        self.registry = registry
        self.infos = model_infos(self.cfg)
        self.server = GatewayThread(build_gateway(self.cfg, engine_api_key))
        self.listening = False
        self._version = -1
        await self._refresh(timeout_s=0)
        self._poll = asyncio.get_running_loop().create_task(self._poll_loop())

    def reconfigure(self, user_config: dict) -> None:
        policy = PolicyConfig.model_validate(user_config or {})
        problems = check_policy_refs(policy, list(self.cfg.models))
        if problems:
            raise ValueError("invalid policy: " + "; ".join(problems))
        gw = self.server.gateway

        def swap():
            gw.set_policy(PolicyRuntime(policy, self.infos, gw.metrics, previous=gw.runtime))
            return gw.runtime.version

        version = self.server.call(swap)
        freeze_long_lived()
        if not self.listening:
            self.server.listen()
            self.listening = True
            log.info("gateway listening on %s:%s", self.cfg.server.host, self.cfg.server.port)
        log.info("gateway policy %s in force (%d tenants)", version, len(policy.tenants))

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

    def __del__(self):
        poll = getattr(self, "_poll", None)
        if poll is not None:
            poll.cancel()
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
