"""A registration job runs in a child process at a low CPU priority, dies with the process that
started it (a gateway replica), and then reads as failed from its file on any node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.engine.server import _running
from serving.model_registry.jobs import JOB_NICE, JOBS_DIR, STALE_AFTER_S, RegistrationJobs, RegistrationRequest
from tests.unit.model_registry_fixtures import blocking_model

JOB_WAIT_S = 120

PARENT = """
import sys, time
from pathlib import Path
from serving.model_registry.jobs import RegistrationJobs, RegistrationRequest
jobs = RegistrationJobs(Path(sys.argv[1]))
job = jobs.start(RegistrationRequest(name="m", version="1", path=sys.argv[2]))
print(job["id"], flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_registration_runs_niced_dies_with_its_gateway_process_then_reads_as_failed(
    tmp_path, models_base, demo_weights
):
    path = blocking_model(tmp_path, demo_weights)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(models_base), str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        job_id = parent.stdout.readline().strip()
        jobs = RegistrationJobs(models_base)
        deadline = time.monotonic() + JOB_WAIT_S
        while "pid" not in (jobs.read(job_id) or {}) and time.monotonic() < deadline:
            time.sleep(0.1)  # the child writes its pid once its parent-death signal is armed
        child = jobs.read(job_id)["pid"]
        assert _running(child)
        assert os.getpriority(os.PRIO_PROCESS, child) >= JOB_NICE  # hashing yields to the data path
    finally:
        parent.send_signal(signal.SIGKILL)  # as a replica dies: nothing runs to clean up
        parent.wait()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)
    file = models_base / JOBS_DIR / f"{job_id}.json"
    assert jobs.read(job_id)["status"] == "running"  # nobody was left to write otherwise ...
    old = time.time() - STALE_AFTER_S - 5
    os.utime(file, (old, old))
    job = jobs.read(job_id)  # ... until its heartbeat has been silent too long, read on any node
    assert job["status"] == "failed" and "stopped without a result" in job["error"]


def test_a_job_whose_process_is_killed_reads_as_failed_saying_so(tmp_path, models_base, demo_weights):
    jobs = RegistrationJobs(models_base)
    job = jobs.start(RegistrationRequest(name="m", version="1", path=str(blocking_model(tmp_path, demo_weights))))
    try:
        deadline = time.monotonic() + JOB_WAIT_S
        while "pid" not in jobs.read(job["id"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert jobs.running() == 1
        os.kill(jobs.read(job["id"])["pid"], signal.SIGKILL)  # as the kernel's OOM killer would
        deadline = time.monotonic() + 10
        while jobs.running() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        jobs.stop()
    seen = jobs.read(job["id"])
    assert seen["status"] == "failed" and "killed by SIGKILL (out of memory?)" in seen["error"]
    assert str(models_base / JOBS_DIR / f"{job['id']}.log") in seen["error"]
