"""The orders app: an order arrives on the ORDERS stream, is paid over HTTP, and its ``paid``
event reaches a second service reading the events stream with plain NATS (shipping.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from durable.core.dead_letters import ORIGINAL_SUBJECT_HEADER, REASON_HEADER, DeadLetters
from durable.testing import DurableApp
from shipping import consume

ORDER = {"customer": "ada", "items": [{"sku": "book", "qty": 2, "price": 1250}, {"sku": "pen", "qty": 1, "price": 300}]}


async def create(app: DurableApp, order_id: str, body: Any) -> int:
    """Publish an order to the ORDERS stream; its stream sequence."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    ack = await app.client.nc.jetstream().publish(f"orders.{order_id}.created", data)
    return int(ack.seq)


async def handled(app: DurableApp, seq: int) -> bool:
    """The subscription acknowledged every message up to ``seq`` (applied, or parked)."""
    info = await app.client.nc.jetstream().consumer_info("ORDERS", "orders-created")
    return info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= seq


async def until(check: Any, timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {timeout} s")
        await asyncio.sleep(0.1)


async def order_status(app: DurableApp, order_id: str) -> str | None:
    response = await app.fetch(f"/orders/{order_id}")
    return json.loads(response.body)["status"] if response.status == 200 else None


async def test_an_order_from_the_stream_is_paid_and_its_event_reaches_shipping(durable_app: DurableApp) -> None:
    order_id = f"o-{uuid.uuid4().hex[:8]}"
    await create(durable_app, order_id, ORDER)
    assert await until(lambda: order_status(durable_app, order_id)) == "created"

    wrong = await durable_app.fetch(f"/orders/{order_id}/pay", method="POST", body=b'{"amount": 1}')
    assert wrong.status == 400 and "2800" in json.loads(wrong.body)["error"]
    paid = await durable_app.fetch(f"/orders/{order_id}/pay", method="POST", body=b'{"amount": 2800}')
    assert paid.status == 200 and json.loads(paid.body)["status"] == "paid"
    again = await durable_app.fetch(f"/orders/{order_id}/pay", method="POST", body=b'{"amount": 2800}')
    assert again.status == 409

    shipped: list[tuple[str, dict[str, Any], int]] = []
    stop = asyncio.Event()
    object_id = durable_app.env.ORDERS.id_from_name(order_id).hex

    async def ship(oid: str, event: dict[str, Any], seq: int) -> None:
        shipped.append((oid, event, seq))
        if oid == object_id:
            stop.set()

    await asyncio.wait_for(consume(durable_app.client.nc, ship, durable=f"shipping-{order_id}", stop=stop), 20)
    mine = [(event, seq) for oid, event, seq in shipped if oid == object_id]
    # the order's events: created (1), then paid (2); the failed and repeated payments emitted nothing
    assert mine == [({"order": order_id, "customer": "ada", "total": 2800}, 2)]


async def test_a_second_create_of_one_order_changes_nothing(durable_app: DurableApp) -> None:
    order_id = f"o-{uuid.uuid4().hex[:8]}"
    await create(durable_app, order_id, ORDER)
    seq = await create(durable_app, order_id, {"customer": "bob", "items": [{"sku": "x", "qty": 1, "price": 1}]})
    await until(lambda: handled(durable_app, seq))
    state = await durable_app.env.ORDERS.get_by_name(order_id).get()
    assert (state["customer"], state["total"], state["status"]) == ("ada", 2800, "created")


async def test_a_malformed_order_is_parked_with_its_reason_while_others_flow(durable_app: DurableApp) -> None:
    bad, good = f"o-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    bad_seq = await create(durable_app, bad, {"customer": "eve", "items": []})
    await create(durable_app, good, ORDER)
    # the good order flows while the bad one is retried (3 attempts), then parked
    assert await until(lambda: order_status(durable_app, good)) == "created"
    await until(lambda: handled(durable_app, bad_seq))
    assert await order_status(durable_app, bad) is None
    dlq = DeadLetters(durable_app.settings.deployment_key)
    parked = await durable_app.client.nc.jetstream().get_last_msg(dlq.stream, dlq.subject("orders-created"))
    assert parked.headers is not None and parked.headers[ORIGINAL_SUBJECT_HEADER] == f"orders.{bad}.created"
    assert "an order needs a non-empty list of items" in parked.headers[REASON_HEADER]


async def test_an_unpaid_order_expires_at_its_deadline(durable_app: DurableApp) -> None:
    order_id = f"o-{uuid.uuid4().hex[:8]}"
    await create(durable_app, order_id, ORDER)
    assert await until(lambda: order_status(durable_app, order_id)) == "created"
    assert await durable_app.run_alarm(durable_app.env.ORDERS.get_by_name(order_id))  # the deadline, now
    assert await order_status(durable_app, order_id) == "expired"
    late = await durable_app.fetch(f"/orders/{order_id}/pay", method="POST", body=b'{"amount": 2800}')
    assert late.status == 409 and "expired" in json.loads(late.body)["error"]
