"""Counter: an atomic counter with RPC methods and an HTTP ``fetch``.

With ``EMIT_EVENTS = True`` (a subclass: ``class Counter(patterns.Counter): EMIT_EVENTS = True``)
each increment is also an event (``ctx.emit``, README "Events"): ``evt.Counter.<id>.incremented``
with ``{"value": <new value>, "by": <step>}``, committed with the new value, so a consumer sees
every value exactly once, in order. Off by default: a counter is incremented at machine speed,
and an event per increment roughly halves its throughput (a JetStream publish and an outbox row
each, bench/bench_events.py) and fills the events stream whether anyone reads it or not.
"""

from __future__ import annotations

from ...core.http import Request, Response
from ..base import DurableObject


class Counter(DurableObject):
    """RPC: ``increment(by=1)``, ``get()``, ``reset()``. HTTP: ``POST /counter/<name>/increment[?by=N]``
    and ``GET /counter/<name>``, both answering ``{"value": n}``."""

    #: each increment emits ``incremented`` (see the module docstring)
    EMIT_EVENTS = False

    async def increment(self, by: int = 1) -> int:
        if not isinstance(by, int) or isinstance(by, bool):
            raise TypeError(f"increment(by) takes an integer, not {type(by).__name__}")
        value = (await self.ctx.storage.get("value") or 0) + by
        await self.ctx.storage.put("value", value)
        if self.EMIT_EVENTS:
            self.ctx.emit("incremented", {"value": value, "by": by})
        return value

    async def get(self) -> int:
        return int(await self.ctx.storage.get("value") or 0)

    async def reset(self) -> int:
        await self.ctx.storage.delete("value")
        return 0

    async def fetch(self, request: Request) -> Response:
        segments = [s for s in request.path.split("/") if s]
        action = segments[2] if len(segments) > 2 else ""
        if action == "increment" and len(segments) == 3:
            if request.method != "POST":
                return Response.json_response({"error": "use POST to increment"}, 405, {"allow": "POST"})
            raw = request.query_param("by")
            try:
                by = int(raw) if raw is not None else 1
            except ValueError:
                return Response.json_response({"error": f"by must be an integer, got {raw!r}"}, 400)
            return Response.json_response({"value": await self.increment(by)})
        if action == "" and len(segments) == 2:
            if request.method != "GET":
                return Response.json_response({"error": "use GET to read the counter"}, 405, {"allow": "GET"})
            return Response.json_response({"value": await self.get()})
        return Response.json_response({"error": "not found"}, 404)
