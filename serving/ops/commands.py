"""The ops commands: `keel <name>` -> the module that adds its parser and runs it.

A new ops command is one line here and one module with `add_parser(sub)` and `run(args) -> int`.
Modules are imported when the parser is built (they must import nothing heavy at module level).
"""

from __future__ import annotations

import importlib

COMMANDS = {
    "slo": "serving.ops.slo_cli",
    "cost": "serving.ops.cost_cli",
    "dashboard": "serving.ops.dashboard_cli",
    "history": "serving.ops.history_cli",
}


def add_parsers(sub) -> None:
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)


def run(args) -> int | None:
    """The command's exit status, or None when `args.cmd` is not an ops command."""
    module = COMMANDS.get(args.cmd)
    if module is None:
        return None
    return importlib.import_module(module).run(args)
