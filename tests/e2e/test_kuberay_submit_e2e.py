"""The RayService's path into a cluster, on a real Ray head: KubeRay submits `serveConfigV2` to
the head's dashboard (`PUT /api/serve/applications/`, the YAML as JSON; ray-operator
dashboard_httpclient.go UpdateDeployments) and probes the gateway's `/-/healthz`. No `keel serve`
runs: the rendered config alone must bring the stack up, and a re-rendered config must change it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml

from serving.bench.stack import free_port
from serving.policy.identity import DEMO_KEY, generate_key, key_digest
from tests.e2e.conftest import REPO, local_config, wait_for

pytestmark = pytest.mark.e2e

UP_S = 600  # inside pytest's 900 s per test, so a stack that never comes up says why

KEEL = Path(sys.executable).with_name("keel")
RAY = Path(sys.executable).with_name("ray")


def rendered(cfg: dict, tmp: Path) -> dict:
    """`keel kuberay serve-config` of cfg, as KubeRay sends it (YAML parsed, sent as JSON)."""
    path = tmp / "keel.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [str(KEEL), "kuberay", "serve-config", str(path)], capture_output=True, text=True, check=True, timeout=300
    )
    return yaml.safe_load(out.stdout)


def port_outside_worker_range() -> int:
    while (port := free_port()) in range(10002, 20000):
        pass
    return port


@contextlib.contextmanager
def ray_head(resources: dict):
    """`ray start --head --block` with a dashboard, as a KubeRay head runs it; stopped by its pid."""
    temp = Path(tempfile.mkdtemp(prefix="keel-kr-", dir="/tmp"))  # short: Ray's socket paths
    dash = port_outside_worker_range()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
    }
    # Other clusters run on this machine (the e2e stacks): every port of this one is its own,
    # outside the range Ray keeps for its workers (10002-19999), which it checks them against.
    ports = [
        f"--{name}={port_outside_worker_range()}"
        for name in (
            "port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        )
    ]
    log_path = temp / "head.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                "--block",
                *ports,
                "--num-cpus=4",
                "--resources",
                json.dumps(resources),
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--temp-dir={temp}",
                "--disable-usage-stats",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{dash}", log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def serve_status(dashboard: str) -> dict:
    """Each application's status and message, as the dashboard reports them."""
    r = get(dashboard + "/api/serve/applications/")
    if r is None or not r.is_success:
        return {}
    return {
        name: {
            "status": app.get("status"),
            "message": app.get("message"),
            "deployments": {d: (v.get("status"), v.get("message")) for d, v in app.get("deployments", {}).items()},
        }
        for name, app in r.json().get("applications", {}).items()
    }


def why_not_up(dashboard: str, head_log: Path) -> str:
    """What a failed start leaves to read: the applications' status, the head's and Serve's logs."""
    logs = head_log.parent / "session_latest" / "logs"
    tails = [
        f"{p.name}:\n{p.read_text(errors='replace')[-2500:]}"
        for p in sorted((logs / "serve").glob("*.log"), key=lambda p: p.stat().st_mtime)[-4:]
    ]
    return "\n\n".join(
        [
            f"applications: {json.dumps(serve_status(dashboard), indent=1)}",
            f"head log:\n{head_log.read_text(errors='replace')[-2500:]}",
            *tails,
        ]
    )


def test_a_rendered_serve_config_submitted_as_kuberay_does_serves_and_a_changed_one_applies(tmp_path):
    cfg = local_config()
    port = port_outside_worker_range()
    cfg["server"] = {"host": "127.0.0.1", "port": port, "gateway_resources": {"keel-gateway": 1}}
    cfg.pop("ray", None)
    # The session's shared stack may be up beside this cluster: vLLM's auto binding would pin
    # both engines to core 0 (README, "Several engines on one node").
    cfg["models"]["demo"]["env"]["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    cfg["audit"] = {"dir": str(tmp_path / "audit")}
    gateway = f"http://127.0.0.1:{port}"
    with ray_head({"keel-gateway": 1}) as (dashboard, head_log):
        up = wait_for(
            lambda: get(dashboard + "/api/serve/applications/"),
            lambda r: r is not None and r.is_success,
            timeout_s=180,
            interval_s=1,
        )
        assert up is not None and up.is_success, f"no dashboard:\n{head_log.read_text(errors='replace')[-3000:]}"
        assert httpx.put(dashboard + "/api/serve/applications/", json=rendered(cfg, tmp_path), timeout=60).is_success

        def healthy_or_failed():
            health = get(gateway + "/-/healthz")
            if health is not None and health.status_code == 200:
                return health
            return "failed" if "DEPLOY_FAILED" in str(serve_status(dashboard)) else None

        health = wait_for(healthy_or_failed, lambda r: r is not None, timeout_s=UP_S, interval_s=2)
        assert isinstance(health, httpx.Response), why_not_up(dashboard, head_log)
        assert health.status_code == 200 and "success" in health.text  # KubeRay's grep
        assert get(gateway + "/-/routes").json() == {"/": "keel"}

        def chat(key: str) -> httpx.Response:
            body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            return httpx.post(
                gateway + "/v1/chat/completions", json=body, timeout=120, headers={"authorization": f"Bearer {key}"}
            )

        assert chat(DEMO_KEY).status_code == 200
        new_key = generate_key()
        assert chat(new_key).status_code == 401

        def gateway_pids() -> list[int]:
            apps = httpx.get(dashboard + "/api/serve/applications/", timeout=10).json()["applications"]
            return [r["pid"] for r in apps["keel"]["deployments"]["gateway"]["replicas"]]

        before = gateway_pids()
        # A policy edit, re-rendered and resubmitted as `kubectl apply` makes KubeRay do.
        cfg["tenants"]["demo"]["keys"].append({"id": "second", "digest": key_digest(new_key)})
        assert httpx.put(dashboard + "/api/serve/applications/", json=rendered(cfg, tmp_path), timeout=60).is_success
        answered = wait_for(lambda: chat(new_key), lambda r: r.status_code == 200, timeout_s=120, interval_s=1)
        assert answered.status_code == 200
        assert gateway_pids() == before  # a reconfigure, not a restart
