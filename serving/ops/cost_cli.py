"""`keel cost` (contract stub: the cost work replaces this module)."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("cost", help="(not built yet)")


def run(args) -> int:
    print("keel cost: not built yet")
    return 1
