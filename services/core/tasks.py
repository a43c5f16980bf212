"""A set of background tasks that stay referenced until they finish.

asyncio keeps only a weak reference to a task: one nobody holds can be garbage-collected
mid-flight. Every component that starts work in the background keeps it here, and waits for
or cancels it when it stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any


class TaskSet:
    """Tasks started by one component; each leaves the set when it finishes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def join(self) -> None:
        """Wait until the set is empty, including tasks spawned meanwhile; their errors are theirs."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the tasks running now; whether all finished."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
        return not pending

    async def cancel(self) -> None:
        """Cancel what is still running and wait for it to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self, grace: float) -> None:
        """Give the tasks ``grace`` seconds, then cancel the rest."""
        await self.wait(grace)
        await self.cancel()
