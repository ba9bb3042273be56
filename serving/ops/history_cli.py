"""`keel history` (contract stub: the history work replaces this module)."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("history", help="(not built yet)")


def run(args) -> int:
    print("keel history: not built yet")
    return 1
