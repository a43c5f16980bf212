"""Session: data with a time to live, renewed on use, expired by the object's alarm."""

from __future__ import annotations

import time
from typing import Any

from ...core.http import Request, Response
from ..base import AlarmInfo, DurableObject

#: the longest time to live a session may ask for (30 days)
MAX_TTL_S = 30 * 24 * 3600


def _now_ms() -> int:
    return int(time.time() * 1000)


class Session(DurableObject):
    """RPC: ``start(data, ttl_s)``, ``get()`` (renews), ``update(data)``, ``end()``. HTTP on
    ``/session/<id>``: ``PUT`` a JSON object (``?ttl=<seconds>``), ``GET`` it, ``DELETE`` it.

    Each use pushes the expiry forward by writing ``expires_ms``; the alarm is not moved on every
    use (that would be a second write and a schedule per read): when it fires early it re-arms
    itself for the current expiry, and when it fires after the expiry it deletes everything.
    """

    DEFAULT_TTL_S = 30 * 60

    async def start(self, data: dict[str, Any], ttl_s: float | None = None) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise TypeError(f"session data must be a dict, not {type(data).__name__}")
        ttl = self.DEFAULT_TTL_S if ttl_s is None else ttl_s
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TTL_S:
            raise ValueError(f"ttl_s must be a number of seconds in (0, {MAX_TTL_S}], got {ttl_s!r}")
        ttl_ms = int(ttl * 1000)
        expires = _now_ms() + ttl_ms
        await self.ctx.storage.put({"data": data, "ttl_ms": ttl_ms, "expires_ms": expires})
        await self.ctx.storage.set_alarm(expires)
        return {"data": data, "expires_ms": expires}

    async def get(self) -> dict[str, Any] | None:
        """The session's data and expiry, renewed; None once it expired (or never started)."""
        state = await self.ctx.storage.get(["data", "ttl_ms", "expires_ms"])
        if "data" not in state or state["expires_ms"] <= _now_ms():
            return None  # expired: the alarm deletes it (if it has not yet)
        expires = _now_ms() + state["ttl_ms"]
        await self.ctx.storage.put("expires_ms", expires)
        return {"data": state["data"], "expires_ms": expires}

    async def update(self, data: dict[str, Any]) -> dict[str, Any] | None:
        if not isinstance(data, dict):
            raise TypeError(f"session data must be a dict, not {type(data).__name__}")
        if await self.get() is None:
            return None
        await self.ctx.storage.put("data", data)
        return await self.get()

    async def end(self) -> bool:
        existed = await self.ctx.storage.get("data") is not None
        await self.ctx.storage.delete_all()  # the alarm goes too
        return existed

    async def alarm(self, info: AlarmInfo) -> None:
        expires = await self.ctx.storage.get("expires_ms")
        if expires is None:
            return
        if expires > _now_ms():
            await self.ctx.storage.set_alarm(expires)  # renewed since the alarm was set
        else:
            await self.ctx.storage.delete_all()

    async def fetch(self, request: Request) -> Response:
        if request.method == "GET":
            session = await self.get()
            if session is None:
                return Response.json_response({"error": "no such session (or it expired)"}, 404)
            return Response.json_response(session)
        if request.method == "PUT":
            try:
                data = request.json()
            except (ValueError, UnicodeDecodeError) as exc:
                return Response.json_response({"error": f"body must be a JSON object: {exc}"}, 400)
            raw_ttl = request.query_param("ttl")
            try:
                return Response.json_response(await self.start(data, float(raw_ttl) if raw_ttl else None))
            except (TypeError, ValueError) as exc:
                return Response.json_response({"error": str(exc)}, 400)
        if request.method == "DELETE":
            return Response.json_response({"ended": await self.end()})
        return Response.json_response({"error": "use GET, PUT or DELETE"}, 405, {"allow": "GET, PUT, DELETE"})


__all__ = ["Session"]
