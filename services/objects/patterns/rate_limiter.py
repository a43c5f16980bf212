"""RateLimiter: a fixed window of ``LIMIT`` requests per ``WINDOW_MS``, one object per client."""

from __future__ import annotations

import time
from typing import Any

from ...core.http import Request, Response
from ..base import AlarmInfo, DurableObject


class RateLimiter(DurableObject):
    """The count of the current window lives in storage. The first request of a window sets an
    alarm for the window's end, and the alarm deletes the object's data: a client that goes away
    leaves nothing behind, and no request pays for cleaning up after another."""

    LIMIT = 100
    WINDOW_MS = 60_000

    async def check(self) -> dict[str, Any]:
        """Count one request; answers whether it is allowed and what is left of the window."""
        now = int(time.time() * 1000)
        window = now // self.WINDOW_MS
        reset_ms = (window + 1) * self.WINDOW_MS
        state = await self.ctx.storage.get("window")
        if state is None or state["window"] != window:  # a new window (the alarm may not have run yet)
            state = {"window": window, "count": 0}
            await self.ctx.storage.set_alarm(reset_ms)
        allowed = state["count"] < self.LIMIT
        if allowed:
            state["count"] += 1
            await self.ctx.storage.put("window", state)
        return {"allowed": allowed, "limit": self.LIMIT, "remaining": self.LIMIT - state["count"],
                "reset_ms": reset_ms}

    async def alarm(self, info: AlarmInfo) -> None:
        """The window ended: forget it (a request in a newer window set a later alarm instead)."""
        state = await self.ctx.storage.get("window")
        if state is None:
            return
        if state["window"] < int(time.time() * 1000) // self.WINDOW_MS:
            await self.ctx.storage.delete_all()
        else:  # woken a little before the window's end (clocks): look again at its end
            await self.ctx.storage.set_alarm((state["window"] + 1) * self.WINDOW_MS)

    async def fetch(self, request: Request) -> Response:
        result = await self.check()
        headers = {"x-ratelimit-limit": str(result["limit"]), "x-ratelimit-remaining": str(result["remaining"])}
        if not result["allowed"]:
            retry_after = max(1, (result["reset_ms"] - int(time.time() * 1000) + 999) // 1000)
            headers["retry-after"] = str(retry_after)
            return Response.json_response({"error": "rate limited", **result}, 429, headers)
        return Response.json_response(result, 200, headers)
