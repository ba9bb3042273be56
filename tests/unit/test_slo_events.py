"""What the gateway counts for each SLO: keel_slo_events_total and the TTFT/TPOT histograms,
through the real gateway in front of stand-in engines (and the judge on its own)."""

from __future__ import annotations

from serving.gateway.metrics import GatewayMetrics
from serving.ops.slo_config import SloConfig
from serving.ops.slo_events import RequestTiming, SloJudge
from tests.unit.fake_engine import FakeEngine
from tests.unit.test_policy_gateway import CHAT, Harness, policy, run

STREAM = {**CHAT, "stream": True}
TOKENS = ["a", "b", "c", "d"]


def slos(**entries) -> dict:
    return {"slos": {n: {"objective": 0.99, **e} for n, e in entries.items()}}


def events(h: Harness, slo: str, good: str, **labels) -> float:
    return h.metric("keel_slo_events_total", slo=slo, good=good, **labels)


def judge(**entries) -> SloJudge:
    return SloJudge({n: SloConfig.model_validate({"objective": 0.99, **e}) for n, e in entries.items()})


# -- the judge -----------------------------------------------------------------------------------


def test_availability_counts_5xx_as_bad_4xx_as_good_and_skips_client_gone():
    j = judge(avail={"kind": "availability"})
    assert j.judge("demo", "acme", RequestTiming(200)) == [("avail", True)]
    assert j.judge("demo", "acme", RequestTiming(429)) == [("avail", True)]
    assert j.judge("demo", "acme", RequestTiming(502)) == [("avail", False)]
    assert j.judge("demo", "acme", RequestTiming(499)) == []
    assert j.judge(None, None, RequestTiming(401)) == []  # no model resolved: no SLO applies


def test_latency_slos_judge_only_requests_that_have_the_timing():
    j = judge(ttft={"kind": "ttft", "threshold_ms": 500}, tpot={"kind": "tpot", "threshold_ms": 50})
    assert j.judge("demo", "acme", RequestTiming(200)) == []  # not streamed
    assert j.judge("demo", "acme", RequestTiming(200, ttft_s=0.5, tpot_s=0.051)) == [("ttft", True), ("tpot", False)]
    assert j.judge("demo", "acme", RequestTiming(200, ttft_s=0.6)) == [("ttft", False)]


def test_models_and_tenants_limit_what_an_slo_counts():
    j = judge(
        only_demo={"kind": "availability", "models": ["demo"]}, only_acme={"kind": "availability", "tenants": ["acme"]}
    )
    assert j.judge("demo", "other", RequestTiming(200)) == [("only_demo", True)]
    assert j.judge("demo-b", "acme", RequestTiming(200)) == [("only_acme", True)]
    assert j.thresholds_s() == {"ttft": [], "tpot": []}


# -- through the gateway -------------------------------------------------------------------------


def test_engine_errors_and_cut_streams_are_bad_events_client_errors_good(tmp_path):
    async def go():
        pol = policy(tmp_path, **slos(avail={"kind": "availability", "models": ["demo"]}))
        async with Harness(pol, {"demo": FakeEngine(tokens=TOKENS)}) as h:
            assert (await h.post(CHAT)).status_code == 200
            blocked = {**CHAT, "messages": [{"role": "user", "content": "the forbidden plan"}]}
            assert (await h.post(blocked)).status_code == 400  # a guardrail's refusal: not an outage
            good = events(h, "avail", "true", model="demo", tenant="acme")
            bad = events(h, "avail", "false", model="demo", tenant="acme")
            assert (good, bad) == (2, 0)
        async with Harness(pol, {"demo": FakeEngine(error_status=500, error_body=b'{"error": "boom"}')}) as h:
            assert (await h.post(CHAT)).status_code == 500
            assert events(h, "avail", "false", model="demo", tenant="acme") == 1
        async with Harness(pol, {"demo": FakeEngine(tokens=TOKENS, die_after=2)}) as h:
            resp = await h.post(STREAM)  # the engine dies mid-stream: the client gets an error event
            assert resp.status_code == 200 and '"error"' in resp.text
            assert events(h, "avail", "false", model="demo", tenant="acme") == 1
            assert events(h, "avail", "true", model="demo", tenant="acme") == 0

    run(go())


