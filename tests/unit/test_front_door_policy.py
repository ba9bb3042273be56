"""The front door with tenants configured: keys checked from the head, every refusal on the
audit trail and in the metrics, tenant-labelled metrics only for admins."""

from __future__ import annotations

import asyncio
import json

import httpx

from serving.gateway.limits import HttpLimits
from serving.gateway.server import Gateway, GatewaySettings
from tests.unit.fake_engine import FakeEngine
from tests.unit.test_front_door import read_all, responses
from tests.unit.test_policy_gateway import ADMIN_KEY, APP_KEY, CHAT, Harness, policy, run


def raw(h: Harness, data: bytes, port: int | None = None):
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port or h.gw.port)
        writer.write(data)
        return await read_all(reader)

    return go()


def test_a_keyless_request_is_refused_from_its_head_without_its_body_being_read(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine()}) as h:
            parsed = []
            h.gw.pipeline.stages[1].on_request = lambda ctx: parsed.append(ctx)  # ParseBody: never reached
            reader, writer = await asyncio.open_connection("127.0.0.1", h.gw.port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 8000000\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # no body byte sent
            return head, parsed, h.audit_records(), h.metric("keel_requests_total", status="401")

    head, parsed, records, count = run(go())
    assert head.startswith(b"HTTP/1.1 401") and b"connection: close" in head
    assert parsed == []
    assert [r["status"] for r in records] == [401] and records[0]["path"] == "/v1/chat/completions"
    assert count == 1


def test_unknown_routes_need_a_key_and_every_answer_is_audited(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(), "demo-b": FakeEngine()}) as h:
            auth = {"authorization": f"Bearer {APP_KEY}"}
            out = [
                (await h.client.get("/v1/secret-route")).status_code,
                (await h.client.get("/v1/secret-route", headers=auth)).status_code,
                (await h.client.get("/v1/models")).status_code,
                (await h.client.get("/v1/models/nope", headers=auth)).status_code,
                (await h.client.get("/v1/chat/completions", headers=auth)),
                (await h.client.get("/health")).status_code,
            ]
            malformed = await raw(h, b"BREW /coffee HTCPCP/1.0\r\n\r\n")
            await asyncio.sleep(0.05)
            return out, malformed, h.audit_records()

    out, malformed, records = run(go())
    assert out[:4] == [401, 404, 401, 404]
    assert out[4].status_code == 405 and out[4].headers["allow"] == "POST"
    assert out[5] == 200
    assert responses(malformed)[0][0] == 400
    statuses = [(r["path"], r["status"]) for r in records]
    assert statuses == [
        ("/v1/secret-route", 401),
        ("/v1/secret-route", 404),
        ("/v1/models", 401),
        ("/v1/models/nope", 404),
        ("/v1/chat/completions", 405),
        ("-", 400),
    ]
    assert records[1]["tenant"] == "acme" and records[1]["key_id"] == "app-1"


def test_two_authorization_headers_are_a_400(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine()}) as h:
            body = json.dumps(CHAT).encode()
            data = await raw(
                h,
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                b"authorization: Bearer nope\r\nauthorization: Bearer "
                + APP_KEY.encode()
                + b"\r\ncontent-length: %d\r\n\r\n" % len(body)
                + body,
            )
            return data, h.engines["demo"].requests, h.audit_records()

    data, seen, records = run(go())
    [(status, _, body)] = responses(data)
    err = json.loads(body)["error"]
    assert status == 400 and err["code"] == "duplicate_header" and err["param"] == "authorization"
    assert seen == [] and records[-1]["status"] == 400


def test_metrics_with_tenant_labels_need_an_admin_key_or_the_metrics_listener(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine()}) as h:
            await h.post(CHAT)
            nokey = await h.client.get("/metrics")
            app = await h.client.get("/metrics", headers={"authorization": f"Bearer {APP_KEY}"})
            admin = await h.client.get("/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
            # a gateway with the metrics listener, same policy
            gw = Gateway(GatewaySettings(port=0, metrics_port=0, limits=HttpLimits()), ["demo"], None)
            gw.set_policy(h.gw.runtime)
            await gw.start()
            async with httpx.AsyncClient() as c:
                scraped = await c.get(f"http://127.0.0.1:{gw.metrics_listen_port}/metrics")
                api = await c.post(f"http://127.0.0.1:{gw.metrics_listen_port}/v1/chat/completions", json=CHAT)
            await gw.stop()
            return nokey, app, admin, scraped, api

    nokey, app, admin, scraped, api = run(go())
    assert nokey.status_code == 401 and app.status_code == 403
    assert admin.status_code == 200 and 'tenant="acme"' in admin.text
    assert scraped.status_code == 200 and "keel_requests_total" in scraped.text
    assert api.status_code == 401  # not the API: unknown routes there need a key, as anywhere


def test_a_policed_stream_cut_by_an_engine_death_ends_with_an_error_event_and_is_audited(tmp_path):
    async def go():
        engine = FakeEngine(tokens=["Hello", " there", " my", " friend"], die_after=3)
        async with Harness(policy(tmp_path), {"demo": engine}) as h:
            r = await h.post({**CHAT, "stream": True})
            return r, h.audit_records(), await h.reserved_after_settling("acme")

    r, records, reserved = run(go())
    assert r.status_code == 200  # the head went out before the engine died
    events = [e for e in r.text.split("\n\n") if e]
    err = json.loads(events[-1][6:])["error"]
    assert err["code"] == "engine_failure"
    assert records[-1]["status"] == 502 and "incomplete" in records[-1]["error"]
    assert reserved == 0
