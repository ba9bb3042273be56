"""Keel on a two-node Ray cluster started on this machine: the code path of a real cluster.

A head node (custom resource `keel-gateway`) and a worker node (`keel-engine`), each a `ray start
--block` process in its own session, with its own ports and temp dir, so the cluster cannot
collide with the other e2e stacks on the box. `keel serve` joins it (`ray.address`), places the
gateway on the head and the engine on the worker; the engine binds 0.0.0.0 and advertises its
node's IP. Then the worker node is lost (SIGKILL to every process of it: raylet, workers,
agents) and comes back, and the model answers 503 + retry-after meanwhile, then serves again.

Disruptive to its own cluster only; marked so it runs after the tests that share the session stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from serving.bench.stack import free_port
from tests.e2e.conftest import AUTH, DEMO_KEY, local_config, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.disruptive]

GATEWAY_RESOURCE = "keel-gateway"
ENGINE_RESOURCE = "keel-engine"
# Two loopback addresses: the nodes have different IPs, as on a real cluster, and the engine must
# advertise its own node's.
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"
NODE_UP_S = 120  # generous deadlines (2 shared cores), never the thing a test checks
NODE_LOST_S = 60  # requests sent after the kill, at most, until the gateway has dropped the replica
PROCESS_GONE_S = 30
BACK_S = 600


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _node_env(head: bool) -> dict:
    """The caller's PYTHONPATH, so the nodes' workers import this Keel. The head turns Ray's token
    auth on by itself when this machine has a token; a worker joining by address must be told
    (RAY_AUTH_MODE=token), as Ray's docs say. `keel serve` is told nothing: it must find out."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    if not head and "RAY_AUTH_MODE" not in env:
        from ray._private.authentication.authentication_token_setup import AuthenticationTokenLoader

        if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
            env["RAY_AUTH_MODE"] = "token"
    return env


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _is_engine(p: psutil.Process) -> bool:
    """A process of an engine (API server, engine core, workers): vLLM renames the latter."""
    try:
        return "serving.engine.server" in _cmdline(p) or "KEEL_ENGINE_TREE" in p.environ()
    except psutil.Error:
        return False


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)


