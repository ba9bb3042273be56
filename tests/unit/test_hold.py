"""Scale to zero at the gateway: requests for a model with no ready replica are held, bounded,
timed out, dropped when their client leaves, released in order, and they ask for a replica
(serving.gateway.hold), against a stand-in engine and a fake waker (no Ray, no vLLM)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serving.gateway import hold as hold_module
from serving.gateway.hold import HoldSettings, RequestHold
from serving.gateway.policy import ModelInfo, PolicyRuntime
from serving.gateway.server import Gateway, GatewaySettings
from serving.policy.config import PolicyConfig
from serving.policy.identity import key_digest
from tests.unit.fake_engine import FakeEngine

KEY = "sk-keel-hold-test"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class FakeWaker:
    """Stands in for the Ray handle call: outstanding until `replica_up()`; counts calls and
    how many are outstanding, as Ray's handle queue would."""

    def __init__(self, fail_first: int = 0):
        self.calls = 0
        self.outstanding = 0
        self.cancelled = 0
        self.fail_first = fail_first
        self.up = asyncio.Event()

    async def __call__(self, model: str) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError("deployment not there yet")
        self.outstanding += 1
        try:
            await self.up.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.outstanding -= 1


class Stack:
    """A gateway with a tenant (quota, audit) whose model `demo` scales to zero."""

    def __init__(self, tmp, hold: HoldSettings, quotas: dict | None = None):
        self.tmp, self.hold_settings, self.quotas = tmp, hold, quotas
        self.waker = FakeWaker()
        self.engine = FakeEngine(chunks=3)

    async def __aenter__(self):
        self.gw = Gateway(GatewaySettings(port=0), ["demo"], None, wake=self.waker)
        self.gw.set_models(["demo"], {}, {"demo": self.hold_settings})
        tenant = {"keys": [{"id": "app", "digest": key_digest(KEY)}], "models": ["demo"]}
        if self.quotas:
            tenant["quotas"] = self.quotas
        pol = PolicyConfig.model_validate({"tenants": {"acme": tenant}, "audit": {"dir": str(self.tmp / "audit")}})
        self.gw.set_policy(PolicyRuntime(pol, {"demo": ModelInfo("demo", None, 512)}, self.gw.metrics))
        await self.gw.start()
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.gw.port}", timeout=10, headers={"authorization": f"Bearer {KEY}"}
        )
        return self

    async def __aexit__(self, *exc):
        await self.client.aclose()
        await self.gw.stop()
        await asyncio.sleep(0.05)
        self.gw.runtime.close()
        if self.engine.server is not None:
            await self.engine.stop()

    async def replica_up(self) -> None:
        port = await self.engine.start()
        self.waker.up.set()
        self.gw.update_endpoints({"demo": [{"model": "demo", "replica_id": "r1", "host": "127.0.0.1", "port": port}]})

    async def until_held(self, n: int) -> None:
        for _ in range(500):
            if self.gw.hold.held("demo") == n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.gw.hold.held('demo')} held, expected {n}")

    def metric(self, name: str, **labels) -> float:
        return sum(
            s.value
            for fam in self.gw.metrics.registry.collect()
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    async def reserved_after_settling(self) -> float:
        for _ in range(100):
            if self.metric("keel_quota_reserved_tokens", tenant="acme") == 0:
                break
            await asyncio.sleep(0.02)
        return self.metric("keel_quota_reserved_tokens", tenant="acme")

    def audit(self) -> list[dict]:
        """The request records (event records, e.g. replica counts, left out)."""
        import json
        from pathlib import Path

        self.gw.runtime.audit_log.flush()
        records = [
            json.loads(line) for line in Path(self.gw.runtime.audit_log.path).read_bytes().split(b"\n") if line.strip()
        ]
        return [r for r in records if "event" not in r]


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    return body["error"]


def test_a_request_at_zero_replicas_is_held_asks_for_a_replica_and_is_answered_once_one_is_ready(tmp_path):
    async def go():
        async with Stack(tmp_path, HoldSettings(timeout_s=20, max_requests=4)) as s:
            pending = asyncio.ensure_future(s.client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
            await s.until_held(1)
            held_gauge = s.metric("keel_requests_held", model="demo")
            await asyncio.sleep(0.05)
            outstanding = s.waker.outstanding  # the demand Ray would count while nothing runs
            await s.replica_up()
            r = await pending
            await s.until_held(0)
            return r, held_gauge, outstanding, s.waker, s.metric("keel_requests_held", model="demo"), s.engine

    r, held_gauge, outstanding, waker, held_after, engine = run(go())
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert len(engine.requests) == 1
    assert held_gauge == 1 and held_after == 0
    assert outstanding == 1 and waker.outstanding == 0


def test_each_held_request_keeps_one_wake_call_outstanding(tmp_path):
    async def go():
        async with Stack(tmp_path, HoldSettings(timeout_s=20, max_requests=8)) as s:
            pending = [asyncio.ensure_future(s.client.post("/v1/chat/completions", json=CHAT)) for _ in range(3)]
            await s.until_held(3)
            await asyncio.sleep(0.05)
            outstanding = s.waker.outstanding
            await s.replica_up()
            return outstanding, [r.status_code for r in await asyncio.gather(*pending)]

    outstanding, statuses = run(go())
    assert outstanding == 3  # Ray counts 3 queued calls: the policy sees 3 held, not 1
    assert statuses == [200] * 3


def test_held_requests_are_released_in_arrival_order():
    async def go():
        ready = False
        hold = RequestHold(lambda m: ready)
        hold.configure({"demo": HoldSettings(timeout_s=10, max_requests=8)})
        order = []
        loop = asyncio.get_running_loop()

        async def one(i):
            await hold.wait("demo", loop.time() + 10)
            order.append(i)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.sleep(0)  # each is queued before the next arrives
        await asyncio.sleep(0.01)
        assert hold.held("demo") == 5
        ready = True
        hold.endpoints_changed()
        await asyncio.gather(*tasks)
        return order, hold.held("demo")

    order, left = run(go())
    assert order == [0, 1, 2, 3, 4]
    assert left == 0


def test_a_full_hold_answers_503_at_once(tmp_path):
    async def go():
        async with Stack(tmp_path, HoldSettings(timeout_s=20, max_requests=2)) as s:
            pending = [asyncio.ensure_future(s.client.post("/v1/chat/completions", json=CHAT)) for _ in range(2)]
            await s.until_held(2)
            refused = await s.client.post("/v1/chat/completions", json=CHAT)
            still_held = s.gw.hold.held("demo")
            await s.replica_up()
            return refused, still_held, [r.status_code for r in await asyncio.gather(*pending)], s.engine

    refused, still_held, statuses, engine = run(go())
    assert refused.status_code == 503
    err = error_of(refused)
    assert err["code"] == "model_not_ready" and err["type"] == "service_unavailable_error"
    assert int(refused.headers["retry-after"]) >= 1
    assert still_held == 2 and statuses == [200, 200] and len(engine.requests) == 2


def test_a_request_held_past_its_timeout_gets_503_with_retry_after_an_audit_record_and_its_quota_back(tmp_path):
    async def go():
        async with Stack(
            tmp_path, HoldSettings(timeout_s=0.3, max_requests=4), quotas={"tokens_per_minute": 100_000}
        ) as s:
            r = await s.client.post("/v1/chat/completions", json=CHAT)
            return (
                r,
                s.gw.hold.held("demo"),
                await s.reserved_after_settling(),
                s.audit(),
                s.waker,
                s.metric("keel_requests_total", model="demo", status="503"),
            )

    r, held, reserved, records, waker, counted = run(go())
    assert r.status_code == 503
    err = error_of(r)
    assert err["code"] == "model_not_ready" and "0.3 s" in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert held == 0 and reserved == 0
    assert waker.calls == 1 and waker.outstanding == 0 and waker.cancelled == 1  # Ray stops counting it
    rec = [x for x in records if x["request_id"] == r.headers["x-request-id"]]
    assert len(rec) == 1 and rec[0]["status"] == 503 and rec[0]["model"] == "demo"
    assert rec[0]["reserved_tokens"]  # it had a reservation, given back above
    assert counted == 1


def test_a_client_that_leaves_while_held_is_dropped_and_its_reservation_released(tmp_path):
    async def go():
        async with Stack(
            tmp_path, HoldSettings(timeout_s=20, max_requests=4), quotas={"tokens_per_minute": 100_000}
        ) as s:
            with pytest.raises(httpx.ReadTimeout):
                await s.client.post("/v1/chat/completions", json=CHAT, timeout=0.3)
            await s.until_held(0)
            for _ in range(100):
                if s.waker.outstanding == 0:
                    break
                await asyncio.sleep(0.01)
            reserved = await s.reserved_after_settling()
            await s.replica_up()
            await asyncio.sleep(0.1)
            return reserved, s.waker, s.engine, s.audit(), s.gw.requests_in_flight

    reserved, waker, engine, records, in_flight = run(go())
    assert reserved == 0 and in_flight == 0
    assert waker.cancelled == 1 and waker.outstanding == 0
    assert engine.requests == []  # never sent once a replica came
    assert [x["status"] for x in records if x["path"] == "/v1/chat/completions"] == [499]


def test_a_failed_wake_call_is_retried_while_the_request_is_held(monkeypatch):
    monkeypatch.setattr(hold_module, "WAKE_RETRY_S", (0.01,))

    async def go():
        ready = False
        waker = FakeWaker(fail_first=2)
        hold = RequestHold(lambda m: ready, waker, recheck_s=0.05)
        hold.configure({"demo": HoldSettings(timeout_s=10, max_requests=8)})
        task = asyncio.ensure_future(hold.wait("demo", asyncio.get_running_loop().time() + 10))
        for _ in range(200):
            if waker.outstanding:
                break
            await asyncio.sleep(0.01)
        outstanding = waker.outstanding
        ready = True  # a replica marked down comes back by the clock: the recheck finds it
        await task
        return waker, outstanding, hold.wake_failures

    waker, outstanding, failures = run(go())
    assert failures == 2 and waker.calls == 3 and outstanding == 1
    assert waker.outstanding == 0


def test_models_that_do_not_scale_to_zero_still_get_503_at_once():
    async def go():
        waker = FakeWaker()
        gw = Gateway(GatewaySettings(port=0), ["demo"], None, wake=waker)
        gw.set_models(["demo"], {}, {})
        gw.set_policy(
            PolicyRuntime(PolicyConfig.model_validate({}), {"demo": ModelInfo("demo", None, 512)}, gw.metrics)
        )
        await gw.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            health = await c.get("/health")
        await gw.stop()
        return r, health, waker

    r, health, waker = run(go())
    assert r.status_code == 503 and error_of(r)["code"] == "model_not_ready"
    assert health.status_code == 503
    assert waker.calls == 0


def test_health_is_ok_for_a_model_idle_at_zero_replicas(tmp_path):
    async def go():
        async with Stack(tmp_path, HoldSettings(timeout_s=20, max_requests=4)) as s:
            return await s.client.get("/health"), await s.client.get("/-/healthz")

    health, healthz = run(go())
    assert health.status_code == 200 and health.json()["replicas"] == {"demo": 0}
    assert healthz.status_code == 200


def test_a_model_that_stops_scaling_to_zero_releases_its_held_requests_to_the_usual_503(tmp_path):
    async def go():
        async with Stack(tmp_path, HoldSettings(timeout_s=20, max_requests=4)) as s:
            pending = asyncio.ensure_future(s.client.post("/v1/chat/completions", json=CHAT))
            await s.until_held(1)
            s.gw.set_models(["demo"], {}, {})  # a reconfigure: min_replicas raised above 0
            return await pending

    r = run(go())
    assert r.status_code == 503 and error_of(r)["code"] == "model_not_ready"


def test_a_model_scaling_to_zero_reaches_the_gateways_with_its_hold_settings_live():
    import copy

    import yaml

    from serving.config import REPO_ROOT, parse_config
    from serving.plan import desired, make_plan

    before = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    after = copy.deepcopy(before)
    after["models"]["demo"]["deployment"] = {
        "num_cpus": 1,
        "autoscaling": {"min_replicas": 0, "max_replicas": 2, "hold_timeout_s": 600, "hold_max_requests": 8},
    }
    old, new = (desired(parse_config(c, check_engine_args=False)) for c in (before, after))
    assert "hold" not in old.gateway["models"]["demo"]  # min_replicas > 0: today's behaviour
    assert new.gateway["models"]["demo"]["hold"] == {"timeout_s": 600, "max_requests": 8}
    plan = make_plan(old, new)
    assert not plan.restart and any("models the gateways route to" in g for g in plan.gateway)
    defaults = copy.deepcopy(after)
    defaults["models"]["demo"]["deployment"]["autoscaling"] = {"min_replicas": 0, "max_replicas": 1}
    hold = desired(parse_config(defaults, check_engine_args=False)).gateway["models"]["demo"]["hold"]
    assert hold == {"timeout_s": 300.0, "max_requests": 64}
