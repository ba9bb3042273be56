"""`keel cost report` on the audit log of the real stack, after requests from the openai client:
the gateway's replica records price the demo replica, the requests' tokens split its cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, local_config, wait_for

pytestmark = pytest.mark.e2e

KEEL = Path(sys.executable).with_name("keel")


def _report(audit_dir: Path) -> dict:
    out = subprocess.run(
        [
            str(KEEL),
            "cost",
            "report",
            str(REPO / "configs" / "local.yaml"),
            "--audit-dir",
            str(audit_dir),
            "--since",
            "20m",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_cost_report_prices_the_replica_and_splits_it_by_the_tenants_tokens(client, stack):
    audit_dir = Path(local_config()["audit"]["dir"]).resolve()  # as `keel serve` resolves it: from here
    before = _report(audit_dir) if list(audit_dir.glob("audit-*.jsonl")) else {"lines": []}
    done = sum(line["requests"] for line in before["lines"] if line["tenant"] == "demo")
    for _ in range(3):
        client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "cost?"}], max_tokens=8)
    report = wait_for(
        lambda: _report(audit_dir),
        lambda r: sum(x["requests"] for x in r["lines"] if x["tenant"] == "demo") >= done + 3,
    )
    demo = [x for x in report["lines"] if x["tenant"] == "demo" and x["model"] == stack.model]
    assert demo and demo[0]["completion_tokens"] >= 24
    assert report["replica_hours"][stack.model] > 0  # the gateway wrote its replica count
    assert report["prices"][stack.model] == {"profile": "cpu-2core", "per_replica_hour": 0.05}
    assert demo[0]["cost"] > 0 and report["currency"] == "USD"
