"""A rollout's traffic split in the gateway, in front of stand-in engines: the candidate gets its
share of users, the same users as the share grows, is never listed nor addressable, and the
gateway's metrics tell baseline and candidate apart (what the rollout's gates read)."""

from __future__ import annotations

import asyncio
import json

import httpx

from serving.gateway.policy import ModelInfo, PolicyRuntime
from serving.gateway.server import Gateway, GatewaySettings
from serving.policy.config import PolicyConfig
from serving.policy.identity import key_digest
from serving.rollout.signals import by_variant, snapshot
from serving.rollout.spec import TrafficSplit, check_splits
from tests.unit.fake_engine import FakeEngine

CAND = "demo@candidate"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
KEY = "sk-keel-rollout-test"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class Split:
    """A gateway serving `demo` (and `demo-b`) with `demo` rolling out to CAND at `percent`."""

    def __init__(self, percent: float, policy: dict | None = None):
        self.percent = percent
        self.policy = policy or {}
        self.engines = {
            "demo": FakeEngine(tokens=["old"]),
            CAND: FakeEngine(tokens=["new"]),
            "demo-b": FakeEngine(tokens=["b"]),
        }

    async def __aenter__(self):
        self.gw = Gateway(GatewaySettings(port=0), ["demo", "demo-b"], None)
        snap = {}
        for model, eng in self.engines.items():
            port = await eng.start()
            snap[model] = [{"model": model, "replica_id": f"{model}-r1", "host": "127.0.0.1", "port": port}]
        self.gw.update_endpoints(snap)
        self.set_percent(self.percent)
        await self.gw.start()
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.gw.port}", timeout=10)
        return self

    def set_percent(self, percent: float) -> None:
        infos = {m: ModelInfo(m, None, 512) for m in ("demo", "demo-b", CAND)}
        split = {"demo": TrafficSplit(candidate=CAND, percent=percent)}
        self.gw.set_policy(
            PolicyRuntime(
                PolicyConfig.model_validate(self.policy),
                infos,
                self.gw.metrics,
                previous=self.gw.runtime,
                rollouts=split,
            )
        )

    async def __aexit__(self, *exc):
        await self.client.aclose()
        await self.gw.stop()
        self.gw.runtime.close()
        for eng in self.engines.values():
            await eng.stop()

    async def chat(self, user: str | None = None, **over):
        body = {**CHAT, **over}
        if user is not None:
            body["user"] = user
        headers = {"authorization": f"Bearer {KEY}"} if self.policy.get("tenants") else {}
        r = await self.client.post("/v1/chat/completions", json=body, headers=headers)
        return r


def answered_by(r: httpx.Response) -> str:
    return r.json()["choices"][0]["message"]["content"]


def test_no_share_sends_nobody_to_the_candidate():
    async def go():
        async with Split(0) as s:
            return [await s.chat(f"u{i}") for i in range(30)], s.engines[CAND].requests

    rs, cand_requests = run(go())
    assert {answered_by(r) for r in rs} == {"old"} and {r.headers["x-keel-variant"] for r in rs} == {"demo"}
    assert cand_requests == []


def test_candidate_gets_its_share_of_users_each_always_the_same_variant():
    async def go():
        async with Split(30) as s:
            users = [f"user-{i}" for i in range(100)] * 2
            rs = await asyncio.gather(*(s.chat(u) for u in users))
            seen = {}
            for u, r in zip(users, rs):
                seen.setdefault(u, set()).add((r.headers["x-keel-variant"], answered_by(r)))
            return seen, s.engines[CAND].requests

    seen, cand_requests = run(go())
    assert all(len(v) == 1 for v in seen.values())  # sticky
    on_cand = [u for u, v in seen.items() if next(iter(v)) == (CAND, "new")]
    assert 10 <= len(on_cand) <= 55, len(on_cand)  # ~30 of 100: within the binomial's 4.5 sigma
    assert all(next(iter(v)) in ((CAND, "new"), ("demo", "old")) for v in seen.values())
    assert json.loads(cand_requests[0][2])["model"] == CAND  # the engine is asked for its own name


def test_a_growing_share_only_moves_users_to_the_candidate():
    async def go():
        async with Split(20) as s:
            users = [f"u{i}" for i in range(100)]
            before = [r.headers["x-keel-variant"] for r in await asyncio.gather(*(s.chat(u) for u in users))]
            s.set_percent(60)
            after = [r.headers["x-keel-variant"] for r in await asyncio.gather(*(s.chat(u) for u in users))]
            return dict(zip(users, before)), dict(zip(users, after))

    before, after = run(go())
    assert all(after[u] == CAND for u, v in before.items() if v == CAND)  # nobody moved back
    assert sum(v == CAND for v in after.values()) > sum(v == CAND for v in before.values())


