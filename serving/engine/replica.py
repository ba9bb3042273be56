"""One replica of a model deployment: owns one vLLM engine server and advertises its address.

Ray Serve places, counts, autoscales, health-checks and replaces these replicas; the engine's
HTTP port is where the gateway streams from, so no token crosses Ray. The class carries no
Ray decorator (serving.app applies it) and takes its collaborators as arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import psutil

from serving.autoscaling.signals import MetricsUnreadable, read_signals
from serving.engine.auth import KEY_ENV as ENGINE_KEY_ENV
from serving.engine.auth import MIDDLEWARE as ENGINE_AUTH_MIDDLEWARE
from serving.engine.server import TREE_ENV
from serving.httpraw import http_get

log = logging.getLogger("keel.engine")
_now = time.monotonic  # a module name, so a test can drive the replica's clock

HEARTBEAT_S = 2.0
# Stopping the engine: SIGTERM (vLLM shuts down cleanly), SIGKILL what is left after the grace,
# then wait for the kills to land. Bounded: it runs in Ray Serve's __del__ on the replica's loop.
STOP_GRACE_S = 10.0
KILL_WAIT_S = 5.0
# Draining: after the replica has left the registry, gateways learn it within milliseconds (they
# long-poll it); a request one of them had picked just before is connected well within this.
DRAIN_SETTLE_S = 1.0
# ... but a gateway under load can learn it seconds late (a CI run on a loaded box: 15 s, its
# registry calls slow) and still send a request just after the last one ended. So the engine
# stops only once it has had no request for this long, not at the first instant with none.
DRAIN_QUIET_S = 3.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0
# Ray starts a worker process for a new replica, and its imports take seconds before the
# constructor runs. A worker older than this was not started for this replica: its age is not
# this replica's cost.
FRESH_WORKER_S = 60.0


@dataclass
class EngineSpec:
    """Everything a replica needs to start its engine; built from the config by serving.app."""

    model: str  # public name, served by the engine under that name
    weights_path: str
    cli_args: list[str]  # vLLM serve flags from the config's `engine:`
    env: dict[str, str] = field(default_factory=dict)
    bind_host: str = "127.0.0.1"
    startup_timeout_s: float = 600.0
    api_key: str | None = field(default=None, repr=False)  # the stack's secret (serving.engine.auth)


def _worker_start_s() -> float:
    """Seconds this process ran before the replica's constructor (Ray's worker start and its
    imports), when Ray started it for this replica; 0 in an older worker."""
    try:
        age = time.time() - psutil.Process().create_time()
    except psutil.Error:
        return 0.0
    return age if 0 <= age < FRESH_WORKER_S else 0.0


class EngineReplica:
    # Ray Serve awaits an async constructor; mypy wants __init__ to return None.
    async def __init__(self, spec: EngineSpec, registry, replica_id: str | None = None):  # type: ignore[misc]
        started = _now() - _worker_start_s()
        self.spec = spec
        self.registry = registry  # anything with heartbeat/remove; a Ray handle in production
        self.replica_id = replica_id or _serve_replica_id()
        self.host = _advertised_host(spec.bind_host)
        self.port = _free_port(spec.bind_host)
        self.engine_tree = uuid.uuid4().hex  # in every engine process's environment (TREE_ENV)
        self.engine_seen: set[psutil.Process] = set()  # its descendants, noted at each heartbeat
        self.drain_timeout_s = DEFAULT_DRAIN_TIMEOUT_S  # from the deployment's user_config
        self._scrape_failing = False
        self.proc = self._start_engine()
        await self._wait_until_ready()
        # What one more replica costs from its worker's start (keel autoscale simulate's cold start)
        self.start_s = round(_now() - started, 1)
        self._note_engine_processes()
        await self._heartbeat()
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        log.info(
            "engine for %s ready at %s:%s in %.1fs (replica %s)",
            spec.model,
            self.host,
            self.port,
            self.start_s,
            self.replica_id,
        )

    def _start_engine(self) -> subprocess.Popen:
        s = self.spec
        cmd = [
            sys.executable,
            "-m",
            "serving.engine.server",
            "--keel-parent",
            str(os.getpid()),
            "--model",
            s.weights_path,
            "--served-model-name",
            s.model,
            "--host",
            s.bind_host,
            "--port",
            str(self.port),
            # A log line per request costs CPU in the engine, Ray's log monitor, the GCS and the
            # driver, on the cores that generate tokens; the gateway accounts for requests.
            # A config can turn it back on (disable_uvicorn_access_log: false): later flags win.
            "--disable-uvicorn-access-log",
            *s.cli_args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **s.env, TREE_ENV: self.engine_tree}
        if s.api_key:  # by environment: a command line is there for every local user to read
            cmd += ["--middleware", ENGINE_AUTH_MIDDLEWARE]
            env[ENGINE_KEY_ENV] = s.api_key
        # Own session: the whole engine (API server + engine core) can be signalled as a group.
        return subprocess.Popen(cmd, env=env, start_new_session=True)

    async def _wait_until_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.startup_timeout_s
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                self._stop_engine()  # what the API server left behind (engine core, workers)
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
        await _maybe_await(
            self.registry.heartbeat(self.spec.model, self.replica_id, self.host, self.port, self.start_s)
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                if self.proc.poll() is None:
                    self._note_engine_processes()
                    if await self._engine_healthy():
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
        """The engine's load on every autoscaling signal (serving.autoscaling.signals), from
        one scrape of its /metrics: requests reach it without Ray. A failed scrape reports
        nothing, so the policy leaves this replica out (never counts it idle); Ray records no
        point for the interval, and this is no health check, so the replica stays healthy."""
        try:
            status, body = await http_get(self._local_host(), self.port, "/metrics", timeout=2.0)
            if status != 200:
                raise MetricsUnreadable(f"/metrics answered {status}")
            signals = read_signals(body.decode())
            # vLLM's gauges count a request only once its engine core has it, and read 0
            # between steps (a small model spends most of a request outside them); the gateway
            # holds one connection per request from its first byte to its last.
            connections = await asyncio.to_thread(self.requests_in_flight)
            signals["requests_in_flight"] = max(signals["requests_in_flight"], float(connections))
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            if not self._scrape_failing:  # once per failing streak, not once a second
                log.warning("replica %s: no autoscaling report (%s)", self.replica_id, e)
            self._scrape_failing = True
            return {}
        self._scrape_failing = False
        return signals

    def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config for the deployment: what may change without a restart."""
        self.drain_timeout_s = float((user_config or {}).get("drain_timeout_s", DEFAULT_DRAIN_TIMEOUT_S))

    def requests_in_flight(self) -> int:
        """Open client connections to the engine's HTTP port: a gateway holds one per request
        from its first byte to its last, so this counts requests before vLLM's own gauges do
        (they count a request only once its engine core has it). Gateways keep connections
        alive between requests (serving/gateway/engine_conns.py): an idle one counts until it
        is reused or closed, at most the engine's keep-alive timeout (5 s) after a burst."""
        try:
            conns = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except psutil.Error:
            return 0
        return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port)

    async def wake(self) -> str:
        """What a gateway calls, through Ray Serve, while it holds requests for this model (scale
        to zero): Ray queues the call while the deployment has no replica, counts it as demand and
        starts one; this replica answers once its engine serves. Cheap: it does nothing."""
        return self.replica_id

    async def drain_and_stop(self) -> None:
        """Leave the registry, let the requests in flight finish (at most drain_timeout_s), then
        stop the engine. What Serve runs when this replica stops for any reason."""
        beat = getattr(self, "_beat", None)
        if beat is not None:
            beat.cancel()
        if getattr(self, "proc", None) is None:  # never started
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        try:
            await asyncio.wait_for(_maybe_await(self.registry.remove(self.replica_id)), 5.0)
        except Exception:  # the registry gone too (shutdown): heartbeats stop, it expires the entry
            log.warning("replica %s could not leave the registry; draining anyway", self.replica_id, exc_info=True)
        await asyncio.sleep(max(0.0, min(DRAIN_SETTLE_S, deadline - loop.time())))
        left = self.requests_in_flight()
        quiet_since = None if left else loop.time()
        while self.proc.poll() is None and loop.time() < deadline:
            if not left and quiet_since is not None and loop.time() - quiet_since >= DRAIN_QUIET_S:
                break
            await asyncio.sleep(0.2)
            left = self.requests_in_flight()
            if left:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
        if left:
            log.warning(
                "replica %s: %d requests still in flight after the %gs drain; stopping the engine",
                self.replica_id,
                left,
                self.drain_timeout_s,
            )
        else:
            log.info("replica %s drained; stopping its engine", self.replica_id)
        await asyncio.to_thread(self._stop_engine)

    def __del__(self):
        self.shutdown()

    def shutdown(self) -> None:
        """Stop at once: no drain (a replica garbage-collected, a failed start)."""
        beat = getattr(self, "_beat", None)
        if beat is not None:
            beat.cancel()
        registry = getattr(self, "registry", None)
        if registry is not None and getattr(self, "replica_id", None):
            try:
                registry.remove(self.replica_id)
            except Exception:  # noqa: BLE001 - shutdown goes on to stop the engine regardless
                pass
        self._stop_engine()

    def _note_engine_processes(self) -> None:
        """Remember the engine's processes while it runs: one that leaves the engine's group and
        renames itself (vLLM's setproctitle clobbers its environment) is still found at stop."""
        if self.proc.poll() is None:  # unreaped: the pid is still the engine's
            with contextlib.suppress(psutil.Error):
                now = psutil.Process(self.proc.pid).children(recursive=True)
                self.engine_seen = {p for p in self.engine_seen if p.is_running()}.union(now)

    def _stop_engine(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and not getattr(self, "_engine_stopped", False):  # __del__ may come twice
            self._engine_stopped = not stop_engine_tree(proc, self.engine_tree, self.engine_seen)

    def _local_host(self) -> str:
        return "127.0.0.1" if self.spec.bind_host in ("0.0.0.0", "::") else self.spec.bind_host


def stop_engine_tree(
    proc: subprocess.Popen, tree: str, seen=(), grace_s: float = STOP_GRACE_S, kill_wait_s: float = KILL_WAIT_S
) -> list[int]:
    """Stop every process of the engine `proc` leads, even when `proc` itself is already gone.

    The engine is its own process group (start_new_session); a process that left the group
    still carries `tree` in its environment, or is among the engine processes `seen` earlier.
    SIGTERM, then SIGKILL after grace_s. Returns the pids still running after that (none,
    unless one is stuck in the kernel).
    """
    alive: list[psutil.Process] = []
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        procs = alive + [p for p in _engine_processes(proc, tree, seen) if p not in alive]
        _signal_all(proc, procs, sig)
        alive = _wait_gone(proc, procs, time.monotonic() + wait_s)
        if not alive and proc.returncode is not None:
            return []
    log.warning("engine processes %s still running after SIGKILL", [p.pid for p in alive])
    return [p.pid for p in alive]


def _engine_processes(leader: subprocess.Popen, tree: str, seen) -> list[psutil.Process]:
    """The leader and its descendants, its process group, whatever carries its tree id, and
    those seen before that still run (psutil tells a reused pid by its start time)."""
    found = {p.pid: p for p in seen if _running(p, leader)}
    if leader.poll() is None:  # unreaped, so its pid is still ours
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(leader.pid)
            found.update((p.pid, p) for p in [top, *top.children(recursive=True)])
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid in found or p.pid == me:
            continue
        try:
            if os.getpgid(p.pid) == leader.pid or p.environ().get(TREE_ENV) == tree:
                found[p.pid] = p
        except (OSError, psutil.Error):  # gone, or not ours to read
            pass
    return list(found.values())


def _signal_all(leader: subprocess.Popen, procs: list[psutil.Process], sig: int) -> None:
    # The group's id is the leader's pid: it cannot name another group while the leader is
    # unreaped or a member we just saw is alive. The group signal reaches members newer than the scan.
    if leader.poll() is None or any(_pgid(p) == leader.pid for p in procs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(leader.pid, sig)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)  # psutil checks that the pid was not reused


def _wait_gone(leader: subprocess.Popen, procs: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until every process has exited (a zombie has: it holds no memory) or the deadline."""
    while True:
        leader.poll()  # reaps it: it is our child
        alive = [p for p in procs if _running(p, leader)]
        if (not alive and leader.returncode is not None) or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _running(p: psutil.Process, leader: subprocess.Popen) -> bool:
    if p.pid == leader.pid:
        return leader.returncode is None
    with contextlib.suppress(ChildProcessError):
        os.waitpid(p.pid, os.WNOHANG)  # reaps one reparented to us (if we are a subreaper)
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid) if p.is_running() else None
    except (OSError, psutil.Error):
        return None


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
    except Exception:  # noqa: BLE001 - no Ray here (a bare process): the host's own address
        return socket.gethostbyname(socket.gethostname())


def _serve_replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Serve replica: host and pid name it
        return f"{socket.gethostname()}-{os.getpid()}"
