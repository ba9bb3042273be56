"""The engine's process tree never outlives it: parent-death watches in every process, and a
replica stop that finds and stops whatever the API server left behind. Run against
tests/unit/engine_tree.py (vLLM's process shape without vLLM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from serving.engine.replica import EngineReplica, stop_engine_tree
from serving.engine.server import PARENT_ENV, TREE_ENV

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TREE = "test-engine-tree"  # what EngineReplica puts in its engine's environment
WAIT_S = 30  # a deadline for what should happen at once (2 shared cores), not a timing check


def start_engine(tmp_path: Path, *plain: str, parent: int | None = None) -> tuple[subprocess.Popen, Path]:
    pids = tmp_path / "pids"
    cmd = [
        sys.executable,
        "-m",
        "tests.unit.engine_tree",
        "--keel-parent",
        str(parent or os.getpid()),
        "--pids",
        str(pids),
    ]
    for role in plain:
        cmd += ["--plain", role]
    return subprocess.Popen(cmd, cwd=REPO, env={**ENV, TREE_ENV: TREE}, start_new_session=True), pids


def wait_for_roles(pids: Path, count: int) -> dict[str, psutil.Process]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        lines = pids.read_text().splitlines() if pids.exists() else []
        if len(lines) == count:
            return {role: psutil.Process(int(pid)) for role, pid in (line.split() for line in lines)}
        time.sleep(0.05)
    pytest.fail(f"the stand-in engine did not start its {count} processes: {lines}")


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(procs, wait_s: float = WAIT_S) -> list[str]:
    """Names of the processes still running after waiting up to wait_s for them to go."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [role for role, p in procs.items() if running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.fixture
def cleanup():
    started: list[psutil.Process] = []
    yield started.extend
    for p in started:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_engine_core_and_its_worker_die_when_the_api_server_is_killed(tmp_path, cleanup):
    server, pids = start_engine(tmp_path)
    procs = wait_for_roles(pids, 3)
    cleanup(procs.values())
    assert procs["core"].ppid() == server.pid and procs["worker"].ppid() == procs["core"].pid

    server.kill()  # SIGKILL: nothing in the API server runs, as after an OOM kill
    server.wait()
    assert survivors(procs) == []


def test_a_worker_dies_with_the_engine_core(tmp_path, cleanup):
    server, pids = start_engine(tmp_path)
    procs = wait_for_roles(pids, 3)
    cleanup(procs.values())
    procs["core"].kill()
    assert survivors({"worker": procs["worker"]}) == []
    assert running(procs["server"])
    server.kill()
    server.wait()


def test_the_whole_engine_dies_with_the_replica(tmp_path, cleanup):
    # A stand-in replica: starts the engine as EngineReplica does, then waits on it.
    replica = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys; subprocess.Popen([sys.executable, "
            "'-m', 'tests.unit.engine_tree', '--keel-parent', str(os.getpid()), '--pids', sys.argv[1]], "
            "start_new_session=True).wait()",
            str(tmp_path / "pids"),
        ],
        cwd=REPO,
        env=ENV,
    )
    procs = wait_for_roles(tmp_path / "pids", 3)
    cleanup(procs.values())
    assert procs["server"].ppid() == replica.pid

    replica.kill()
    replica.wait()
    assert survivors(procs) == []


def _import_engine_module_as_a_child_of(parent: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import serving.engine.server; print('running')"],
        cwd=REPO,
        env={**ENV, PARENT_ENV: str(parent)},
        capture_output=True,
        text=True,
    )


def test_a_child_whose_parent_died_before_it_armed_its_watch_exits():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = _import_engine_module_as_a_child_of(gone.pid)
    assert orphan.returncode == -signal.SIGKILL and "running" not in orphan.stdout
    child = _import_engine_module_as_a_child_of(os.getpid())
    assert child.returncode == 0 and child.stdout.strip() == "running"


def test_every_engine_process_carries_the_tree_id(tmp_path, cleanup):
    server, pids = start_engine(tmp_path, "setsid")
    procs = wait_for_roles(pids, 4)
    cleanup(procs.values())
    assert {role: p.environ().get(TREE_ENV) for role, p in procs.items()} == dict.fromkeys(procs, TREE)
    server.kill()
    server.wait()


def test_stopping_the_replica_stops_what_the_dead_api_server_left_behind(tmp_path, cleanup):
    server, pids = start_engine(tmp_path, "group", "setsid", "hidden")
    procs = wait_for_roles(pids, 6)
    cleanup(procs.values())
    assert {os.getpgid(procs[r].pid) for r in ("setsid", "hidden")}.isdisjoint({server.pid})  # left the group
    replica = EngineReplica.__new__(EngineReplica)  # what _stop_engine needs: the engine it started
    replica.proc, replica.engine_tree, replica.engine_seen = server, TREE, set()
    replica._note_engine_processes()  # a heartbeat while the engine runs

    server.kill()
    server.wait()  # the replica's health check has reaped it: its pid no longer leads to the rest
    assert survivors({r: procs[r] for r in ("core", "worker")}) == []
    left = {r: procs[r] for r in ("group", "setsid", "hidden")}
    assert survivors(left, wait_s=0.5) == ["group", "setsid", "hidden"]  # unwatched, as a helper binary is

    replica._stop_engine()
    assert survivors(left, wait_s=0) == []


def test_stop_sends_sigterm_first_then_sigkill_after_the_grace(tmp_path, cleanup):
    server, pids = start_engine(tmp_path, "stubborn")
    procs = wait_for_roles(pids, 4)
    cleanup(procs.values())

    assert stop_engine_tree(server, TREE, grace_s=0.5, kill_wait_s=WAIT_S) == []
    assert server.returncode == -signal.SIGTERM  # the API server got the chance to shut down cleanly
    assert survivors(procs, wait_s=0) == []  # the stubborn child ignored SIGTERM: SIGKILL took it
