"""Auction: validated bids, anti-sniping, a close by alarm that happens exactly once, live watchers.

One object per auction. A bid must beat the current price by the increment (or meet the start
price when there is none); a bid in the last ``snipe_window_ms`` pushes the end out to
``extend_ms`` from now, so nobody wins by bidding in the final instant. Each bid carries a
``bid_id``: submitting it again (a retry after a timeout) answers the first outcome and changes
nothing. The end is decided by time, not by when the alarm happens to run: a bid at or after
``ends_at_ms`` is refused even if the closing alarm has not run yet, so no bid can slip past the
close. The alarm records the winner once (the ``closed`` flag commits with it).

Watchers connect a WebSocket (``GET /auction/<name>`` with an upgrade); they get the state at
once, then every accepted bid and the close. ``now_ms`` is the clock, replaced by tests.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ...core.http import Request, Response
from ..base import AlarmInfo, DurableObject
from ..sockets import WebSocket

MAX_PRICE = 10**12
MAX_DURATION_MS = 30 * 24 * 3600 * 1000


class BidRefused(Exception):
    """The bid cannot be accepted (too low, too late, not open); nothing changed."""


def _money(value: Any, name: str, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_PRICE:
        raise ValueError(f"{name} must be an integer from {low} to {MAX_PRICE}, not {value!r}")
    return value


def _text(value: Any, name: str, limit: int = 200) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise TypeError(f"{name} must be a non-empty str of at most {limit} characters")
    return value


class Auction(DurableObject):
    """RPC: ``open(item, start_price, increment, duration_ms, snipe_window_ms=30000,
    extend_ms=30000)``, ``bid(bidder, amount, bid_id)``, ``status()``. HTTP: ``POST
    /auction/<name>/bid`` with a JSON body, ``GET /auction/<name>`` (or a WebSocket upgrade)."""

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    async def status(self) -> dict[str, Any] | None:
        state = await self.ctx.storage.get("auction")
        return state if isinstance(state, dict) else None

    async def open(self, item: str, start_price: int, increment: int, duration_ms: int,
                   snipe_window_ms: int = 30_000, extend_ms: int = 30_000) -> dict[str, Any]:
        """Open the auction (once: opening it again with the same item answers its state)."""
        item = _text(item, "item")
        start_price = _money(start_price, "start_price")
        increment = _money(increment, "increment")
        duration_ms = _money(duration_ms, "duration_ms", 100)
        if duration_ms > MAX_DURATION_MS:
            raise ValueError(f"duration_ms must be at most {MAX_DURATION_MS}")
        snipe_window_ms = _money(snipe_window_ms, "snipe_window_ms", 0)
        extend_ms = _money(extend_ms, "extend_ms", 0)
        state = await self.status()
        if state is not None:
            if state["item"] != item:
                raise ValueError(f"this auction already sells {state['item']!r}")
            return state
        now = self.now_ms()
        state = {"item": item, "start_price": start_price, "increment": increment, "ends_at_ms": now + duration_ms,
                 "snipe_window_ms": snipe_window_ms, "extend_ms": extend_ms, "price": None, "leader": None,
                 "bids": 0, "closed": False, "winner": None}
        await self.ctx.storage.put("auction", state)
        await self.ctx.storage.set_alarm(state["ends_at_ms"])
        return state

    async def bid(self, bidder: str, amount: int, bid_id: str) -> dict[str, Any]:
        """Place a bid: ``{"accepted": True, "price", "ends_at_ms"}``, or BidRefused saying why."""
        bidder = _text(bidder, "bidder")
        amount = _money(amount, "amount")
        bid_id = _text(bid_id, "bid_id")
        done = await self.ctx.storage.get(f"bid:{bid_id}")
        if isinstance(done, dict):
            return done  # a retry of a bid already decided
        state = await self.status()
        if state is None:
            raise BidRefused("this auction is not open")
        now = self.now_ms()
        if state["closed"] or now >= state["ends_at_ms"]:
            raise BidRefused("the auction has ended")
        minimum = state["start_price"] if state["price"] is None else state["price"] + state["increment"]
        if amount < minimum:
            raise BidRefused(f"a bid must be at least {minimum}")
        ends = state["ends_at_ms"]
        if ends - now <= state["snipe_window_ms"]:
            ends = max(ends, now + state["extend_ms"])  # anti-sniping: the end moves out
        state = {**state, "price": amount, "leader": bidder, "bids": state["bids"] + 1, "ends_at_ms": ends}
        outcome = {"accepted": True, "bid_id": bid_id, "price": amount, "ends_at_ms": ends, "at_ms": now}
        await self.ctx.storage.put({"auction": state, f"bid:{bid_id}": outcome})
        if ends != (await self.ctx.storage.get_alarm()):
            await self.ctx.storage.set_alarm(ends)
        await self._broadcast({"type": "bid", "bidder": bidder, "price": amount, "ends_at_ms": ends})
        return outcome

    async def alarm(self, info: AlarmInfo) -> None:
        """Close the auction at its (possibly extended) end, exactly once."""
        state = await self.status()
        if state is None or state["closed"]:
            return
        if self.now_ms() < state["ends_at_ms"]:
            await self.ctx.storage.set_alarm(state["ends_at_ms"])  # extended meanwhile
            return
        winner = None if state["leader"] is None else {"bidder": state["leader"], "price": state["price"]}
        state = {**state, "closed": True, "winner": winner}
        await self.ctx.storage.put("auction", state)
        await self._broadcast({"type": "closed", "winner": winner})

    async def _broadcast(self, message: dict[str, Any]) -> None:
        """To every watcher (after hibernation too); frames leave once the writes before them commit."""
        text = json.dumps(message)
        for ws in await self.ctx.get_websockets("watcher"):
            ws.send(text)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        ws.send(json.dumps({"type": "error", "error": "watchers only listen; bid with POST /auction/<name>/bid"}))

    async def fetch(self, request: Request) -> Response:
        segments = [s for s in request.path.split("/") if s]
        action = segments[2] if len(segments) > 2 else ""
        if request.websocket is not None and not action:
            self.ctx.accept_websocket(request.websocket, ["watcher"])
            request.websocket.send(json.dumps({"type": "state", "auction": await self.status()}))
            return Response(status=101)
        if not action and request.method == "GET":
            state = await self.status()
            return Response.json_response(state if state else {"error": "this auction is not open"},
                                          200 if state else 404)
        if action in ("bid", "open") and len(segments) == 3 and request.method == "POST":
            try:
                args = request.json_object()
                result = await (self.bid(**args) if action == "bid" else self.open(**args))
            except (TypeError, ValueError) as exc:
                return Response.json_response({"error": str(exc)}, 400)
            except BidRefused as exc:
                return Response.json_response({"accepted": False, "error": str(exc)}, 409)
            return Response.json_response(result)
        return Response.json_response({"error": "not found"}, 404)
