"""SLOs end to end: a real Prometheus (Debian's package) scrapes the running stack's metrics
listener every second and evaluates the rules `keel slo rules` makes every second; the official
openai client sends streamed requests and refused ones; the burn-rate recording rules move, a
test SLO with short windows fires its alert, and `keel slo status` prints what Prometheus sees.

The test SLOs reach the running gateways with `keel apply` (live, no restart) and are taken out
again at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from benchmarks.live_changes import keel_apply
from serving.bench.stack import free_port
from serving.cli import main as keel
from serving.ops.slo_config import SloConfig
from serving.ops.slo_rules import dump, prometheus_doc, rules_doc
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")
FAST_ALERT = [{"severity": "page", "long_window": "1m", "short_window": "10s", "factor": 2}]
TEST_SLOS = {
    # Every first token takes longer than 1 ms through gateway and engine: all "slow", 10x burn.
    "e2e-ttft-strict": {
        "kind": "ttft",
        "models": ["demo"],
        "threshold_ms": 1,
        "objective": 0.9,
        "window": "1h",
        "alerts": FAST_ALERT,
    },
    "e2e-ttft-easy": {
        "kind": "ttft",
        "models": ["demo"],
        "threshold_ms": 60_000,
        "objective": 0.9,
        "window": "1h",
        "alerts": FAST_ALERT,
    },
    "e2e-availability": {
        "kind": "availability",
        "models": ["demo"],
        "objective": 0.9,
        "window": "1h",
        "alerts": FAST_ALERT,
    },
}
PROM_SETTLE_S = 90  # scrapes and rule runs every second; 2 shared cores make it slow at times


class Prometheus:
    def __init__(self, tmp: Path, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        slos = {n: SloConfig.model_validate(s) for n, s in TEST_SLOS.items()}
        (tmp / "keel-slo-rules.yaml").write_text(dump(rules_doc(slos)))
        (tmp / "prometheus.yml").write_text(dump(prometheus_doc(target, scrape_interval="1s")))
        check = subprocess.run(
            ["promtool", "check", "config", str(tmp / "prometheus.yml")], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        ready = wait_for(self._ready, bool, timeout_s=60, interval_s=0.5)
        assert ready, f"Prometheus not ready:\n{self.log.read_text()[-3000:]}"

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def values(self, promql: str) -> dict[str, float]:
        """slo label -> value of each series the query returns."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10).json()
        return {s["metric"].get("slo", ""): float(s["value"][1]) for s in r["data"]["result"]}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Traffic:
    """Streamed chat completions, one after another, until stopped (the 10 s window needs them
    all along); every fifth request is refused by the engine (max_tokens too large: 400)."""

    def __init__(self, client: openai.OpenAI):
        self.client = client
        self.sent = self.refused = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self):
        while not self._stop.is_set():
            try:
                if self.sent % 5 == 4:
                    try:
                        self.client.chat.completions.create(
                            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=100_000
                        )
                    except openai.BadRequestError:
                        self.refused += 1
                else:
                    stream = self.client.chat.completions.create(
                        model="demo",
                        messages=[{"role": "user", "content": "Count to five."}],
                        max_tokens=8,
                        stream=True,
                    )
                    for _ in stream:
                        pass
            except Exception as e:  # noqa: BLE001 - kept for the assertion message
                self.errors.append(repr(e))
            self.sent += 1


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: `make prometheus` installs it")
def test_burn_rates_move_and_a_test_alert_fires(stack, client, tmp_path, capsys):
    served = stack.log.parent / "stack.yaml"
    doc = yaml.safe_load(served.read_text())
    with_slos = {**doc, "slos": TEST_SLOS}
    rc, _, out = keel_apply(tmp_path / "with-slos.yaml", with_slos, "--address", stack.ray_address)
    assert rc == 0, out
    prom = Prometheus(tmp_path, stack.metrics_url.removeprefix("http://"))
    try:
        with Traffic(client) as traffic:
            started = time.monotonic()
            strict = wait_for(
                lambda: prom.values('keel:slo_errors:ratio_rate1m{slo=~"e2e-ttft.*"}'),
                lambda v: v.get("e2e-ttft-strict") == 1 and "e2e-ttft-easy" in v,
                timeout_s=PROM_SETTLE_S,
                interval_s=1,
            )
            assert strict.get("e2e-ttft-strict") == 1, (strict, traffic.errors)
            assert strict["e2e-ttft-easy"] == 0  # the same requests, within 60 s: no burn
            moved_s = time.monotonic() - started
            firing = wait_for(
                lambda: prom.values('ALERTS{alertname="KeelSLOBurnRate", alertstate="firing"}'),
                lambda v: "e2e-ttft-strict" in v,
                timeout_s=PROM_SETTLE_S,
                interval_s=1,
            )
            assert set(firing) == {"e2e-ttft-strict"}, firing
            fired_s = time.monotonic() - started
            alert = [
                a
                for a in httpx.get(prom.url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
                if a["labels"]["alertname"] == "KeelSLOBurnRate"
            ]
            # refused requests (400) are the client's: availability burns nothing
            avail = wait_for(
                lambda: prom.values('keel:slo_errors:ratio_rate1m{slo="e2e-availability"}'),
                lambda v: bool(v),
                timeout_s=PROM_SETTLE_S,
                interval_s=1,
            )
            assert avail == {"e2e-availability": 0}
            budget = prom.values("keel:slo_error_budget_remaining:ratio")
            assert budget["e2e-ttft-strict"] < 0 and budget["e2e-ttft-easy"] == 1  # 10x over a 10% budget
        assert traffic.refused > 0 and not traffic.errors, traffic.errors
        capsys.readouterr()
        assert keel(["slo", "status", "--prometheus", prom.url]) == 0
        status = capsys.readouterr().out
        with capsys.disabled():
            print(
                f"\nerror ratio 1m at 1 after {moved_s:.0f} s of traffic, alert firing after {fired_s:.0f} s; "
                f"{traffic.sent} requests ({traffic.refused} refused with 400)"
            )
            print(json.dumps(alert, indent=1))
            print(status)
        assert "e2e-ttft-strict" in status and "page 1m/10s firing" in status
    finally:
        prom.stop()
        rc, _, out = keel_apply(tmp_path / "restored.yaml", doc, "--address", stack.ray_address)
        assert rc == 0, out
