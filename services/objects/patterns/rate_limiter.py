"""RateLimiter: at most ``LIMIT`` requests in any ``WINDOW_MS`` (a sliding window log), one object
per client."""

from __future__ import annotations

import time
from typing import Any

from ...core.http import Request, Response
from ..base import AlarmInfo, DurableObject


class RateLimiter(DurableObject):
    """The times of the requests allowed in the last ``WINDOW_MS`` live in storage (at most
    ``LIMIT`` of them, oldest first): a request is allowed while fewer than ``LIMIT`` are younger
    than the window, so no stretch of ``WINDOW_MS`` ever holds more than ``LIMIT`` allowed requests,
    across any boundary. A refused request is not counted and learns when the oldest one ages out.

    The first request after a quiet spell sets an alarm for when the log would be empty; the alarm
    deletes the object's data, or looks again when the newest request ages out. A client that
    goes away leaves nothing behind, and no request pays for cleaning up after another.

    ``now_ms`` is the clock (epoch milliseconds): tests replace it in a subclass instead of sleeping.
    """

    LIMIT = 100
    WINDOW_MS = 60_000

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def _live(self, log: list[int] | None, now: int) -> list[int]:
        """The allowed requests still inside the window that ends now."""
        return [t for t in log or () if t > now - self.WINDOW_MS]

    async def check(self) -> dict[str, Any]:
        """Count one request; answers whether it is allowed, how many more the window has room
        for now, and ``reset_ms``: when the oldest counted request ages out (room for one more)."""
        now = self.now_ms()
        stored = await self.ctx.storage.get("log")
        log = self._live(stored if isinstance(stored, list) else None, now)
        allowed = len(log) < self.LIMIT
        if allowed:
            if not log:  # the first of a busy spell: clean up after it (replaces any older alarm)
                await self.ctx.storage.set_alarm(now + self.WINDOW_MS)
            log.append(now)
            await self.ctx.storage.put("log", log)
        reset_ms = log[0] + self.WINDOW_MS
        return {"allowed": allowed, "limit": self.LIMIT, "remaining": self.LIMIT - len(log),
                "reset_ms": reset_ms, "retry_after_ms": 0 if allowed else max(0, reset_ms - now)}

    async def alarm(self, info: AlarmInfo) -> None:
        """Forget the log once every request in it has aged out; else look again when it will have."""
        stored = await self.ctx.storage.get("log")
        if not isinstance(stored, list) or not self._live(stored, self.now_ms()):
            await self.ctx.storage.delete_all()
        else:
            await self.ctx.storage.set_alarm(stored[-1] + self.WINDOW_MS)

    async def fetch(self, request: Request) -> Response:
        result = await self.check()
        headers = {"x-ratelimit-limit": str(result["limit"]), "x-ratelimit-remaining": str(result["remaining"])}
        if not result["allowed"]:
            # whole seconds, rounded up: a retry after this many seconds is allowed
            headers["retry-after"] = str(max(1, (result["retry_after_ms"] + 999) // 1000))
            return Response.json_response({"error": "rate limited", **result}, 429, headers)
        return Response.json_response(result, 200, headers)
