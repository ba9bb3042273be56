"""Starts the real stack (keel serve: Ray Serve + vLLM on the demo model) once per session.

What the stack records after it has answered (a counter, an audit line) is read by polling
until it shows, up to a deadline: a client can read its answer before the gateway has counted
it. The deadlines are generous (2 shared cores) and are never the thing a test checks.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from serving.bench.stack import free_port
from serving.policy.identity import DEMO_KEY  # the demo tenant's key in configs/local.yaml

REPO = Path(__file__).resolve().parents[2]
AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
STARTUP_TIMEOUT_S = 900
SETTLE_S = 30  # how long a test waits for a counter or a record to show what already happened


def wait_for(read, done, timeout_s: float = SETTLE_S, interval_s: float = 0.1):
    """read() until done(value) or the deadline; the last value, for the caller to assert on."""
    deadline = time.monotonic() + timeout_s
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(interval_s)
    return value


class Stack:
    def __init__(self, url: str, model: str, log: Path, metrics_url: str):
        self.url = url
        self.model = model
        self.log = log
        self.metrics_url = metrics_url  # the metrics listener: /metrics without a key

    @property
    def ray_address(self) -> str:
        """This stack's Ray cluster, from its ready message: `keel apply --address` needs it,
        since the e2e tests run several stacks at once and `auto` finds only one of them."""
        found = re.search(r"keel apply --address (\S+) CONFIG", self.log.read_text(errors="replace"))
        assert found, f"no Ray address in {self.log}"
        return found.group(1)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        text = httpx.get(self.metrics_url + "/metrics", timeout=10).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def metric_sum(self, name: str, **labels) -> float:
        want = set(labels.items())
        if name.startswith("vllm:"):
            # The gateway leaves out an engine that did not answer its scrape in 2 s: an engine
            # metric missing from a scrape is asked for again, never read as 0.
            metrics = wait_for(self.metrics, lambda m: any(n == name for n, _ in m), interval_s=0.5)
            assert any(n == name for n, _ in metrics), f"no {name} from the engines in {SETTLE_S}s"
        else:
            metrics = self.metrics()
        return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)

    def metric_reaches(self, name: str, at_least: float, **labels) -> float:
        """metric_sum once it is at least `at_least` (or at the deadline): the gateway counts a
        request after its last byte went out, so the client may look first."""
        return wait_for(lambda: self.metric_sum(name, **labels), lambda v: v >= at_least)

    def engine_servers(self) -> list[psutil.Process]:
        """The API server of each engine this stack runs: descendants of its `keel serve`."""
        config = str(self.log.parent / "stack.yaml")
        keel = [p for p in psutil.process_iter(["cmdline"]) if config in (p.info["cmdline"] or [])]
        assert len(keel) == 1, f"expected one `keel serve {config}` process, found {keel}"
        servers = []
        for p in keel[0].children(recursive=True):
            try:
                if "serving.engine.server" in p.cmdline():
                    servers.append(p)
            except psutil.Error:  # gone since the listing
                continue
        return servers


def local_config() -> dict:
    return yaml.safe_load((REPO / "configs" / "local.yaml").read_text())


@contextlib.contextmanager
def running_stack(cfg: dict, tmp: Path):
    """`keel serve` on cfg (ports replaced by free ones) until ready; Ctrl-C on exit."""
    port = free_port()
    cfg["server"]["port"] = port
    cfg["server"]["metrics_port"] = metrics_port = free_port()
    cfg_path = tmp / "stack.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = tmp / "keel-serve.log"
    keel = Path(sys.executable).with_name("keel")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(keel), "serve", str(cfg_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "Keel is ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                pytest.fail(f"keel serve exited with {proc.returncode}:\n{log.read_text(errors='replace')[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"keel serve not ready in {STARTUP_TIMEOUT_S}s:\n{log.read_text(errors='replace')[-5000:]}")
            time.sleep(1)
        yield Stack(url, next(iter(cfg["models"])), log, f"http://127.0.0.1:{metrics_port}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does: Serve and Ray shut down
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def pytest_configure(config):
    config.addinivalue_line("markers", "disruptive: breaks the shared stack on purpose; runs after the other tests")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)  # stable: order kept


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    with running_stack(local_config(), tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=60)
