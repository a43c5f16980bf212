"""The output gate: nothing an event says leaves before the writes made before it are durable.

Every write of an object gets the next *write sequence* number. A reply (or WebSocket frames,
or an outgoing call) made when the sequence was ``n`` waits until a flush has committed
everything up to ``n``. If the flush fails, what waited is discarded and gets the error: a
caller never sees a result whose writes were lost (Cloudflare's output gate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..core.errors import ObjectReset
from ..core.tasks import TaskSet

#: sends one event's reply; called with None once its writes are durable, or with the error
ReplySender = Callable[[BaseException | None], Awaitable[None]]


async def _send_failures(replies: list[ReplySender], error: BaseException) -> None:
    for send in replies:
        await send(error)


class OutputGate:
    """One object's write sequence, what is durable of it, and what waits for it."""

    __slots__ = ("write_seq", "durable_seq", "flushing", "failed", "_waiters", "_replies", "_tasks")

    def __init__(self, tasks: TaskSet) -> None:
        self.write_seq = 0
        self.durable_seq = 0
        #: a batch of this object is being committed (the next one waits for it)
        self.flushing = False
        #: the object was reset: nothing waiting here will ever become durable
        self.failed: BaseException | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._replies: list[tuple[int, ReplySender]] = []
        self._tasks = tasks

    def wrote(self) -> None:
        self.write_seq += 1

    def is_durable(self, seq: int) -> bool:
        return self.durable_seq >= seq

    @property
    def has_unflushed(self) -> bool:
        return self.durable_seq < self.write_seq

    async def wait_durable(self, seq: int) -> None:
        if self.durable_seq >= seq:
            return
        if self.failed is not None:
            raise ObjectReset(f"the object was reset before its writes were durable ({self.failed})")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, fut))
        await fut

    def reply_when_durable(self, seq: int, send: ReplySender) -> None:
        """Queue a reply behind the gate: sent (in order) once ``seq`` is durable. Cheaper than a
        task waiting on a future, on the hottest path there is."""
        self._replies.append((seq, send))

    def flushed(self, seq: int) -> list[ReplySender]:
        """A flush committed up to ``seq``: wake waiters, return the replies now free to go."""
        self.flushing = False
        self.durable_seq = max(self.durable_seq, seq)
        durable = self.durable_seq
        if self._waiters:
            still = []
            for s, fut in self._waiters:
                if s <= durable:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((s, fut))
            self._waiters = still
        ready: list[ReplySender] = []
        if self._replies:
            waiting: list[tuple[int, ReplySender]] = []
            for s, send in self._replies:
                if s <= durable:
                    ready.append(send)
                else:
                    waiting.append((s, send))
            self._replies = waiting
        return ready

    def fail(self, error: BaseException) -> None:
        """A flush failed or the object was reset: everything waiting gets the error."""
        self.flushing = False
        if self.failed is None:
            self.failed = error
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(error)
        self._waiters = []
        replies, self._replies = self._replies, []
        if replies:
            self._tasks.spawn(_send_failures([send for _, send in replies], error), "reply-failures")
