"""RateLimiter: a fixed window of ``LIMIT`` requests per ``WINDOW_MS``, one object per client."""

from __future__ import annotations

import time
from typing import Any

from ...core.http import Request, Response
from ..base import DurableObject


class RateLimiter(DurableObject):
    LIMIT = 100
    WINDOW_MS = 60_000

    async def check(self) -> dict[str, Any]:
        """Count one request; answers whether it is allowed and what is left of the window."""
        now = int(time.time() * 1000)
        window = now // self.WINDOW_MS
        state = await self.ctx.storage.get("window") or {"window": window, "count": 0}
        if state["window"] != window:  # a new window: the old count is simply replaced
            state = {"window": window, "count": 0}
        allowed = state["count"] < self.LIMIT
        if allowed:
            state["count"] += 1
            await self.ctx.storage.put("window", state)
        return {
            "allowed": allowed,
            "limit": self.LIMIT,
            "remaining": self.LIMIT - state["count"],
            "reset_ms": (window + 1) * self.WINDOW_MS,
        }

    async def fetch(self, request: Request) -> Response:
        result = await self.check()
        headers = {"x-ratelimit-limit": str(result["limit"]), "x-ratelimit-remaining": str(result["remaining"])}
        if not result["allowed"]:
            retry_after = max(1, (result["reset_ms"] - int(time.time() * 1000) + 999) // 1000)
            headers["retry-after"] = str(retry_after)
            return Response.json_response({"error": "rate limited", **result}, 429, headers)
        return Response.json_response(result, 200, headers)
