"""Keep the garbage collector's full passes off the request path.

A gateway process holds a large, permanent heap: imported modules, tokenizers, compiled
regexes, the policy, and in a Ray replica Ray's own objects. CPython's full (generation 2)
collection walks all of it; with the requests' short-lived dicts triggering collections, a full
pass lands in the middle of a request every few seconds and stalls the event loop for tens of
milliseconds (measured: p99 of ~100 ms at 200 req/s with every policy on, from ~50 ms passes).

`gc.freeze()` moves everything alive now into a permanent generation that collections skip;
the young generations still collect the per-request garbage, including cycles.
"""

from __future__ import annotations

import ctypes
import gc


def freeze_long_lived() -> None:
    """Call once start-up (or a policy reload) is done: what exists then lives as long as the
    process, or until the next reload. Unfrozen first, so what a reload dropped (the old policy
    runtime is full of cycles) is collected instead of staying in the permanent generation."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024


def return_large_blocks_to_the_os() -> None:
    """Pin glibc's mmap threshold at 128 KiB, so every large block (a request body, its parsed
    prompt) is its own mapping and goes back to the OS when freed.

    By default glibc raises the threshold to the size of each large block freed, up to 32 MiB:
    after a few 8 MiB bodies, later ones come from the heap, whose freed pages fragment and stay
    in the process. Measured with benchmarks/hostile_load.py (3 connections x 60 pipelined 8 MiB
    bodies): RSS after the attack 110 MiB with the default, 72 MiB pinned (56 MiB at start)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        pass
