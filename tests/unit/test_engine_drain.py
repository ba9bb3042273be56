"""A stopping engine replica leaves the registry first, lets the requests it is answering finish
(bounded by drain_timeout_s), then stops its engine. Against a stand-in engine: an HTTP server
process that holds a connection open as a streaming answer does."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import psutil
import pytest

from serving.bench.stack import free_port
from serving.engine.replica import DRAIN_SETTLE_S, EngineReplica, EngineSpec

# Answers /health at once; any other path is an answer that lasts until the client hangs up.
ENGINE = """
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
        if self.path != "/health":
            while True:
                self.wfile.write(b"data: token\\n\\n"); self.wfile.flush(); time.sleep(0.05)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
WAIT_S = 30  # deadlines for what should happen at once (2 shared cores), never the thing checked


class Registry:
    def __init__(self):
        self.removed: list[tuple[str, float]] = []

    def remove(self, replica_id):
        self.removed.append((replica_id, time.monotonic()))


@pytest.fixture
def replica():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", ENGINE, str(port)], start_new_session=True)
    r = EngineReplica.__new__(EngineReplica)  # what draining needs: the engine it started
    r.spec = EngineSpec(model="m", weights_path="/nowhere", cli_args=[])
    r.proc, r.port, r.engine_tree, r.engine_seen = proc, port, "drain-test-tree", set()
    r.registry, r.replica_id = Registry(), "replica-1"
    r.reconfigure({"drain_timeout_s": WAIT_S})
    deadline = time.monotonic() + WAIT_S
    while not asyncio.run(r._engine_healthy()):
        assert time.monotonic() < deadline, "stand-in engine did not start"
        time.sleep(0.05)
    yield r
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def stream(port: int) -> socket.socket:
    """A client in the middle of an answer (the gateway's engine connection)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /v1/chat/completions HTTP/1.1\r\nhost: engine\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.0 200")
    return s


def wait(predicate, timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


async def drain_while(replica, during) -> float:
    """Run drain_and_stop; `during` runs in a thread meanwhile. Seconds the drain took."""
    start = time.monotonic()
    await asyncio.gather(replica.drain_and_stop(), asyncio.to_thread(during))
    return time.monotonic() - start


def test_a_stream_in_flight_finishes_before_the_engine_stops(replica):
    client = stream(replica.port)
    assert replica.requests_in_flight() == 1

    def meanwhile():
        assert wait(lambda: replica.registry.removed), "the replica did not leave the registry"
        time.sleep(2)  # the drain waits for the stream, however long it takes
        assert replica.proc.poll() is None, "the engine stopped with a stream in flight"
        client.recv(65536)  # still streaming
        client.close()  # the answer ends

    asyncio.run(drain_while(replica, meanwhile))
    assert replica.proc.poll() is not None  # then the engine stops
    assert [rid for rid, _ in replica.registry.removed] == ["replica-1"]


def test_a_request_that_arrives_just_after_the_last_one_ended_is_answered(replica):
    # A gateway that learns late that the replica left sends one more request right after the
    # last one ended: the engine must not stop at the first instant with nothing in flight.
    first = stream(replica.port)

    def meanwhile():
        assert wait(lambda: replica.registry.removed), "the replica did not leave the registry"
        time.sleep(DRAIN_SETTLE_S + 0.5)  # the drain is now waiting for the stream to end
        first.close()
        assert wait(lambda: replica.requests_in_flight() == 0)
        time.sleep(0.5)  # the late gateway's request
        late = stream(replica.port)
        time.sleep(1.0)
        assert replica.proc.poll() is None, "the engine stopped under the late request"
        late.recv(65536)  # still streaming
        late.close()

    asyncio.run(drain_while(replica, meanwhile))
    assert replica.proc.poll() is not None  # then the engine stops


def test_the_drain_is_bounded_by_drain_timeout_s(replica):
    replica.reconfigure({"drain_timeout_s": 1.5})
    client = stream(replica.port)
    took = asyncio.run(drain_while(replica, lambda: None))
    assert replica.proc.poll() is not None, "a stream that never ends kept the engine running"
    assert took < WAIT_S
    client.close()


def test_an_idle_replica_stops_without_waiting_out_the_timeout(replica):
    took = asyncio.run(drain_while(replica, lambda: None))
    assert replica.proc.poll() is not None and took < WAIT_S / 2


def test_only_client_connections_to_the_engine_port_count(replica):
    # The engine's own outgoing connections and listening socket are not requests in flight.
    assert replica.requests_in_flight() == 0
    clients = [stream(replica.port) for _ in range(3)]
    assert wait(lambda: replica.requests_in_flight() == 3)
    for c in clients:
        c.close()
    assert wait(lambda: replica.requests_in_flight() == 0)
    assert psutil.Process(replica.proc.pid).is_running()
