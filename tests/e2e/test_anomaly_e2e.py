"""Anomaly detection on the real stack (Ray Serve + vLLM, the demo model), driven by the official
openai client: steady traffic, then a burst; the burst is an anomaly on the admin API, in the
metrics and in the audit log, and a `keel apply` keeps the detector's state."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from serving.policy.identity import key_digest
from tests.e2e.conftest import DEMO_KEY, local_config, running_stack, wait_for

pytestmark = pytest.mark.e2e

ADMIN_KEY = "sk-keel-e2e-anomaly-admin"
KEEL = Path(sys.executable).with_name("keel")
BUCKET_S = 10  # the least bucket_s allows: the test waits ~9 buckets
DETECT = {"bucket_s": BUCKET_S, "warmup_buckets": 5, "consecutive": 1, "season_slots": 0}
BURST = 25


def anomaly_config(tmp: Path, **over) -> dict:
    cfg = local_config()
    cfg["tenants"]["ops"] = {"keys": [{"id": "admin-1", "digest": key_digest(ADMIN_KEY), "role": "admin"}]}
    cfg["anomalies"] = {**DETECT, **over}
    cfg["audit"] = {"dir": str(tmp / "audit")}
    return cfg


@pytest.fixture(scope="module")
def astack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("anomalies")
    cfg = anomaly_config(tmp)
    with running_stack(cfg, tmp) as s:
        s.cfg, s.tmp = cfg, tmp
        yield s


def next_bucket(offset_s: float = 1.0) -> None:
    """Sleep until offset_s into the next bucket (buckets are aligned to the wall clock)."""
    now = time.time()
    time.sleep((now // BUCKET_S + 1) * BUCKET_S + offset_s - now)


def anomalies(stack) -> dict:
    r = httpx.get(stack.url + "/v1/admin/anomalies", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def requests_anomaly(body: dict) -> list[dict]:
    return [
        a
        for a in body["active"] + body["recent"]
        if (a["tenant"], a["model"], a["signal"]) == ("demo", "demo", "requests")
    ]


def test_a_burst_is_an_anomaly_on_the_admin_api_metrics_and_audit_and_survives_keel_apply(astack):
    client = openai.OpenAI(base_url=astack.url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=60)

    def ask(_=None):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    for _ in range(DETECT["warmup_buckets"] + 2):  # one request a bucket: the normal
        next_bucket()
        ask()
    assert anomalies(astack)["active"] == []
    next_bucket(0.5)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, range(BURST)))
    found = wait_for(lambda: requests_anomaly(anomalies(astack)), bool, timeout_s=3 * BUCKET_S)
    assert len(found) == 1, anomalies(astack)
    a = found[0]
    assert a["direction"] == "up" and a["value"] >= BURST - 2 and a["expected"] < 3

    assert astack.metric_sum("keel_anomalies_total", tenant="demo", model="demo", signal="requests") == 1
    records = wait_for(lambda: _anomaly_records(astack.tmp / "audit"), bool)
    assert ("start", a["id"]) in [(r["phase"], r["id"]) for r in records]

    before = anomalies(astack)
    address = re.search(r"keel apply --address (\S+)", astack.log.read_text()).group(1)
    cfg = anomaly_config(astack.tmp, threshold=7.0)
    cfg["server"] = astack.cfg["server"]
    path = astack.tmp / "applied.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [str(KEEL), "apply", "--address", address, str(path)], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout + out.stderr
    after = anomalies(astack)
    assert [x["id"] for x in requests_anomaly(after)] == [a["id"]]  # the same detector, not a new one
    assert after["ticks"] >= before["ticks"] and after["series"] >= 1


def _anomaly_records(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        for line in path.read_bytes().split(b"\n"):
            try:
                rec = json.loads(line) if line.strip() else None
            except ValueError:  # a batch half appended
                continue
            if rec and rec.get("event") == "anomaly":
                out.append(rec)
    return out
