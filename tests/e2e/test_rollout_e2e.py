"""`keel rollout` on the real stack, under streaming load: a candidate whose gates hold is
promoted to all traffic; one whose latency gate fails is rolled back, the model untouched.
The candidates are registered versions (`keel models register`) of the demo weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.live_changes import StreamingLoad, base_doc, engine_pids, wait_engines
from serving.config import REPO_ROOT
from serving.policy.identity import key_digest
from tests.e2e.conftest import running_stack

# Each rollout starts an engine beside the one serving under load (3-3.5 min on this 2-core box: the
# replica's three processes each import torch and vLLM while the load holds the cores), and a promotion
# starts one more; the first test also pays for the stack's start. 12.4 min for the promotion test on
# a quiet box, past 15 on a busy CI box: the default 900 s is too close.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

KEEL = Path(sys.executable).with_name("keel")
CANDIDATE = "demo@candidate"


ADMIN_KEY = "sk-keel-e2e-rollout-admin"  # the evaluation gate asks the candidate with it


def keel(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(KEEL), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "KEEL_ADMIN_KEY": ADMIN_KEY},
    )


@pytest.fixture(scope="module")
def rollout_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rollout")
    weights = (REPO_ROOT / ".keel" / "models" / "demo-tiny").resolve()
    models = tmp / "models"
    (models / "demo-tiny").mkdir(parents=True)  # the serving version: a plain manifest
    (models / "demo-tiny" / "manifest.yaml").write_text(yaml.safe_dump({"name": "demo-tiny", "path": str(weights)}))
    for version in ("2", "3"):  # candidates: the same bytes, registered as versions of demo-v
        r = keel(
            "models", "register", "demo-v", "--version", version, "--path", str(weights), "--models-dir", str(models)
        )
        assert r.returncode == 0, r.stdout + r.stderr
    doc = base_doc(0, 0)
    doc["tenants"]["ops"] = {"keys": [{"id": "ops-key", "digest": key_digest(ADMIN_KEY), "role": "admin"}]}
    doc["models_dir"] = str(models)
    doc["rollouts"] = {"state_dir": str(tmp / "rollouts")}
    with running_stack(doc, tmp) as stack:
        yield stack


def rollout(stack, *flags: str) -> tuple[subprocess.CompletedProcess, list[str], str]:
    """`keel rollout start` under load: (its result, failed requests, `keel rollout status`)."""
    config = str(stack.log.parent / "stack.yaml")
    with StreamingLoad(stack.url, "demo", clients=4) as load:
        r = keel("rollout", "start", "demo", "--config", config, "--address", stack.ray_address, *flags)
    status = keel("rollout", "status", "demo", "--config", config, "--address", stack.ray_address)
    return r, load.stats.failed, status.stdout + status.stderr


def eval_file(stack, expect: dict) -> str:
    path = stack.log.parent / f"eval-{len(list(stack.log.parent.glob('eval-*')))}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "cases": [
                    {
                        "name": "answers",
                        "messages": [{"role": "user", "content": "Say something."}],
                        "max_tokens": 8,
                        "params": {"ignore_eos": True},
                        "expect": expect,
                    }
                ]
            }
        )
    )
    return str(path)


def status_until(stack, done, timeout_s: float = 1200) -> str:
    config = str(stack.log.parent / "stack.yaml")
    deadline = time.monotonic() + timeout_s
    while True:
        out = keel("rollout", "status", "demo", "--config", config, "--address", stack.ray_address)
        text = out.stdout + out.stderr
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(2)


def driver_pid(stack) -> int:
    """The process holding the rollout's lock: its driver actor in the stack."""
    return int((stack.log.parent / "rollouts" / "demo.lock").read_text().split()[1])


