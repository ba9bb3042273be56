"""One replica of a model deployment: owns one vLLM engine server and advertises its address.

Ray Serve places, counts, autoscales, health-checks and replaces these replicas; the engine's
HTTP port is where the gateway streams from, so no token crosses Ray. The class carries no
Ray decorator (serving.app applies it) and takes its collaborators as arguments.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from serving.httpraw import http_get

log = logging.getLogger("keel.engine")

HEARTBEAT_S = 2.0


@dataclass
class EngineSpec:
    """Everything a replica needs to start its engine; built from the config by serving.app."""

    model: str  # public name, served by the engine under that name
    weights_path: str
    cli_args: list[str]  # vLLM serve flags from the config's `engine:`
    env: dict[str, str] = field(default_factory=dict)
    bind_host: str = "127.0.0.1"
    startup_timeout_s: float = 600.0


class EngineReplica:
    async def __init__(self, spec: EngineSpec, registry, replica_id: str | None = None):
        self.spec = spec
        self.registry = registry  # anything with heartbeat/remove; a Ray handle in production
        self.replica_id = replica_id or _serve_replica_id()
        self.host = _advertised_host(spec.bind_host)
        self.port = _free_port(spec.bind_host)
        self.proc = self._start_engine()
        await self._wait_until_ready()
        await self._heartbeat()
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        log.info("engine for %s ready at %s:%s (replica %s)", spec.model, self.host, self.port, self.replica_id)

    def _start_engine(self) -> subprocess.Popen:
        s = self.spec
        cmd = [
            sys.executable, "-m", "serving.engine.server", "--keel-parent", str(os.getpid()),
            "--model", s.weights_path, "--served-model-name", s.model,
            "--host", s.bind_host, "--port", str(self.port),
            # A log line per request costs CPU in the engine, Ray's log monitor, the GCS and the
            # driver, on the cores that generate tokens; the gateway accounts for requests.
            # A config can turn it back on (disable_uvicorn_access_log: false): later flags win.
            "--disable-uvicorn-access-log",
            *s.cli_args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **s.env}
        # Own session: the whole engine (API server + engine core) can be signalled as a group.
        return subprocess.Popen(cmd, env=env, start_new_session=True)

    async def _wait_until_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.startup_timeout_s
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"engine for {self.spec.model} exited with code {self.proc.returncode} while "
                    "starting; its log is in this replica's Ray worker log"
                )
            if await self._engine_healthy():
                return
            await asyncio.sleep(0.5)
        self._stop_engine()
        raise TimeoutError(f"engine for {self.spec.model} not ready after {self.spec.startup_timeout_s}s")

    async def _engine_healthy(self) -> bool:
        try:
            status, _ = await http_get(self._local_host(), self.port, "/health", timeout=5.0)
        except (OSError, asyncio.TimeoutError, ValueError):
            return False
        return status == 200

    async def _heartbeat(self) -> None:
        await _maybe_await(self.registry.heartbeat(self.spec.model, self.replica_id, self.host, self.port))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                if self.proc.poll() is None and await self._engine_healthy():
                    await self._heartbeat()
            except Exception:  # the registry restarting must not kill the replica
                log.warning("heartbeat for %s failed", self.replica_id, exc_info=True)

    # Ray Serve hooks -------------------------------------------------------------------------

    async def check_health(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"engine process exited with code {self.proc.returncode}")
        if not await self._engine_healthy():
            raise RuntimeError("engine does not answer /health")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's own load, for serving.autoscaling: requests reach it without Ray."""
        return {"ongoing_requests": await self.ongoing_requests()}

    async def ongoing_requests(self) -> float:
        try:
            status, body = await http_get(self._local_host(), self.port, "/metrics", timeout=2.0)
        except (OSError, asyncio.TimeoutError, ValueError):
            return 0.0
        if status != 200:
            return 0.0
        return engine_load(body.decode())

    def __del__(self):
        self.shutdown()

    def shutdown(self) -> None:
        beat = getattr(self, "_beat", None)
        if beat is not None:
            beat.cancel()
        registry = getattr(self, "registry", None)
        if registry is not None and getattr(self, "replica_id", None):
            try:
                registry.remove(self.replica_id)
            except Exception:
                pass
        self._stop_engine()

    def _stop_engine(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _local_host(self) -> str:
        return "127.0.0.1" if self.spec.bind_host in ("0.0.0.0", "::") else self.spec.bind_host


def engine_load(metrics_text: str) -> float:
    """Running + waiting requests from a vLLM /metrics page."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _maybe_await(x):
    if hasattr(x, "__await__"):
        return await x
    return x


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("0.0.0.0", "::") else "", 0))
        return s.getsockname()[1]


def _advertised_host(bind_host: str) -> str:
    if bind_host not in ("0.0.0.0", "::"):
        return bind_host
    try:
        import ray.util

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostbyname(socket.gethostname())


def _serve_replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"{socket.gethostname()}-{os.getpid()}"
