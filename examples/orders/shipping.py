"""A second service: ships paid orders, reading the events the Order objects emit with plain
NATS (nothing of durable is needed here). Run it beside `durable dev`:

    python shipping.py            # DURABLE_NATS_URL, default nats://127.0.0.1:4222

It is a JetStream *durable pull consumer* named ``shipping`` on the events stream, filtered to
``evt.Order.*.paid``: it survives restarts, resumes where it stopped, and acknowledges each event
once handled. The same with the ``nats`` CLI:

    nats consumer add DURABLE_EVENTS shipping --filter 'evt.Order.*.paid' --pull --ack explicit --deliver all --defaults
    nats consumer next DURABLE_EVENTS shipping --count 10

Events of one order arrive in order, each once in the stream; a consumer that crashes between
handling and acknowledging sees an event again, so ``Durable-Seq`` (per object: 1, 2, 3...) lets
it skip what it handled already.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeout

STREAM = os.environ.get("DURABLE_EVENTS_STREAM", "DURABLE_EVENTS")
PAID = "evt.Order.*.paid"

Handler = Callable[[str, dict[str, Any], int], Awaitable[None]]


async def consume(nc: NatsClient, handle: Handler, durable: str = "shipping",
                  stop: asyncio.Event | None = None) -> None:
    """Hand each paid-order event to ``handle(object id, payload, Durable-Seq)``, then ack it."""
    sub = await nc.jetstream().pull_subscribe(PAID, durable=durable, stream=STREAM)
    while stop is None or not stop.is_set():
        try:
            msgs = await sub.fetch(16, timeout=1)
        except NatsTimeout:
            continue
        for msg in msgs:
            object_id = msg.subject.split(".")[2]
            seq = int((msg.headers or {}).get("Durable-Seq", "0"))
            await handle(object_id, json.loads(msg.data), seq)
            await msg.ack()


async def main() -> None:
    nc = await nats.connect(os.environ.get("DURABLE_NATS_URL", "nats://127.0.0.1:4222"))

    async def ship(object_id: str, event: dict[str, Any], seq: int) -> None:
        print(f"shipping order {event['order']} to {event['customer']} ({event['total'] / 100:.2f})", flush=True)

    try:
        await consume(nc, ship)
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
