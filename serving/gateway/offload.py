"""Work proportional to a prompt, off the event loop: one small pool for the gateway process.

Counting a long prompt's tokens (the tokenizer releases the GIL) and scanning it with the input
guardrails take milliseconds per long prompt; on the event loop that is every other tenant's
stream stalled. Short prompts stay inline: a hand-off to a thread and back costs ~0.06 ms.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

_pool: ThreadPoolExecutor | None = None


async def off_loop(fn, *args):
    """fn(*args) on the gateway's prompt-work threads (made on first use: two, the box's cores)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="keel-prompt-work")
    return await asyncio.get_running_loop().run_in_executor(_pool, fn, *args)