def test_requests_that_name_no_user_are_split_one_by_one():
    async def go():
        async with Split(50) as s:
            return {answered_by(await s.chat()) for _ in range(40)}

    assert run(go()) == {"old", "new"}  # not every anonymous request on one side


def test_the_candidate_is_never_listed_nor_addressable():
    async def go():
        async with Split(100) as s:
            listed = (await s.client.get("/v1/models")).json()
            direct = await s.chat(model=CAND)
            health = await s.client.get("/health")
            return listed, direct, health

    listed, direct, health = run(go())
    assert [m["id"] for m in listed["data"]] == ["demo", "demo-b"]
    assert direct.status_code == 404
    assert "Available: demo, demo-b." in direct.json()["error"]["message"]  # not the candidate
    assert health.status_code == 200 and CAND not in health.json()["replicas"]


def test_only_the_rolled_out_model_is_split():
    async def go():
        async with Split(100) as s:
            return [answered_by(await s.chat(f"u{i}", model="demo-b")) for i in range(10)]

    assert set(run(go())) == {"b"}


def test_tenants_allowed_the_model_reach_its_candidate():
    pol = {"tenants": {"acme": {"keys": [{"id": "k1", "digest": key_digest(KEY)}], "models": ["demo"]}}}

    async def go():
        async with Split(100, pol) as s:
            return await s.chat("someone")

    r = run(go())
    assert r.status_code == 200 and answered_by(r) == "new"


def test_metrics_tell_baseline_and_candidate_apart_for_the_gates():
    async def go():
        async with Split(50) as s:
            s.engines[CAND].error_status = 500
            s.engines[CAND].error_body = b'{"error": {"message": "boom"}}'
            statuses = [(await s.chat(f"u{i}")).status_code for i in range(60)]
            text = (await s.client.get("/metrics")).text
            return statuses, text

    statuses, text = run(go())
    signals = by_variant(snapshot(text, ("demo", CAND)), "demo", CAND)
    assert signals["candidate"]["requests"] == signals["candidate"]["errors"] == statuses.count(500) > 0
    assert signals["baseline"]["requests"] == statuses.count(200) > 0 and signals["baseline"]["errors"] == 0


def test_a_split_must_name_a_model_and_a_candidate_that_is_not_one():
    problems = check_splits(
        {"nope": TrafficSplit(candidate="x", percent=5), "demo": TrafficSplit(candidate="demo-b", percent=5)},
        ["demo", "demo-b"],
    )
    assert problems == [
        "rollouts.nope: no such model; configured: demo, demo-b",
        "rollouts.demo.candidate: `demo-b` is a public model name",
    ]


ADMIN = "sk-keel-rollout-admin"
KEYED = {
    "tenants": {
        "acme": {"keys": [{"id": "k1", "digest": key_digest(KEY)}], "models": ["demo", "demo-b"]},
        "ops": {"keys": [{"id": "a1", "digest": key_digest(ADMIN), "role": "admin"}]},
    }
}


def test_an_admin_can_ask_the_candidate_alone_at_zero_share():
    """What the rollout's evaluation gate does before the first step."""

    async def go():
        async with Split(0, KEYED) as s:
            pinned = await s.client.post(
                "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {ADMIN}", "x-keel-variant": CAND}
            )
            app = await s.client.post(
                "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {KEY}", "x-keel-variant": CAND}
            )
            other = await s.client.post(
                "/v1/chat/completions",
                json={**CHAT, "model": "demo-b"},
                headers={"authorization": f"Bearer {ADMIN}", "x-keel-variant": CAND},
            )
            return pinned, app, other, s.engines[CAND].requests

    pinned, app, other, cand_requests = run(go())
    assert pinned.status_code == 200 and answered_by(pinned) == "new" and pinned.headers["x-keel-variant"] == CAND
    assert len(cand_requests) == 1  # the app key's and the wrong model's requests never reached it
    assert app.status_code == 403 and app.json()["error"]["code"] == "variant_override_not_allowed"
    assert other.status_code == 400 and other.json()["error"]["code"] == "unknown_variant"


def test_without_tenants_the_candidate_can_be_pinned_as_the_admin_api_is_open():
    async def go():
        async with Split(0) as s:
            return await s.client.post("/v1/chat/completions", json=CHAT, headers={"x-keel-variant": CAND})

    r = run(go())
    assert r.status_code == 200 and answered_by(r) == "new"
