"""Anomaly detection in the real gateway, in front of a stand-in engine: requests feed it, a
tick closes the bucket, and the anomaly is a metric, an audit record and an entry in GET
/v1/admin/anomalies (admin keys only); a policy reload keeps the baselines."""

from __future__ import annotations

import asyncio

from serving.gateway.anomalies import AnomalyFeed
from tests.unit.fake_engine import FakeEngine
from tests.unit.test_policy_gateway import ADMIN_KEY, APP_KEY, CHAT, Harness, error_of, policy

ANOMALIES = "/v1/admin/anomalies"
# Buckets are closed by hand here (tick); an hour-long bucket keeps the gateway's own tick away.
DETECT = {"bucket_s": 3600, "warmup_buckets": 5, "season_slots": 0, "consecutive": 1}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def bucket(h: Harness, t: float, requests: int) -> list:
    for _ in range(requests):
        resp = await h.post(CHAT)
        assert resp.status_code == 200, resp.text
    return h.gw.runtime.anomalies.tick(t)


async def spike(h: Harness) -> None:
    for k in range(8):
        assert await bucket(h, k * 3600.0, 2 + k % 2) == []
    events = await bucket(h, 8 * 3600.0, 30)
    assert ("start", "requests") in [(p, a.signal) for p, a in events]


def test_a_spike_of_requests_is_listed_counted_and_audited(tmp_path):
    async def go():
        async with Harness(policy(tmp_path, anomalies=DETECT), {"demo": FakeEngine(tokens=["ok"])}) as h:
            await spike(h)
            admin = await h.client.get(ANOMALIES, headers={"authorization": f"Bearer {ADMIN_KEY}"})
            metrics = (
                h.metric("keel_anomalies_total", tenant="acme", model="demo", signal="requests"),
                h.metric("keel_anomaly_active", tenant="acme", model="demo", signal="requests"),
            )
            return admin, metrics, h.audit_records(events=True)

    admin, metrics, records = run(go())
    assert admin.status_code == 200
    body = admin.json()
    assert body["enabled"] is True and body["bucket_s"] == 3600
    active = [a for a in body["active"] if a["signal"] == "requests"]
    assert len(active) == 1
    a = active[0]
    assert (a["tenant"], a["model"], a["direction"], a["value"]) == ("acme", "demo", "up", 30)
    assert 1 < a["expected"] < 4 and a["score"] >= 6
    assert metrics == (1.0, 1.0)
    audited = [r for r in records if r.get("event") == "anomaly" and r["signal"] == "requests"]
    assert [(r["phase"], r["tenant"], r["model"], r["id"]) for r in audited] == [("start", "acme", "demo", a["id"])]


def test_the_anomalies_endpoint_needs_an_admin_key(tmp_path):
    async def go():
        async with Harness(policy(tmp_path, anomalies=DETECT), {"demo": FakeEngine()}) as h:
            none = await h.client.get(ANOMALIES)
            app = await h.client.get(ANOMALIES, headers={"authorization": f"Bearer {APP_KEY}"})
            return none, app

    none, app = run(go())
    assert none.status_code == 401
    assert app.status_code == 403 and error_of(app)["code"] == "admin_only"


def test_a_policy_reload_keeps_baselines_and_active_anomalies(tmp_path):
    async def go():
        async with Harness(policy(tmp_path, anomalies=DETECT), {"demo": FakeEngine(tokens=["ok"])}) as h:
            await spike(h)
            before = h.gw.runtime.anomalies
            h.apply(policy(tmp_path, anomalies={**DETECT, "threshold": 7.0}))
            after = h.gw.runtime
            admin = await h.client.get(ANOMALIES, headers={"authorization": f"Bearer {ADMIN_KEY}"})
            return before, after, admin.json()

    before, after, body = run(go())
    assert after.anomalies is before
    assert after.anomalies.config.threshold == 7.0
    assert ("acme", "demo") in after.anomalies.detector.series
    assert after.anomalies.detector.series[("acme", "demo")].buckets == 9
    assert [a["signal"] for a in body["active"] if a["signal"] == "requests"] == ["requests"]


def test_disabled_detection_ends_what_was_active_and_feeds_nothing(tmp_path):
    async def go():
        async with Harness(policy(tmp_path, anomalies=DETECT), {"demo": FakeEngine(tokens=["ok"])}) as h:
            await spike(h)
            h.apply(policy(tmp_path, anomalies={**DETECT, "enabled": False}))
            admin = await h.client.get(ANOMALIES, headers={"authorization": f"Bearer {ADMIN_KEY}"})
            gauge = h.metric("keel_anomaly_active", tenant="acme", model="demo", signal="requests")
            return h.gw.runtime, admin.json(), gauge, h.audit_records(events=True)

    rt, body, gauge, records = run(go())
    assert rt.anomalies is None and not any(isinstance(s, AnomalyFeed) for s in rt.pipeline.stages)
    assert body == {"enabled": False, "active": [], "recent": []}
    assert gauge == 0.0
    ends = [r for r in records if r.get("event") == "anomaly" and r["phase"] == "end"]
    assert ends and {r["end_reason"] for r in ends} == {"disabled"}


def test_a_tick_that_wakes_before_the_bucket_ends_closes_each_bucket_once(monkeypatch):
    """The gateway's tick sleeps on the loop's clock, which may wake a millisecond before the wall
    clock reaches the bucket's end; each bucket is still closed once, after it ended."""
    import serving.gateway.anomalies as anomalies
    from serving.ops.anomaly_config import AnomalyConfig

    clock = [1_000_005.0]  # 5 s into a 10 s bucket
    closed: list[tuple[float, float]] = []  # (bucket start, wall clock when closed)

    async def early_sleep(delay: float) -> None:  # wakes 1 ms early when it can
        clock[0] += delay - 0.001 if delay > 0.002 else delay
        if len(closed) >= 3:
            raise asyncio.CancelledError

    watch = anomalies.AnomalyWatch(AnomalyConfig(bucket_s=10), metrics=None)
    watch.detector.observe("acme", "demo", 200, 10, 0.01, 0)
    watch.tick = lambda start, keys=None, done=True: closed.append((start, clock[0]))  # type: ignore[method-assign]
    monkeypatch.setattr(anomalies.time, "time", lambda: clock[0])
    monkeypatch.setattr(anomalies.asyncio, "sleep", early_sleep)
    try:
        asyncio.run(watch._run())
    except asyncio.CancelledError:
        pass
    assert [start for start, _ in closed] == [1_000_000.0, 1_000_010.0, 1_000_020.0]
    assert all(at >= start + 10 for start, at in closed)
