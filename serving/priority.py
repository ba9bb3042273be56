"""Scheduling priority for the data path.

Ray starts its worker processes at nice 15 (the raylet's `worker_niceness`) so its control
plane stays responsive. The engine and the gateway's relay thread are the data path, not
background work: at nice 15 they lose the CPU to anything else on the node (a load generator,
a sidecar), which on our 2-core machines cost 15-25% of throughput. They reset themselves to
nice 0; Ray's own processes stay at 15.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("keel")


def run_at_normal_priority(what: str) -> bool:
    """Set the calling thread (and what it starts later) to nice 0. False if not permitted."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)  # Linux: applies to the calling thread
        return True
    except PermissionError:
        log.warning(
            "%s runs at nice %d (no CAP_SYS_NICE to reset it); start Ray with "
            "RAY_worker_niceness=0 to keep Ray from deprioritizing the data path",
            what,
            os.getpriority(os.PRIO_PROCESS, 0),
        )
        return False
