"""The policy stages through the real gateway server, in front of stand-in engines (no Ray, no vLLM).

Each test drives the gateway over HTTP as a client would and checks what the client sees, what
the engine received, the audit file and the metrics.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from serving.config import REPO_ROOT
from serving.gateway.policy import ModelInfo, PolicyRuntime
from serving.gateway.server import Gateway, GatewaySettings
from serving.policy.audit import verify
from serving.policy.config import PolicyConfig
from serving.policy.identity import key_digest
from serving.policy.tokens import TokenCounter
from tests.unit.fake_engine import FakeEngine

DEMO_DIR = REPO_ROOT / ".keel" / "models" / "demo-tiny"
APP_KEY = "sk-keel-app-test-key"
ADMIN_KEY = "sk-keel-admin-test-key"
OTHER_KEY = "sk-keel-other-tenant"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def policy(tmp: Path, **over) -> dict:
    base = {
        "tenants": {
            "acme": {
                "keys": [
                    {"id": "app-1", "digest": key_digest(APP_KEY)},
                    {"id": "ops", "digest": key_digest(ADMIN_KEY), "role": "admin"},
                ],
                "models": ["demo", "chat"],
                "guardrails": "strict",
                "audit_content": True,
            },
            "other": {"keys": [{"id": "o-1", "digest": key_digest(OTHER_KEY)}], "models": ["demo-b"]},
        },
        "guardrails": {
            "strict": {
                "input": [
                    {"type": "pii", "entities": ["email"], "action": "redact"},
                    {"type": "deny", "terms": ["forbidden plan"], "action": "block"},
                ],
                "output": [
                    {"type": "pii", "entities": ["email"], "action": "redact"},
                    {"type": "deny", "terms": ["launch codes"], "action": "block"},
                ],
            }
        },
        "experiments": {"chat": {"variants": {"demo": 50, "demo-b": 50}}},
        "audit": {"dir": str(tmp / "audit")},
    }
    base.update(over)
    return base


class Harness:
    """A gateway with a policy, in front of one stand-in engine per model."""

    def __init__(self, pol: dict, engines: dict[str, FakeEngine]):
        self.pol = pol
        self.engines = engines

    async def __aenter__(self):
        counter = TokenCounter.from_model_dir(DEMO_DIR)
        self.infos = {m: ModelInfo(m, counter, 512) for m in ("demo", "demo-b")}
        self.gw = Gateway(GatewaySettings(port=0), ["demo", "demo-b"], None)
        snapshot = {}
        for model, eng in self.engines.items():
            port = await eng.start()
            snapshot[model] = [{"model": model, "replica_id": f"{model}-r1", "host": "127.0.0.1", "port": port}]
        self.gw.update_endpoints(snapshot)
        self.apply(self.pol)
        await self.gw.start()
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.gw.port}", timeout=10)
        return self

    def apply(self, pol: dict) -> None:
        self.gw.set_policy(
            PolicyRuntime(PolicyConfig.model_validate(pol), self.infos, self.gw.metrics, previous=self.gw.runtime)
        )

    async def __aexit__(self, *exc):
        await self.client.aclose()
        await self.gw.stop()
        await asyncio.sleep(0.05)  # settlements scheduled at the end of the last request
        self.gw.runtime.close()
        for eng in self.engines.values():
            await eng.stop()

    async def post(self, body: dict, key: str | None = APP_KEY, path="/v1/chat/completions", **headers):
        if key:
            headers["authorization"] = f"Bearer {key}"
        return await self.client.post(path, json=body, headers=headers)

    def metric(self, name: str, **labels) -> float:
        total = 0.0
        for fam in self.gw.metrics.registry.collect():
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    async def reserved_after_settling(self, tenant: str, wait_s: float = 2.0) -> float:
        """The reserved-tokens gauge once settlements (which run after the response) are done."""
        for _ in range(int(wait_s / 0.02)):
            if self.metric("keel_quota_reserved_tokens", tenant=tenant) == 0:
                break
            await asyncio.sleep(0.02)
        return self.metric("keel_quota_reserved_tokens", tenant=tenant)

    def audit_records(self, events: bool = False) -> list[dict]:
        """The request records (and with events=True, event records such as replica counts)."""
        self.gw.runtime.audit_log.flush()
        path = self.gw.runtime.audit_log.path
        # JSONL lines end at "\n" only: str.splitlines() would also split at U+2028 inside a record
        records = [json.loads(line) for line in Path(path).read_bytes().split(b"\n") if line.strip()]
        return [r for r in records if events or "event" not in r]


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    return body["error"]


def sse_text(resp: httpx.Response) -> tuple[str, list[dict]]:
    events = [e[6:] for e in resp.text.split("\n\n") if e.startswith("data: ")]
    assert events and events[-1] == "[DONE]" or any('"error"' in e for e in events)
    objs = [json.loads(e) for e in events if e != "[DONE]"]
    text = "".join((c.get("delta") or {}).get("content") or "" for o in objs for c in o.get("choices", []))
    return text, objs


# -- identity ------------------------------------------------------------------------------------


def test_missing_and_unknown_keys_get_401_and_are_audited(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(tokens=["ok"])}) as h:
            missing = await h.post(CHAT, key=None)
            unknown = await h.post(CHAT, key="sk-keel-nope")
            return missing, unknown, h.audit_records(), h.engines["demo"].requests

    missing, unknown, records, engine_requests = run(go())
    for r in (missing, unknown):
        assert r.status_code == 401
        assert error_of(r)["type"] == "authentication_error"
    assert "sk-keel-nope" not in unknown.text
    assert engine_requests == []
    assert [(r["status"], r["tenant"]) for r in records] == [(401, None), (401, None)]


def test_model_outside_the_tenants_list_is_403(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(tokens=["ok"])}) as h:
            return await h.post(CHAT, key=OTHER_KEY), await h.client.get(
                "/v1/models", headers={"authorization": f"Bearer {OTHER_KEY}"}
            )

    r, models = run(go())
    assert r.status_code == 403
    assert error_of(r)["code"] == "model_not_allowed"
    assert [m["id"] for m in models.json()["data"]] == ["demo-b"]  # a tenant sees only its models


# -- quotas --------------------------------------------------------------------------------------


def test_requests_past_the_limit_get_429_with_rate_limit_headers(tmp_path):
    pol = policy(tmp_path)
    pol["tenants"]["acme"]["quotas"] = {"requests_per_minute": 2, "tokens_per_minute": 100_000}

    async def go():
        async with Harness(pol, {"demo": FakeEngine(tokens=["ok"])}) as h:
            return [await h.post(CHAT) for _ in range(3)], h.audit_records()

    rs, records = run(go())
    assert [r.status_code for r in rs] == [200, 200, 429]
    assert rs[0].headers["x-ratelimit-limit-requests"] == "2"
    assert rs[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert rs[0].headers["x-ratelimit-limit-tokens"] == "100000"
    err = error_of(rs[2])
    assert err["type"] == "rate_limit_error" and "requests_per_minute" in err["message"]
    assert int(rs[2].headers["retry-after"]) >= 1
    assert rs[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert records[-1]["quota"].endswith("requests_per_minute") and records[-1]["status"] == 429


def test_reservation_settles_to_the_engines_usage(tmp_path):
    pol = policy(tmp_path)
    pol["tenants"]["acme"]["quotas"] = {"tokens_per_minute": 1000}

    async def go():
        async with Harness(pol, {"demo": FakeEngine(tokens=["a", "b", "c"], prompt_tokens=10)}) as h:
            first = await h.post({**CHAT, "max_tokens": 400})
            await asyncio.sleep(0.05)
            second = await h.post({**CHAT, "max_tokens": 1})
            return first, second, await h.reserved_after_settling("acme")

    first, second, reserved = run(go())
    assert first.status_code == 200
    # 1000 - 13 used: the 400 reserved came back, so the remaining tokens reflect only real usage
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert 1000 - 13 - 40 <= remaining <= 1000 - 13
    assert reserved == 0


def test_client_disconnect_mid_stream_releases_the_reservation(tmp_path):
    pol = policy(tmp_path)
    pol["tenants"]["acme"]["quotas"] = {"concurrent_requests": 1, "tokens_per_minute": 10_000}

    async def go():
        engine = FakeEngine(tokens=["x"] * 200, delay=0.01)
        async with Harness(pol, {"demo": engine}) as h:
            async with h.client.stream(
                "POST",
                "/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers={"authorization": f"Bearer {APP_KEY}"},
            ) as r:
                async for _ in r.aiter_bytes():
                    break  # hang up after the first bytes
            for _ in range(100):
                if engine.disconnects:
                    break
                await asyncio.sleep(0.02)
            reserved = await h.reserved_after_settling("acme")
            after = await h.post(CHAT)  # the concurrency slot is free again
            return reserved, engine.disconnects, after

    reserved, disconnects, after = run(go())
    assert disconnects == 1
    assert reserved == 0
    assert after.status_code == 200


# -- guardrails ----------------------------------------------------------------------------------


def test_blocked_prompt_is_400_and_never_reaches_the_engine(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(tokens=["ok"])}) as h:
            body = {**CHAT, "messages": [{"role": "user", "content": "Tell me the Forbidden Plan now"}]}
            return (
                await h.post(body),
                h.engines["demo"].requests,
                h.audit_records(),
                h.metric("keel_guardrail_actions_total", tenant="acme", action="block", direction="input"),
            )

    r, engine_requests, records, blocks = run(go())
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "content_policy_violation"
    assert "Forbidden Plan" not in err["message"]
    assert engine_requests == []
    assert records[-1]["guardrails"][0]["action"] == "block"
    assert blocks == 1


def test_prompt_pii_is_redacted_before_the_engine_sees_it(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(tokens=["ok"])}) as h:
            body = {**CHAT, "messages": [{"role": "user", "content": "mail me at jane.doe@example.com please"}]}
            r = await h.post(body)
            return r, h.engines["demo"].requests

    r, engine_requests = run(go())
    assert r.status_code == 200
    sent = json.loads(engine_requests[0][2])
    assert sent["messages"][0]["content"] == "mail me at [EMAIL] please"


def test_streamed_output_never_shows_an_email_split_across_tokens(tmp_path):
    tokens = ["Write to ", "jo", "hn.", "smith", "@", "exam", "ple", ".org", " today", "."]

    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(tokens=tokens)}) as h:
            r = await h.post({**CHAT, "stream": True})
            return r, h.audit_records()

    r, records = run(go())
    assert r.status_code == 200
    text, objs = sse_text(r)
    assert text == "Write to [EMAIL] today."
    assert "smith" not in r.text and "exam" not in r.text
    assert not any(o.get("usage") for o in objs)  # the client did not ask for usage
    assert records[-1]["completion_tokens"] == len(tokens)
    assert records[-1]["response"] == "Write to [EMAIL] today."
    assert {"guardrail": "pii", "action": "redact", "direction": "output", "entity": "email", "count": 1} in records[
        -1
    ]["guardrails"]


def test_usage_chunk_is_kept_when_the_client_asked_for_it(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(tokens=["a", "b"])}) as h:
            return await h.post({**CHAT, "stream": True, "stream_options": {"include_usage": True}})

    r = run(go())
    _, objs = sse_text(r)
    assert objs[-1]["usage"]["completion_tokens"] == 2


def test_stream_is_cut_with_an_error_event_when_an_output_guardrail_blocks(tmp_path):
    tokens = ["Here ", "are ", "the ", "launch", " codes", ": 1234", " and more"] + ["x"] * 50

    async def go():
        engine = FakeEngine(tokens=tokens, delay=0.005)
        async with Harness(policy(tmp_path), {"demo": engine}) as h:
            r = await h.post({**CHAT, "stream": True})
            await asyncio.sleep(0.1)
            return r, engine, h.audit_records()

    r, engine, records = run(go())
    assert r.status_code == 200
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    last = json.loads(events[-1])
    assert last["error"]["code"] == "content_policy_violation"
    assert "launch" not in r.text and "1234" not in r.text
    assert engine.completed == 0  # the engine was stopped, not left generating
    assert records[-1]["guardrails"][-1]["action"] == "block"


def test_non_streamed_output_is_redacted(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(tokens=["reach ", "a@b.io", " soon"])}) as h:
            return await h.post(CHAT)

    r = run(go())
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "reach [EMAIL] soon"
    assert int(r.headers["content-length"]) == len(r.content)


# -- A/B routing ---------------------------------------------------------------------------------


def test_experiment_assignment_is_sticky_per_user_and_named_in_a_header(tmp_path):
    async def go():
        engines = {"demo": FakeEngine(tokens=["A"]), "demo-b": FakeEngine(tokens=["B"])}
        async with Harness(policy(tmp_path), engines) as h:
            out = {}
            for user in [f"user-{i}" for i in range(20)]:
                seen = set()
                for _ in range(3):
                    r = await h.post({**CHAT, "model": "chat", "user": user})
                    seen.add((r.headers["x-keel-variant"], r.json()["choices"][0]["message"]["content"]))
                out[user] = seen
            return out, engines

    out, engines = run(go())
    assert all(len(s) == 1 for s in out.values())  # each user always gets the same variant
    variants = {next(iter(s))[0] for s in out.values()}
    assert variants == {"demo", "demo-b"}  # and both variants get users
    for v, content in (next(iter(s)) for s in out.values()):
        assert content == ("A" if v == "demo" else "B")  # the header names who answered
    sent = json.loads(engines["demo-b"].requests[0][2])
    assert sent["model"] == "demo-b"


def test_only_admin_keys_may_force_a_variant(tmp_path):
    async def go():
        engines = {"demo": FakeEngine(tokens=["A"]), "demo-b": FakeEngine(tokens=["B"])}
        async with Harness(policy(tmp_path), engines) as h:
            app = await h.post({**CHAT, "model": "chat"}, **{"x-keel-variant": "demo-b"})
            admin = [
                await h.post({**CHAT, "model": "chat", "user": f"u{i}"}, key=ADMIN_KEY, **{"x-keel-variant": "demo-b"})
                for i in range(5)
            ]
            return app, admin

    app, admin = run(go())
    assert app.status_code == 403
    assert {r.headers["x-keel-variant"] for r in admin} == {"demo-b"}


def test_shadow_variant_gets_a_copy_and_the_client_only_the_primary_answer(tmp_path):
    pol = policy(
        tmp_path, experiments={"chat": {"variants": {"demo": 1}, "shadow": {"variant": "demo-b", "percent": 100}}}
    )

    async def go():
        engines = {"demo": FakeEngine(tokens=["primary"]), "demo-b": FakeEngine(tokens=["shadow"])}
        async with Harness(pol, engines) as h:
            r = await h.post({**CHAT, "model": "chat"})
            for _ in range(100):
                if h.metric("keel_shadow_requests_total", variant="demo-b", status="200"):
                    break
                await asyncio.sleep(0.02)
            return r, engines, h.metric("keel_shadow_requests_total", variant="demo-b", status="200")

    r, engines, shadowed = run(go())
    assert r.json()["choices"][0]["message"]["content"] == "primary"
    assert len(engines["demo-b"].requests) == 1 and shadowed == 1


# -- audit, reload -------------------------------------------------------------------------------


def test_every_request_leaves_a_verifiable_audit_record(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(tokens=["ok"])}) as h:
            await h.post(CHAT)
            await h.post(CHAT, key=None)
            await h.client.post(
                "/v1/chat/completions", content=b"{not json", headers={"authorization": f"Bearer {APP_KEY}"}
            )
            await h.post({**CHAT, "model": "nope"})
            return h.audit_records(), h.gw.runtime.audit_log.path

    records, path = run(go())
    assert [r["status"] for r in records] == [200, 401, 400, 404]
    assert records[0]["tenant"] == "acme" and records[0]["key_id"] == "app-1"
    assert APP_KEY not in Path(path).read_text()
    assert verify(path).ok


def test_a_new_policy_applies_without_restarting_and_keeps_the_audit_chain(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(tokens=["ok"])}) as h:
            before = await h.post(CHAT)
            tighter = policy(tmp_path)
            tighter["tenants"]["acme"]["models"] = ["chat"]
            h.apply(tighter)
            after = await h.post(CHAT)
            return before, after, h.gw.runtime.audit_log.path

    before, after, path = run(go())
    assert before.status_code == 200 and after.status_code == 403
    assert verify(path).ok and verify(path).records == 3  # 2 requests, 1 replica count (serving.ops.replica_time)


def test_no_tenants_means_open_access_and_a_byte_relay(tmp_path):
    async def go():
        pol = {"audit": {"enabled": False}}
        async with Harness(pol, {"demo": FakeEngine(tokens=["a", "b"])}) as h:
            r = await h.post({**CHAT, "stream": True}, key=None)
            return r, h.engines["demo"].requests

    r, engine_requests = run(go())
    assert r.status_code == 200
    assert "stream_options" not in json.loads(engine_requests[0][2])  # body passed through untouched


def test_a_long_prompt_is_counted_exactly_off_the_event_loop(tmp_path):
    """Counting is ~1 µs a token: a long prompt goes to a worker thread (the tokenizer releases
    the GIL) so it does not stall other requests; short ones are counted inline."""
    import threading

    from serving.gateway import admission

    pol = policy(tmp_path, guardrails={})
    pol["tenants"]["acme"].pop("guardrails")
    pol["tenants"]["acme"]["quotas"] = {"tokens_per_minute": 10_000_000}
    long_text = " ".join(f"word{i}" for i in range(3000))  # ~20 KB body
    threads = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def count_each(self, path, payload):
            threads.append(threading.current_thread().name)
            return self.inner.count_each(path, payload)

    async def go():
        async with Harness(pol, {"demo": FakeEngine(tokens=["a"], prompt_tokens=10)}) as h:
            counter = h.infos["demo"].counter
            h.infos["demo"].counter = Recording(counter)
            h.infos["demo"].max_model_len = 32768  # room for the long prompt
            long_body = {**CHAT, "messages": [{"role": "user", "content": long_text}], "max_tokens": 1}
            short = await h.post({**CHAT, "max_tokens": 1})
            long = await h.post(long_body)
            records = {r["request_id"]: r for r in h.audit_records()}
            return short, long, counter.count("/v1/chat/completions", long_body), records

    short, long, expected, records = run(go())
    assert short.status_code == long.status_code == 200
    assert len(long.request.content) > admission.OFFLOAD_COUNT_BYTES
    assert threads[0] == "MainThread" and threads[1].startswith("keel-prompt-work")
    # the long request reserved its exact prompt count + max_tokens
    assert expected > 3000
    assert records[long.headers["x-request-id"]]["reserved_tokens"] == expected + 1


def test_kuberay_health_paths_need_no_key_when_tenants_are_configured(tmp_path):
    async def go():
        async with Harness(policy(tmp_path), {"demo": FakeEngine(), "demo-b": FakeEngine()}) as h:
            return [await h.client.get(p) for p in ("/-/healthz", "/-/routes", "/v1/models")]

    healthz, routes, models = run(go())
    assert healthz.status_code == 200 and healthz.text == "success"
    assert routes.status_code == 200
    assert models.status_code == 401  # the public paths are the exception, not the rule
