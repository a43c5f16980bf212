"""Waiting on a condition instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: How often a condition is checked: short next to every timeout here, long next to a check.
POLL_INTERVAL = 0.05


async def assert_eventually(check: Callable[[], Awaitable[T] | T], timeout: float = 10.0,
                            message: str = "condition", interval: float = POLL_INTERVAL) -> T:
    """Until ``check()`` (a plain or an async function) returns something truthy, which is
    returned; fails the test naming ``message`` and the last value if it has not within
    ``timeout`` seconds. An exception from ``check`` is not swallowed: it fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} did not hold within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)
