"""The object event currently running, if any, as seen by code that has no reference to it.

A stub call made from inside an object must wait for that object's output gate (no outgoing
call leaves before the writes made before it are durable) and must open its input gate while
it waits for the reply (so calls can interleave, as Cloudflare allows). The client package
finds the running event here without importing the objects package.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol


class OutgoingGuard(Protocol):
    async def before_outgoing(self) -> bool:
        """Wait for the output gate; returns whether the input gate was opened."""

    async def after_outgoing(self, reopened: bool) -> None:
        """Close the input gate again before the caller's code continues."""


current_event: ContextVar[OutgoingGuard | None] = ContextVar("durable_current_event", default=None)
