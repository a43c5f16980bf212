"""Waiting on a condition instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

#: How often a condition is checked: short next to every timeout here, long next to a check.
POLL_INTERVAL = 0.05


async def assert_eventually(check: Callable[[], Any], timeout: float = 10.0,
                            message: str = "condition", interval: float = POLL_INTERVAL) -> Any:
    """Until ``check()`` (a plain or an async function) returns something truthy, which is
    returned; fails the test naming ``message`` and the last value if it has not within
    ``timeout`` seconds. An exception from ``check`` is not swallowed: it fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} did not hold within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


async def assert_stays(check: Callable[[], Any], seconds: float,
                       message: str = "condition", interval: float = 0.1) -> None:
    """``check()`` holds (returns something truthy) each time it is asked for ``seconds``: the
    one place a test sleeps on purpose, to show that something does *not* happen in that time."""
    end = time.monotonic() + seconds
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        assert value, f"{message} stopped holding (got {value!r})"
        if time.monotonic() >= end:
            return
        await asyncio.sleep(interval)
