"""Every dashboard query against a real Prometheus scraping the real stack.

Prometheus is Debian's `prometheus` package; it scrapes the gateway's metrics listener every
second and evaluates the SLO rules of configs/local.yaml (deploy/prometheus/) every second.
After a few requests, every panel's PromQL must evaluate without error, and the panels the
traffic feeds (requests, latencies, tokens, guardrails, engines, replicas, SLOs, cost) must
show series.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serving.bench.stack import free_port
from serving.config import load_config
from serving.ops.dashboard import all_panels, build_dashboard, expand
from serving.ops.slo_rules import dump, prometheus_doc
from tests.e2e.conftest import REPO, wait_for

pytestmark = pytest.mark.e2e
# With a 1 s scrape, 30 s windows hold enough samples for rate(); the range is the test's span.
VALUES = {"__rate_interval": "30s", "__range": "5m", "__range_s": "300", "__interval": "1s"}
# Panels the requests below must fill (quota, shadow, anomaly and alert panels need such events).
FED = [
    "Requests per second",
    "Responses by status",
    "Error ratio (5xx)",
    "Time to first token",
    "Time per output token",
    "End-to-end latency",
    "In flight and held",
    "Tokens per second by tenant",
    "Running requests per replica",
    "Waiting requests per replica",
    "KV cache usage per replica",
    "Tokens per second per replica",
    "Replicas ready",
    "Guardrail actions by guardrail",
    "Guardrail actions by tenant",
    "Traffic share by variant",
    "Tokens by variant",
    "Engine TTFT p95 by variant",
    "Error budget left",
    "SLO error ratio by window",
    "Burn rate",
    "Cost per hour by model (USD)",
    "Cost per hour by tenant (USD)",
    "Cost over the time range (USD)",
]


@contextlib.contextmanager
def prometheus(scrape_url: str, tmp: Path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: `make setup` installs Debian's prometheus package"
    port = free_port()
    rules = REPO / "deploy" / "prometheus" / "keel-slo-rules.yaml"  # `keel slo rules configs/local.yaml`
    doc = prometheus_doc(scrape_url.removeprefix("http://"), scrape_interval="1s", rules=str(rules))
    (tmp / "prometheus.yml").write_text(dump(doc))
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed after Prometheus stops
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_for(lambda: _ok(url + "/-/ready"), bool, timeout_s=60, interval_s=0.5)
        assert ready, (tmp / "prometheus.log").read_text()[-3000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _query(url: str, expr: str) -> dict:
    return httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=30).json()


def test_every_panel_query_runs_on_a_real_prometheus_and_traffic_fills_the_panels(stack, client, tmp_path):
    dash = build_dashboard(load_config(REPO / "configs" / "local.yaml", check_engine_args=False))
    queries = [(p.title, expand(t.expr, VALUES)) for p in all_panels(dash) for t in getattr(p, "targets", None) or []]
    with prometheus(stack.metrics_url, tmp_path) as prom:
        up = wait_for(lambda: _query(prom, "up")["data"]["result"], lambda r: r and r[0]["value"][1] == "1")
        assert up and up[0]["value"][1] == "1", "Prometheus does not scrape the gateway"
        for i in range(8):
            card = " My card is 4111 1111 1111 1111." if i == 2 else ""  # the input guardrail redacts it
            messages = [{"role": "user", "content": f"Count to {i + 3}.{card}"}]
            if i % 2:
                for _ in client.chat.completions.create(
                    model=stack.model, messages=messages, max_tokens=8, stream=True
                ):
                    pass
            else:
                client.chat.completions.create(model=stack.model, messages=messages, max_tokens=8)
            time.sleep(1)
        time.sleep(5)  # a few scrapes after the last answer: rate() needs two samples per series

        started = time.perf_counter()
        answers = {(title, q): _query(prom, q) for title, q in queries}
        elapsed = time.perf_counter() - started
        failed = {k: a.get("error") for k, a in answers.items() if a.get("status") != "success"}
        assert not failed, failed
        empty = [t for t in FED if not any(a["data"]["result"] for (title, _), a in answers.items() if title == t)]
        assert not empty, f"no series in {empty}"
        print(f"{len(queries)} dashboard queries evaluated in {elapsed * 1000:.0f} ms")
        for (title, _), a in answers.items():
            if title in ("Requests per second", "Cost per hour by model (USD)", "Cost per hour by tenant (USD)"):
                print(title, [(r["metric"], r["value"][1]) for r in a["data"]["result"]])
