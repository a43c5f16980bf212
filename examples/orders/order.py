"""An order, fed by a stream and announcing what happens to it.

``orders.<id>.created`` on the ORDERS stream becomes ``on_message`` of the Order named ``<id>``
(``[[subscriptions]]`` in durable.toml): exactly once in effect, in stream order. Paying it
(``pay``) and its payment deadline passing (``alarm``) change its status and emit an event with
``ctx.emit``, committed with that change: ``evt.Order.<object id>.paid`` or ``.expired``. A
message that is not a valid order raises, is retried, and is then parked for the operator
(``durable parked ls orders-created``).
"""

from __future__ import annotations

import time
from typing import Any

from durable import DurableObject, Message, Request, Response

#: an order not paid this long after it was created expires
PAY_WITHIN_MS = 15 * 60 * 1000


class OrderError(ValueError):
    """A request the order refuses, with the HTTP status the app answers."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def parse_order(data: Any) -> dict[str, Any]:
    """``{"customer": str, "items": [{"sku": str, "qty": int, "price": int (cents)}]}``, checked."""
    if not isinstance(data, dict) or not isinstance(data.get("customer"), str) or not data["customer"]:
        raise ValueError("an order needs a customer (a non-empty string)")
    items = data.get("items")
    if not isinstance(items, list) or not items:
        raise ValueError("an order needs a non-empty list of items")
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("sku"), str)
                and isinstance(item.get("qty"), int) and item["qty"] > 0
                and isinstance(item.get("price"), int) and item["price"] >= 0):
            raise ValueError(f"bad item {item!r}: each needs sku (str), qty (int > 0), price (int cents >= 0)")
    total = sum(i["qty"] * i["price"] for i in items)
    return {"customer": data["customer"], "items": items, "total": total}


class Order(DurableObject):
    async def on_message(self, msg: Message) -> None:
        """``orders.<id>.created``: record the order and give it until its payment deadline."""
        order = parse_order(msg.json())  # a bad one raises: retried, then parked
        if await self.ctx.storage.get("order") is not None:
            return  # created already (a second create of one id): the first one stands
        now = int(time.time() * 1000)
        order |= {"id": msg.subject.split(".")[1], "status": "created", "created_ms": now,
                  "pay_by_ms": now + PAY_WITHIN_MS}
        await self.ctx.storage.put("order", order)
        await self.ctx.storage.set_alarm(order["pay_by_ms"])
        self.ctx.emit("created", {"order": order["id"], "total": order["total"]})

    async def fetch(self, request: Request) -> Response:
        """``GET /orders/<id>``; ``POST /orders/<id>/pay`` with ``{"amount": <cents>}``."""
        segments = [s for s in request.path.split("/") if s]
        if len(segments) == 2 and request.method == "GET":
            order = await self.get()
            return Response.json_response(order if order is not None else {"error": "no such order"},
                                          200 if order is not None else 404)
        if len(segments) == 3 and segments[2] == "pay":
            if request.method != "POST":
                return Response.json_response({"error": "use POST to pay"}, 405, {"allow": "POST"})
            try:
                body = request.json() if request.body else {}
                amount = body.get("amount") if isinstance(body, dict) else None
            except ValueError:
                return Response.json_response({"error": 'the body must be JSON: {"amount": <cents>}'}, 400)
            try:
                return Response.json_response(await self.pay(amount))
            except OrderError as exc:
                return Response.json_response({"error": str(exc)}, exc.status)
        return Response.json_response({"error": "not found"}, 404)

    async def get(self) -> dict[str, Any] | None:
        order: dict[str, Any] | None = await self.ctx.storage.get("order")
        return order

    async def pay(self, amount: Any) -> dict[str, Any]:
        """Pay the order's total (cents); emits ``paid`` in the same commit as the status."""
        order = await self.ctx.storage.get("order")
        if order is None:
            raise OrderError("no such order", 404)
        if order["status"] != "created":
            raise OrderError(f"the order is {order['status']}, it cannot be paid", 409)
        if not isinstance(amount, int) or isinstance(amount, bool) or amount != order["total"]:
            raise OrderError(f"amount must be the order's total, {order['total']} (cents)", 400)
        order["status"] = "paid"
        order["paid_ms"] = int(time.time() * 1000)
        await self.ctx.storage.put("order", order)
        await self.ctx.storage.delete_alarm()
        self.ctx.emit("paid", {"order": order["id"], "customer": order["customer"], "total": order["total"]})
        return order

    async def alarm(self, info: Any = None) -> None:
        """The payment deadline: an order still unpaid expires."""
        order = await self.ctx.storage.get("order")
        if order is not None and order["status"] == "created":
            order["status"] = "expired"
            await self.ctx.storage.put("order", order)
            self.ctx.emit("expired", {"order": order["id"]})