def test_ttft_and_tpot_events_and_histograms_for_streams(tmp_path):
    async def go():
        pol = policy(
            tmp_path,
            **slos(
                fast={"kind": "ttft", "threshold_ms": 0.001},  # nothing is this fast
                easy={"kind": "ttft", "threshold_ms": 60_000},
                tpot={"kind": "tpot", "threshold_ms": 60_000},
            ),
        )
        async with Harness(pol, {"demo": FakeEngine(tokens=TOKENS, delay=0.01)}) as h:
            for _ in range(2):
                assert (await h.post(STREAM)).status_code == 200
            assert (await h.post(CHAT)).status_code == 200  # not streamed: no first-token time
            assert (events(h, "fast", "true"), events(h, "fast", "false")) == (0, 2)
            assert (events(h, "easy", "true"), events(h, "easy", "false")) == (2, 0)
            assert events(h, "tpot", "true", model="demo", tenant="acme") == 2
            assert h.metric("keel_time_to_first_token_seconds_count", model="demo", variant="demo") == 2
            assert h.metric("keel_time_per_output_token_seconds_count", model="demo", variant="demo") == 2
            # the thresholds are bucket bounds: the histograms answer "how many within the SLO"
            assert h.metric("keel_time_to_first_token_seconds_bucket", model="demo", le="60.0") == 2
            assert h.metric("keel_time_per_output_token_seconds_bucket", model="demo", le="60.0") == 2

    run(go())


def test_a_changed_threshold_applies_to_the_next_request(tmp_path):
    async def go():
        pol = policy(tmp_path, **slos(t={"kind": "ttft", "threshold_ms": 60_000}))
        async with Harness(pol, {"demo": FakeEngine(tokens=TOKENS)}) as h:
            await h.post(STREAM)
            h.apply(policy(tmp_path, **slos(t={"kind": "ttft", "threshold_ms": 0.001})))
            await h.post(STREAM)
            assert (events(h, "t", "true"), events(h, "t", "false")) == (1, 1)
            h.apply(policy(tmp_path))  # the SLO removed: its counts stay, nothing new is counted
            await h.post(STREAM)
            assert events(h, "t", "true") + events(h, "t", "false") == 2

    run(go())


def test_first_event_creates_both_good_and_bad_series():
    m = GatewayMetrics()
    m.use_slos(judge(a={"kind": "availability"}))

    class Ctx:
        model, tenant, variant, payload, usage, received_at, guardrail_actions = "demo", "t", None, {}, None, 0.0, []

    class Out:
        status, error, first_byte_at, finished_at = 200, None, None, 1.0

    m.observe_request(Ctx(), Out())
    samples = {
        (s.labels["good"], s.value)
        for f in m.registry.collect()
        for s in f.samples
        if s.name == "keel_slo_events_total"
    }
    assert samples == {("true", 1.0), ("false", 0.0)}  # the error ratio reads 0, not "no data"


def test_histogram_buckets_come_from_the_first_policy_and_a_new_threshold_is_logged(caplog):
    m = GatewayMetrics()
    m.use_slos(judge(t={"kind": "ttft", "threshold_ms": 1234}))
    m.use_slos(judge(t={"kind": "ttft", "threshold_ms": 777}))  # changed live
    assert "0.777" in caplog.text and "until the gateway restarts" in caplog.text

    class Ctx:
        model, tenant, variant, usage, received_at, guardrail_actions = "demo", "t", None, None, 0.0, []
        payload = {"stream": True}

    class Out:
        status, error, first_byte_at, finished_at = 200, None, 0.5, 1.0

    m.observe_request(Ctx(), Out())
    bounds = {
        s.labels["le"]
        for f in m.registry.collect()
        for s in f.samples
        if s.name == "keel_time_to_first_token_seconds_bucket"
    }
    assert "1.234" in bounds and "0.777" not in bounds  # Prometheus histograms keep their buckets
    good = [
        s.value
        for f in m.registry.collect()
        for s in f.samples
        if s.name == "keel_slo_events_total" and s.labels["good"] == "true"
    ]
    assert good == [1]  # a 500 ms first token, judged against the new 777 ms
