"""Taking a :class:`durable.objects.patterns.Lock` from any process, waiting fairly.

The Lock object never blocks an event while someone waits (events of an object run one at a
time): a waiter joins its queue and polls. ``acquire_lock`` does the polling at the interval the
lock suggests until the lock is granted or the timeout passes.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def acquire_lock(lock: Any, owner: str, ttl_ms: int, timeout: float = 0.0) -> dict[str, Any] | None:
    """Take the lock behind the stub ``lock`` for ``owner``: its grant (``token``, ``expires_ms``),
    or None if it was not granted within ``timeout`` seconds. Waiters are served in the order
    they first asked."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    wait_ms = int(timeout * 1000)
    while True:
        result: dict[str, Any] = await lock.acquire(owner, ttl_ms, wait_ms)
        if result["acquired"]:
            return result
        left = deadline - loop.time()
        if left <= 0:
            return None
        await asyncio.sleep(min(result.get("retry_after_ms", 200) / 1000, left))
