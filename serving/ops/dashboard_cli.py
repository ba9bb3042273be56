"""`keel dashboard` (contract stub: the dashboard work replaces this module)."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("dashboard", help="(not built yet)")


def run(args) -> int:
    print("keel dashboard: not built yet")
    return 1
