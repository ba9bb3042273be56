"""The engine process a replica runs: vLLM's own OpenAI server on the replica's port.

`python -m serving.engine.server --keel-parent PID <vllm serve flags>`. It is vLLM's API server
entry (same code path as bare `vllm serve`, so streaming costs exactly what it costs there),
plus a watchdog: if the replica that started it dies without stopping it, the engine and its
engine-core child go too, so no orphan holds the port, the cores or the GPU.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os.killpg(os.getpgid(0), signal.SIGKILL)  # we lead our own session: take it all down


def main(argv: list[str] | None = None) -> None:
    from serving.priority import run_at_normal_priority

    run_at_normal_priority("the engine")  # before any thread or the engine core starts: they inherit it
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--keel-parent"]:
        parent = int(argv[1])
        argv = argv[2:]
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="keel-parent-watch").start()

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
