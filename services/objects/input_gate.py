"""The input gate: one event of an object runs at a time, and storage awaits keep it closed.

An event holds the object's *turn* from start to end; awaiting the object's own storage does
not give it up, so no other event starts meanwhile and a read-modify-write is atomic. A call to
another object opens the gate for its duration (events may interleave there, as Cloudflare
allows), unless the caller is inside ``block_concurrency_while`` or a transaction, which
*block* the gate: it then stays closed across the call too.
"""

from __future__ import annotations

import asyncio


class InputGate:
    """The turn of one object, and how many blocking sections hold it shut."""

    __slots__ = ("_turn", "blocking")

    def __init__(self) -> None:
        self._turn = asyncio.Lock()
        #: block_concurrency_while / transactions in progress: outgoing calls keep the gate shut
        self.blocking = 0

    async def __aenter__(self) -> None:
        await self._turn.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._turn.release()

    @property
    def held(self) -> bool:
        """An event holds the turn."""
        return self._turn.locked()

    def block(self) -> None:
        self.blocking += 1

    def unblock(self) -> None:
        self.blocking -= 1

    def open_for_call(self, event_task: asyncio.Task[object] | None) -> bool:
        """Before an outgoing call of the event running in ``event_task``: let other events in,
        unless a blocking section is active (or the call comes from another task, which does
        not hold the turn). Returns whether the gate was opened."""
        reopen = self.blocking == 0 and asyncio.current_task() is event_task and self._turn.locked()
        if reopen:
            self._turn.release()
        return reopen

    async def close_after_call(self) -> None:
        """Take the turn back even if cancelled meanwhile: the event must hold it when it ends
        (asyncio locks have no owner, so releasing one we do not hold would free another event)."""
        acquiring = asyncio.ensure_future(self._turn.acquire())
        cancelled = False
        while not acquiring.done():
            try:
                await asyncio.shield(acquiring)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
