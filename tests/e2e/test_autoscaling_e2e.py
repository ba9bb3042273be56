"""Autoscaling on the real stack, from zero and back: the first request is held while a replica
starts, load scales the model to its maximum and reaches the new replica, and once load stops
the replicas go, draining (no stream cut), down to zero.

One stack, one module; the tests run in order and build on each other. Requests reach engines
without passing through Ray, so everything here depends on Keel's own signals: held requests
(the gateway's wake calls) and the engines' requests in flight. Deadlines are generous (2 shared
cores, engine starts under load), never the thing checked.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from serving.policy.identity import DEMO_KEY
from tests.e2e.conftest import AUTH, local_config, running_stack, wait_for

pytestmark = pytest.mark.e2e

STARTED_S = 600  # a replica's engine started (loaded cores: slow)
SCALED_S = 300  # a decision the policy makes within windows of seconds
LONG_TOKENS = 1500  # a long stream: the longest the demo model's context allows, with room


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    cfg = local_config()
    demo = cfg["models"]["demo"]
    demo["engine"]["max_model_len"] = 2048  # long streams in (c)
    # Two engines on one node: without this both pin their compute to core 0.
    demo["env"]["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    demo["deployment"] = {
        "num_cpus": 1,
        "drain_timeout_s": 120,
        "autoscaling": {
            "min_replicas": 0,
            "max_replicas": 2,
            "signal": "requests_in_flight",
            "target": 4,
            "stable_window_s": 10,
            "panic_window_s": 2,
            "scale_down_cooldown_s": 20,
            "metrics_interval_s": 1,
            "hold_timeout_s": 600,
        },
    }
    with running_stack(cfg, tmp_path_factory.mktemp("autoscaling")) as s:
        yield s


def replicas(stack) -> int:
    """Replicas the gateway can route to (its /health)."""
    return httpx.get(stack.url + "/health", timeout=10).json()["replicas"][stack.model]


class Streams:
    """`clients` threads sending streamed completions back to back until stopped; every stream
    is kept as (status, ended with [DONE], completion tokens, error event) to judge afterwards."""

    def __init__(self, stack, clients: int, max_tokens: int):
        self.stack, self.max_tokens = stack, max_tokens
        self.stop = threading.Event()
        self.results: list[tuple[int, bool, int | None, str | None]] = []
        self.spans: list[tuple[float, float]] = []  # (sent, ended) of each stream, monotonic
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)

    def _run(self):
        body = {
            "model": self.stack.model,
            "prompt": "scale",
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.Client(base_url=self.stack.url, timeout=300, headers=AUTH) as c:
            while not self.stop.is_set():
                done, tokens, error = False, None, None
                sent = time.monotonic()
                try:
                    with c.stream("POST", "/v1/completions", json=body) as r:
                        for line in r.iter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                event = json.loads(line[6:])
                                if "error" in event:
                                    error = event["error"].get("code")
                                if event.get("usage"):
                                    tokens = event["usage"]["completion_tokens"]
                        status = r.status_code
                except httpx.HTTPError as e:
                    status, error = 0, type(e).__name__
                self.results.append((status, done, tokens, error))
                self.spans.append((sent, time.monotonic()))

    def broken(self) -> list:
        return [r for r in self.results if r != (200, True, self.max_tokens, None)]


def test_a_model_at_zero_replicas_holds_the_first_request_and_answers_it(scaling):
    from openai import OpenAI

    stack = scaling
    assert replicas(stack) == 0 and stack.engine_servers() == []  # min_replicas 0: nothing runs idle
    client = OpenAI(base_url=stack.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=STARTED_S)
    started = time.monotonic()
    answer = client.chat.completions.create(
        model=stack.model, max_tokens=8, messages=[{"role": "user", "content": "wake up"}]
    )
    cold_start_s = time.monotonic() - started
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
    assert replicas(stack) == 1
    print(f"\ncold start of {stack.model} (first request at 0 replicas, sent -> answered): {cold_start_s:.1f} s")


def test_load_scales_to_the_maximum_and_traffic_reaches_the_new_replica(scaling):
    stack = scaling
    # 16 in flight against a target of 4: the policy wants 4, max_replicas caps it at 2. The load
    # stays on until the second replica serves, so the policy has no reason to take it back.
    with Streams(stack, clients=16, max_tokens=64) as load:
        assert wait_for(lambda: replicas(stack), lambda n: n >= 2, SCALED_S + STARTED_S, interval_s=2) == 2

        def served_by() -> dict[str, float]:  # a replica missing from one scrape is asked again
            return {
                dict(labels)["replica"]: v
                for (name, labels), v in stack.metrics().items()
                if name == "vllm:request_success_total" and v > 0
            }

        per_replica = wait_for(served_by, lambda seen: len(seen) >= 2, SCALED_S, interval_s=1)
    assert len(per_replica) == 2, per_replica
    assert load.results and load.broken() == [], load.broken()[:5]


def test_scaling_down_drains_cuts_no_stream_and_returns_to_zero(scaling):
    stack = scaling
    # Two clients streaming long answers back to back: 2 in flight, half a replica's target, so
    # once the load of the test before has left the stable window the policy goes to 1 replica
    # (after its cooldown) while streams are open on both replicas (least in flight spreads
    # them); the replica that goes leaves the gateways first, then drains its stream.
    with Streams(stack, clients=2, max_tokens=LONG_TOKENS) as long_streams:
        assert wait_for(lambda: replicas(stack), lambda n: n == 1, SCALED_S, interval_s=0.5) == 1
        left_gateways = time.monotonic()
        assert wait_for(lambda: len(stack.engine_servers()), lambda n: n == 1, SCALED_S, interval_s=1) == 1
    assert long_streams.results and long_streams.broken() == [], long_streams.broken()
    # The check means something only if streams were open when the replica left.
    assert any(start < left_gateways < end for start, end in long_streams.spans), long_streams.spans
    # Idle now: down to zero replicas, and no engine process left behind.
    assert wait_for(lambda: replicas(stack), lambda n: n == 0, SCALED_S, interval_s=1) == 0
    assert wait_for(lambda: len(stack.engine_servers()), lambda n: n == 0, SCALED_S, interval_s=1) == 0
    # And from zero again: a request is held and answered.
    r = httpx.post(
        stack.url + "/v1/completions",
        headers=AUTH,
        timeout=STARTED_S,
        json={"model": stack.model, "prompt": "again", "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