@dataclass
class RayNode:
    """One `ray start --block` process; every process of the node descends from it."""

    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def processes(self) -> list[psutil.Process]:
        return _descendants(psutil.Process(self.proc.pid)) if self.proc.poll() is None else []

    def engine_processes(self) -> list[psutil.Process]:
        return [p for p in self.processes if _is_engine(p)]

    def runs(self, marker: str) -> bool:
        return any(marker in _cmdline(p) for p in self.processes)

    def kill(self, spare=()) -> list[psutil.Process]:
        """SIGKILL every process of the node but those in `spare`; the ones killed."""
        victims = [p for p in self.processes if p not in spare]
        _kill_all(victims)
        self.proc.wait()
        return victims

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        procs = self.processes
        self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while [p for p in procs if _running(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        _kill_all([p for p in procs if _running(p)])
        if self.proc.poll() is None:
            self.proc.wait()


@dataclass
class Cluster:
    temp_dir: Path
    head_port: int = field(default_factory=free_port)
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.head_port}"

    def start_node(self, name: str, resources: dict, num_cpus: int, ip: str, head: bool = False) -> RayNode:
        log = self.temp_dir / f"{name}.log"
        cmd = [
            _ray(),
            "start",
            "--block",
            f"--node-ip-address={ip}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={self.temp_dir}",
            # The ports a node takes at fixed numbers by default, made free ones; workers'
            # ports random (0) instead of a range shared with every other cluster on the box.
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]
        if head:
            cmd += [
                "--head",
                f"--port={self.head_port}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=false",
            ]
        else:
            cmd += [f"--address={self.address}"]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=_node_env(head)
            )
        node = RayNode(name, proc, log)
        self.nodes.append(node)
        deadline = time.monotonic() + NODE_UP_S
        while not node.runs("raylet"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray node {name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head (GCS) last
            node.stop()


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's socket paths live under it and must fit in 107 bytes.
    c = Cluster(Path(tempfile.mkdtemp(prefix="keel-mn-", dir="/tmp")))
    try:
        c.start_node("head", {GATEWAY_RESOURCE: 1}, num_cpus=1, ip=HEAD_IP, head=True)
        c.start_node("worker", {ENGINE_RESOURCE: 1}, num_cpus=1, ip=WORKER_IP)
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    """`keel serve` joined to the cluster: the gateway on the head, the engine on the worker."""
    cfg = local_config()
    cfg["ray"] = {"address": cluster.address}
    cfg["server"]["gateway_resources"] = {GATEWAY_RESOURCE: 1}
    cfg["server"]["engine_host"] = "0.0.0.0"
    cfg["models"]["demo"]["deployment"]["resources"] = {ENGINE_RESOURCE: 1}
    tmp = tmp_path_factory.mktemp("multinode")
    cfg["rollouts"] = {"state_dir": str(tmp / "rollouts")}
    with running_stack(cfg, tmp) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=60)


def test_the_gateway_and_registry_run_on_the_head_and_the_engine_on_the_worker(cluster, stack):
    head, worker = cluster.nodes
    assert head.runs("ServeReplica:keel:gateway")
    assert head.runs("ServeReplica:keel:endpoint-registry")  # a lost worker does not take it along
    assert not worker.runs("ServeReplica:keel:gateway")
    assert worker.engine_processes() and not head.engine_processes()
    assert stack.ray_address.endswith(f":{cluster.head_port}")  # the ready message names this cluster


def test_the_gateway_reaches_the_engine_at_the_worker_nodes_address(cluster, stack, client):
    """The engine binds 0.0.0.0 and advertises its node's IP: mid-stream, the gateway's connection
    to the engine's port goes to the worker's address, not the head's."""
    head, worker = cluster.nodes
    (gateway,) = [p for p in head.processes if "ServeReplica:keel:gateway" in _cmdline(p)]
    (server,) = [p for p in worker.engine_processes() if "serving.engine.server" in _cmdline(p)]
    cmd = server.cmdline()
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = int(cmd[cmd.index("--port") + 1])
    stream = client.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=200,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    peers = set()
    for _ in stream:
        if not peers:  # the first chunk: the connection is open until the last
            peers = {c.raddr.ip for c in gateway.net_connections(kind="tcp") if c.raddr and c.raddr.port == port}
    assert peers == {WORKER_IP}


def test_the_openai_client_chats_and_streams_through_the_gateway(stack, client):
    reply = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    # How many text chunks is vLLM's (it merges deltas a slow reader has not caught up with).
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


@dataclass
class NodeLoss:
    answers: list[tuple[int, dict, dict]] = field(default_factory=list)  # status, headers, body
    seconds: list[float] = field(default_factory=list)  # how long each answer took (printed, not checked)
    no_answer: list[str] = field(default_factory=list)  # requests that raised (a hang times out)
    engine: list[psutil.Process] = field(default_factory=list)
    engine_survivors: list[str] = field(default_factory=list)
    back: str | None = None  # why the model did not serve again, if it did not


def _chat(stack) -> httpx.Response:
    body = {"model": stack.model, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}
    return httpx.post(stack.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def node_loss(cluster, stack, client) -> NodeLoss:
    """Kill the worker node, ask the model until the gateway has dropped its replica, then bring
    a worker back and wait until the model serves again."""
    _, worker = cluster.nodes
    seen = NodeLoss(engine=worker.engine_processes())
    assert seen.engine, "no engine on the worker to lose"
    # Every Ray process of the node, SIGKILLed; the engine is left to die with its replica.
    worker.kill(spare=seen.engine)
    gone_by = time.monotonic() + PROCESS_GONE_S
    while (alive := [p for p in seen.engine if _running(p)]) and time.monotonic() < gone_by:
        time.sleep(0.2)
    seen.engine_survivors = [f"{p.pid} {_cmdline(p)[:80]}" for p in alive]
    _kill_all(alive)
    # Nothing of the node runs now. (A request the engine had accepted as it died gets 502
    # engine_failure, as for any engine death; this is about the requests that come after.)
    deadline = time.monotonic() + NODE_LOST_S
    while time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            r = _chat(stack)
            seen.answers.append((r.status_code, dict(r.headers), r.json()))
            seen.seconds.append(time.monotonic() - sent)
        except (httpx.HTTPError, ValueError) as e:
            seen.no_answer.append(repr(e))
        replicas = httpx.get(stack.url + "/health", timeout=10).json().get("replicas")
        if replicas == {stack.model: 0} and len(seen.answers) >= 3:
            break
        time.sleep(0.5)
    print(
        f"\nnode lost: {len(seen.answers)} answers {sorted({a[0] for a in seen.answers})}, slowest "
        f"{max(seen.seconds, default=0):.3f} s, {len(seen.no_answer)} without an answer"
    )
    cluster.start_node("worker-2", {ENGINE_RESOURCE: 1}, num_cpus=1, ip=WORKER_IP)
    deadline = time.monotonic() + BACK_S
    seen.back = "no attempt"
    while time.monotonic() < deadline:
        try:
            if httpx.get(stack.url + "/health", timeout=10).json().get("replicas") == {stack.model: 1}:
                client.chat.completions.create(
                    model=stack.model, messages=[{"role": "user", "content": "back?"}], max_tokens=4
                )
                seen.back = None
                break
        except (openai.APIError, httpx.HTTPError) as e:
            seen.back = repr(e)
        time.sleep(2)
    return seen


def test_while_the_worker_is_lost_the_model_answers_503_with_retry_after(node_loss):
    assert node_loss.no_answer == []
    assert node_loss.answers, "no request was answered while the worker was gone"
    for status, headers, body in node_loss.answers:
        assert status == 503, (status, body)
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["code"] == "model_not_ready" and body["error"]["message"]
        assert headers.get("x-request-id")


def test_the_engine_dies_with_its_replica_when_the_node_is_lost(node_loss):
    assert node_loss.engine_survivors == []


def test_the_model_serves_again_once_a_worker_is_back(cluster, stack, node_loss):
    assert node_loss.back is None
    assert cluster.nodes[-1].engine_processes(), "the new engine is not on the new worker"
    r = _chat(stack)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