def test_a_candidate_that_holds_its_gates_is_promoted_by_the_stack_alone(rollout_stack):
    stack = rollout_stack
    config = str(stack.log.parent / "stack.yaml")
    with StreamingLoad(stack.url, "demo", clients=4) as load:
        r = keel(
            "rollout",
            "start",
            "demo",
            "--config",
            config,
            "--address",
            stack.ray_address,
            "--detach",
            "--to",
            "demo-v@2",
            "--steps",
            "50,100",
            "--hold",
            "30s",
            "--gate",
            "min_requests=5",
            "--gate",
            "ttft=100",
            "--gate",
            "tpot=100",
            "--gate",
            "warmup=10s",
            "--eval",
            eval_file(stack, {"regex": r"\S"}),
        )
        assert r.returncode == 0 and "goes on in the stack" in r.stdout, r.stdout + r.stderr
        # The CLI is gone; the driver runs in the stack. Killed in step 1, Ray starts it again and
        # it resumes from the state file.
        status = status_until(stack, lambda t: any(p in t.splitlines()[0] for p in ("step ", "promot", "rolled_back")))
        assert "step 1 of 2" in status.splitlines()[0], status  # a 30 s step: seen while it holds
        first = driver_pid(stack)
        os.kill(first, signal.SIGKILL)
        status = status_until(stack, lambda t: any(p in t.splitlines()[0] for p in ("promoted", "rolled_back")))
    failed = load.stats.failed
    assert "promoted" in status.splitlines()[0], status
    assert driver_pid(stack) != first  # a new driver finished it
    assert status.count(" start ") == 1, status  # resumed, not started over
    assert "evaluated" in status and "1 of 1 cases passed" in status, status  # asked before the first step
    assert failed == [], failed
    # The model now serves the candidate's weights from its own application; the candidate is gone.
    pids = wait_engines(stack.log.parent / "stack.yaml", {"demo": 1})
    assert set(pids) == {"demo"}, pids
    # The stack's config still names the old weights: applying it would undo the promotion.
    plan = keel("apply", "--dry-run", str(stack.log.parent / "stack.yaml"), "--address", stack.ray_address)
    assert "refused without --allow-rollback: models.demo.weights: the stack serves demo-v@2" in plan.stdout, (
        plan.stdout + plan.stderr
    )


def test_a_candidate_that_fails_its_gate_is_rolled_back(rollout_stack):
    stack = rollout_stack
    config = stack.log.parent / "stack.yaml"
    before = engine_pids(config)["demo"]
    # The same weights cannot answer a hundred times faster than themselves: the gate fails.
    r, failed, status = rollout(
        stack,
        "--to",
        "demo-v@3",
        "--steps",
        "50,100",
        "--hold",
        "15s",
        "--gate",
        "min_requests=5",
        "--gate",
        "ttft=0.01",
        "--gate",
        "warmup=5s",
    )
    assert r.returncode != 0, r.stdout + r.stderr
    assert "rolled_back" in status and "TTFT p95: candidate" in status, status  # the gate and its numbers
    assert failed == [], failed  # slower is not failed: only the candidate's users saw the latency
    pids = wait_engines(config, {"demo": 1})
    assert pids.get("demo") == before and CANDIDATE not in pids, pids  # the model untouched


def test_a_candidate_that_fails_its_evaluation_is_rolled_back_before_any_traffic(rollout_stack):
    stack = rollout_stack
    config = stack.log.parent / "stack.yaml"
    before = engine_pids(config)["demo"]
    impossible = eval_file(stack, {"exact": "an answer the demo model never gives"})
    r, failed, status = rollout(stack, "--to", "demo-v@3", "--steps", "50,100", "--hold", "15s", "--eval", impossible)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "rolled_back" in status and "evaluation: 0 of 1 cases passed" in status, status
    assert "answers: expected" in status, status  # the case, and what came back instead
    assert "step " not in status.split("rolled_back", 1)[1], status  # no step was ever taken
    assert failed == [], failed
    pids = wait_engines(config, {"demo": 1})
    assert pids.get("demo") == before and CANDIDATE not in pids, pids


def test_an_admin_registers_weights_over_the_api_of_the_running_stack(rollout_stack):
    """The admin API through Ray: the gateway replica knows the stack's models_dir, runs the job in
    a child process, and `keel rollout` can use what it registered."""
    stack = rollout_stack
    weights = str((REPO_ROOT / ".keel" / "models" / "demo-tiny").resolve())
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    bad = httpx.post(
        f"{stack.url}/v1/admin/models/register",
        headers=admin,
        json={"name": "demo-api", "version": "1", "path": weights + "-missing"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "path", bad.text
    r = httpx.post(
        f"{stack.url}/v1/admin/models/register",
        headers=admin,
        json={"name": "demo-api", "version": "1", "path": weights},
    )
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 300
    while True:
        job = httpx.get(stack.url + r.headers["location"], headers=admin).json()
        if job["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert job["status"] == "succeeded", job
    listed = httpx.get(f"{stack.url}/v1/admin/models", headers=admin).json()["data"]
    assert any(m["name"] == "demo-api" for m in listed), listed
    # On disk where the stack's config says, so the CLI and configs see it.
    shown = keel("models", "show", "demo-api@1", "--models-dir", str(stack.log.parent / "models"))
    assert shown.returncode == 0 and weights in shown.stdout, shown.stdout + shown.stderr
