"""Endpoint registry and replica choice: plain Python, no Ray."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from serving.engine import replica as replica_mod
from serving.engine.replica import EngineReplica, EngineSpec
from serving.gateway.endpoints import EndpointPool
from serving.gateway.server import Gateway, GatewaySettings
from serving.gateway.stages import Pipeline, default_stages
from serving.registry import EndpointRegistry


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_registry_expires_silent_replicas_and_versions_changes():
    clock = Clock()
    reg = EndpointRegistry(ttl_s=10, clock=clock)
    reg.heartbeat("demo", "a", "127.0.0.1", 9001)
    reg.heartbeat("demo", "b", "127.0.0.1", 9002)
    v = reg.version
    clock.t += 6
    reg.heartbeat("demo", "a", "127.0.0.1", 9001)  # a renewal is not a change
    assert reg.version == v
    clock.t += 6
    assert [e["replica_id"] for e in reg.snapshot()["demo"]] == ["a"]
    assert reg.version == v + 1
    reg.remove("a")
    assert reg.snapshot() == {}


def test_registry_watch_returns_on_change_and_on_timeout():
    async def go():
        reg = EndpointRegistry()
        v0, snap0 = await reg.watch(-1, timeout_s=5)  # unknown version: answers at once
        waiter = asyncio.create_task(reg.watch(v0, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        reg.heartbeat("demo", "a", "10.0.0.1", 9000)
        v1, snap1 = await asyncio.wait_for(waiter, 1)
        v2, _ = await reg.watch(v1, timeout_s=0.05)
        return snap0, v0, v1, snap1, v2

    snap0, v0, v1, snap1, v2 = asyncio.run(go())
    assert snap0 == {} and v1 == v0 + 1 and v2 == v1
    assert snap1 == {"demo": [{"model": "demo", "replica_id": "a", "host": "10.0.0.1", "port": 9000, "start_s": None}]}


def test_a_registry_that_did_not_run_for_longer_than_the_ttl_expires_no_one():
    """Starved of CPU, the registry's process wakes 15 s late with its replicas' heartbeats still
    in its queue: those replicas are alive, and a gateway watching must not see them vanish. One
    that stays silent once the registry runs again still expires."""
    clock = Clock()
    reg = EndpointRegistry(ttl_s=10, clock=clock)
    reg.heartbeat("demo", "a", "127.0.0.1", 9001)

    async def stalled_watch():
        async def stall():
            await asyncio.sleep(0.1)
            clock.t += 15  # the process did not run for 15 s

        task = asyncio.create_task(stall())
        result = await reg.watch(reg.version, timeout_s=1.5)
        await task
        return result

    _, snapshot = asyncio.run(stalled_watch())
    assert [e["replica_id"] for e in snapshot["demo"]] == ["a"]
    clock.t += 11  # silent past the ttl while the registry runs
    assert reg.snapshot() == {}


def test_pool_prefers_least_loaded_and_skips_down_replicas():
    clock = Clock()
    pool = EndpointPool(cooldown_s=5, clock=clock)
    pool.update({"demo": [{"replica_id": r, "host": "h", "port": p} for r, p in (("a", 1), ("b", 2))]})
    a, b = pool.all()
    a.in_flight = 3
    assert pool.pick("demo") is b
    pool.mark_down(b)
    assert pool.pick("demo") is a and pool.count("demo") == 1
    clock.t += 6
    assert pool.pick("demo") is b
    assert pool.pick("other") is None


def test_pool_update_keeps_in_flight_counts_of_surviving_replicas():
    pool = EndpointPool()
    pool.update({"demo": [{"replica_id": "a", "host": "h", "port": 1}]})
    pool.all()[0].in_flight = 2
    pool.update({"demo": [{"replica_id": "a", "host": "h", "port": 1}, {"replica_id": "b", "host": "h", "port": 2}]})
    assert sorted(e.in_flight for e in pool.all()) == [0, 2]


class _RunningEngine:
    """The engine process as the replica sees it while it starts: alive."""

    returncode = None

    def poll(self):
        return None


def test_each_replica_start_reaches_the_gateways_health(monkeypatch):
    # The replica's worker ran 4.2 s before the constructor; the replica's clock moves 20 s while its
    # engine does not answer yet, 3.4 s more until it does.
    clock = Clock()
    answers = iter([(20.0, False), (3.4, True)])

    async def engine_healthy(self):
        step, ok = next(answers)
        clock.t += step
        return ok

    monkeypatch.setattr(replica_mod, "_now", clock)
    monkeypatch.setattr(replica_mod, "_worker_start_s", lambda: 4.2)  # Ray's worker, before the constructor

    def start_engine(self):
        self._engine_stopped = True  # nothing to stop, whenever the replica is collected
        return _RunningEngine()

    monkeypatch.setattr(EngineReplica, "_start_engine", start_engine)
    monkeypatch.setattr(EngineReplica, "_engine_healthy", engine_healthy)
    monkeypatch.setattr(EngineReplica, "_note_engine_processes", lambda self: None)

    async def go():
        registry = EndpointRegistry()
        replica = EngineReplica.__new__(EngineReplica)
        await replica.__init__(EngineSpec(model="demo", weights_path="/nowhere", cli_args=[]), registry, "r1")
        replica._beat.cancel()
        registry.heartbeat("demo", "r0", "127.0.0.1", 9000)  # a replica of an older Keel: says nothing
        gw = Gateway(GatewaySettings(port=0, reuse_port=False), ["demo"], Pipeline(default_stages(["demo"])))
        gw.update_endpoints(registry.snapshot())
        await gw.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
                return replica, await c.get("/health")
        finally:
            await gw.stop()

    replica, health = asyncio.run(asyncio.wait_for(go(), 20))
    assert replica.start_s == 27.6
    assert health.status_code == 200
    assert health.json()["replicas"] == {"demo": 2} and health.json()["replica_start_s"] == {"demo": [27.6]}


def test_a_worker_started_for_the_replica_counts_an_older_one_does_not(monkeypatch):
    import psutil

    for age, counted in ((5.0, 5.0), (replica_mod.FRESH_WORKER_S + 1, 0.0)):
        monkeypatch.setattr(psutil.Process, "create_time", lambda self, age=age: time.time() - age)
        assert replica_mod._worker_start_s() == pytest.approx(counted, abs=0.5)
