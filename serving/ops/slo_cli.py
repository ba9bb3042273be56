"""`keel slo` (contract stub: the slo work replaces this module)."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("slo", help="(not built yet)")


def run(args) -> int:
    print("keel slo: not built yet")
    return 1
