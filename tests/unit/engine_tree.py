"""A stand-in engine for the process-tree tests: the shape of vLLM's processes, without vLLM.

`python -m tests.unit.engine_tree --keel-parent PID --pids FILE [--plain CHILD ...]` does what
`serving.engine.server` does before vLLM runs (becomes the engine root), then what vLLM does:
spawns an engine core with multiprocessing's spawn (which imports this module, and so
serving.engine.server, in the child first), and the core forks a worker. `--plain` children are
started with subprocess (not armed, as a compiler or helper binary would be): `group` stays in
the engine's process group, `setsid` leaves it, `hidden` leaves it and has no KEEL_ENGINE_TREE in
its environment (what vLLM's setproctitle does to /proc/PID/environ), `stubborn` ignores SIGTERM. Every process
appends "ROLE PID" to FILE once it is set up; then all of them sleep until killed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time

from serving.engine.server import TREE_ENV, become_engine_root

PLAIN_CHILD = """
import os, signal, sys, time
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "a") as f:
    f.write(f"{sys.argv[2]} {os.getpid()}\\n")
time.sleep(600)
"""


def report(pids_file: str, role: str) -> None:
    with open(pids_file, "a") as f:
        f.write(f"{role} {os.getpid()}\n")


def worker(pids_file: str) -> None:
    report(pids_file, "worker")
    time.sleep(600)


def engine_core(pids_file: str) -> None:
    multiprocessing.get_context("fork").Process(target=worker, args=(pids_file,)).start()
    report(pids_file, "core")
    time.sleep(600)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keel-parent", type=int, required=True)
    ap.add_argument("--pids", required=True)
    ap.add_argument("--plain", action="append", default=[], choices=["group", "setsid", "hidden", "stubborn"])
    args = ap.parse_args()
    become_engine_root(args.keel_parent)
    multiprocessing.get_context("spawn").Process(target=engine_core, args=(args.pids,)).start()
    for role in args.plain:
        env = {k: v for k, v in os.environ.items() if role != "hidden" or k != TREE_ENV}
        subprocess.Popen(
            [sys.executable, "-c", PLAIN_CHILD, args.pids, role],
            env=env,
            start_new_session=role in ("setsid", "hidden"),
        )
    report(args.pids, "server")
    time.sleep(600)


if __name__ == "__main__":
    main()
