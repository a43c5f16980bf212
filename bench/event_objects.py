"""The object classes of bench_events.py (bound in durable.bench-events.toml).

``EmittingCounter`` is the library's Counter with ``EMIT_EVENTS`` on (each increment emits
``incremented``);
``PlainCounter`` is the same increment without the emit: the difference between the two is what
an event costs.
"""

from __future__ import annotations

from durable.objects import DurableObject
from durable.objects.patterns import Counter


class EmittingCounter(Counter):
    """Counter.increment: a read, a put and ``ctx.emit("incremented", ...)``."""

    EMIT_EVENTS = True


class PlainCounter(DurableObject):
    async def increment(self, by: int = 1) -> int:
        value = (await self.ctx.storage.get("value") or 0) + by
        await self.ctx.storage.put("value", value)
        return value
