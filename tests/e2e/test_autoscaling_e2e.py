"""Autoscaling follows engine load although requests reach engines without passing through Ray."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.e2e.conftest import AUTH, local_config, running_stack, wait_for

pytestmark = pytest.mark.e2e

DECIDED_S = 300  # generous deadlines (2 shared cores), not timing checks
STARTED_S = 600


@pytest.fixture(scope="module")
def autoscaling_stack(tmp_path_factory):
    cfg = local_config()
    cfg["models"]["demo"]["deployment"] = {
        "num_cpus": 1,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "signal": "requests_in_flight",
                        "target": 4, "stable_window_s": 4, "panic_window_s": 2,
                        "scale_down_cooldown_s": 600, "metrics_interval_s": 1},
    }
    with running_stack(cfg, tmp_path_factory.mktemp("autoscaling")) as s:
        yield s


def _replicas(stack) -> int:
    return httpx.get(stack.url + "/health", timeout=10).json()["replicas"][stack.model]


def test_engine_load_scales_the_model_up_and_traffic_reaches_the_new_replica(autoscaling_stack):
    stack = autoscaling_stack
    assert _replicas(stack) == 1
    stop = threading.Event()

    def load():
        body = {"model": stack.model, "prompt": "scale", "max_tokens": 128, "ignore_eos": True}
        with httpx.Client(base_url=stack.url, timeout=120, headers=AUTH) as c:
            while not stop.is_set():
                c.post("/v1/completions", json=body)

    workers = [threading.Thread(target=load, daemon=True) for _ in range(16)]  # 16 in flight vs target 4
    for w in workers:
        w.start()
    # Loaded until Ray has decided to scale up (the new replica has started its engine), then
    # unloaded so the new engine starts on idle cores.
    engines = wait_for(lambda: len(stack.engine_servers()), lambda n: n >= 2, DECIDED_S, interval_s=1)
    stop.set()
    for w in workers:
        w.join(timeout=130)
    assert engines == 2, f"one engine after {DECIDED_S}s of 16 requests in flight (target 4)"
    assert wait_for(lambda: _replicas(stack), lambda n: n >= 2, STARTED_S, interval_s=2) == 2

    for _ in range(16):  # ties in flight break at random: both replicas get some (p fail = 2^-15)
        r = httpx.post(stack.url + "/v1/completions", json={"model": stack.model, "prompt": "x", "max_tokens": 4},
                       headers=AUTH, timeout=60)
        assert r.status_code == 200

    def served_by() -> dict[str, float]:  # a replica missing from one scrape (2 s timeout) is asked again
        return {dict(labels)["replica"]: v for (name, labels), v in stack.metrics().items()
                if name == "vllm:request_success_total" and v > 0}

    per_replica = wait_for(served_by, lambda seen: len(seen) >= 2)
    assert len(per_replica) == 2, per_replica
