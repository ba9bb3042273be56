"""A gateway replica: runs the gateway server on its own uvloop thread, fed by the registry.

The server thread owns the listening socket and every client connection; Ray's event loop
(where this class's methods run) only polls the endpoint registry and hands snapshots over.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from serving.config import KeelConfig
from serving.gateway.server import Gateway, GatewaySettings
from serving.gateway.stages import Pipeline, default_stages
from serving.priority import run_at_normal_priority

log = logging.getLogger("keel.gateway")

WATCH_TIMEOUT_S = 30.0


def build_gateway(cfg: KeelConfig) -> Gateway:
    models = list(cfg.models)
    s = cfg.server
    return Gateway(
        GatewaySettings(host=s.host, port=s.port, max_body_bytes=s.max_body_bytes,
                        connect_timeout_s=s.upstream_connect_timeout_s,
                        # Only replicas of one stack share a port: a second stack started on a
                        # taken port must fail, not silently take half the traffic.
                        reuse_port=s.gateway_replicas > 1),
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
        self.error: BaseException | None = None

        def run():
            run_at_normal_priority("the gateway")  # this thread only; Ray's threads keep theirs
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(gateway.start())
            except BaseException as e:  # e.g. the port is taken
                self.error = e
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name="keel-gateway")
        self.thread.start()
        started.wait()
        if self.error is not None:
            raise self.error

    def update_endpoints(self, snapshot: dict) -> None:
        self.loop.call_soon_threadsafe(self.gateway.update_endpoints, snapshot)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.gateway.stop(), self.loop).result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)


class GatewayReplica:
    async def __init__(self, config: dict, registry):
        self.cfg = KeelConfig.model_validate(config)
        self.registry = registry
        self.server = GatewayThread(build_gateway(self.cfg))
        self._version = -1
        await self._refresh(timeout_s=0)
        self._poll = asyncio.get_running_loop().create_task(self._poll_loop())
        log.info("gateway listening on %s:%s", self.cfg.server.host, self.cfg.server.port)

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
