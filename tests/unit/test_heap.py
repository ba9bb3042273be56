"""The heap freeze after each policy load must not keep what the next load drops."""

from __future__ import annotations

import gc
import weakref

from serving.gateway.heap import freeze_long_lived


class _Runtime:  # like a PolicyRuntime: its parts point back at it (a cycle)
    def __init__(self):
        self.stages = [self]


def test_a_runtime_dropped_by_the_next_reload_is_freed():
    try:
        old = _Runtime()
        gone = weakref.ref(old)
        freeze_long_lived()  # the load that installed it
        del old  # the next reload replaces it
        freeze_long_lived()
        assert gone() is None
    finally:
        gc.unfreeze()
