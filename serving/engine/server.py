"""The engine process a replica runs: vLLM's own OpenAI server on the replica's port.

`python -m serving.engine.server --keel-parent PID <vllm serve flags>`. It is vLLM's API server
entry (same code path as bare `vllm serve`, so streaming costs exactly what it costs there),
plus a parent-death watch in every process of the engine, so no orphan holds the port, the
cores or the GPU:

- the API server dies with the replica (PID) that started it;
- every process the engine starts dies with its own parent: vLLM spawns its engine core (and
  workers) with multiprocessing's spawn, which imports this module first in the child (as
  `__mp_main__`), and that import arms the watch; forked children arm it in an at-fork hook.

The watch is Linux's PR_SET_PDEATHSIG (SIGKILL: the kernel delivers it, so a hung or
SIGKILLed parent cannot leave its children behind); elsewhere a thread polls the parent.
The replica also puts `KEEL_ENGINE_TREE` in the engine's environment; every process of the
engine inherits it, which is how the replica finds the ones that left the process group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

TREE_ENV = "KEEL_ENGINE_TREE"  # set by the replica: the same value in every process of one engine
PARENT_ENV = "KEEL_ENGINE_PARENT"  # the pid each engine process expects as its parent
_PR_SET_PDEATHSIG = 1

_armed_in: int | None = None  # the pid that armed its watch (a forked child inherits the value)
# Looked up at import, so a forked child (armed in an at-fork hook) needs no dlopen.
_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def die_with_parent(expected_parent: int) -> None:
    """Be killed when the parent dies; die now if it already has. Children inherit the watch."""
    global _armed_in
    if _armed_in == os.getpid():
        return
    _armed_in = os.getpid()
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_poll_parent, args=(os.getppid(),), daemon=True, name="keel-parent-watch").start()
    # The signal only comes for a death after the prctl: one before it shows as a new parent.
    if os.getppid() != expected_parent and not _running(expected_parent):
        os.kill(os.getpid(), signal.SIGKILL)
    os.environ[PARENT_ENV] = str(os.getpid())  # what our own children check


def become_engine_root(replica_pid: int) -> None:
    """The API server: die with the replica, and have every process started from here watched."""
    die_with_parent(replica_pid)
    os.register_at_fork(after_in_child=_arm_inherited_watch)


def _arm_inherited_watch() -> None:
    die_with_parent(int(os.environ[PARENT_ENV]))


def _set_parent_death_signal(sig: int) -> bool:
    return _prctl is not None and _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _poll_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _running(pid: int) -> bool:
    """True if pid is a live process (a zombie has exited: its children were already reparented)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:  # gone since, or no /proc (not Linux)
        return os.path.exists(f"/proc/{pid}") or not os.path.isdir("/proc")


# A process the engine spawned (engine core, workers) imports this module before anything else
# runs in it; the API server itself runs it as __main__ and arms in main().
if __name__ != "__main__" and PARENT_ENV in os.environ:
    _arm_inherited_watch()
    os.register_at_fork(after_in_child=_arm_inherited_watch)


def main(argv: list[str] | None = None) -> None:
    from serving.priority import run_at_normal_priority

    run_at_normal_priority("the engine")  # before any thread or the engine core starts: they inherit it
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--keel-parent"]:
        become_engine_root(int(argv[1]))
        argv = argv[2:]

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="keel-engine"))
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


if __name__ == "__main__":
    main()
