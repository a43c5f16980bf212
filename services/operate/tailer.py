"""``durable tail``: live events of the workers, printed as they come, until Ctrl-C.

It announces itself on the interest subject every couple of seconds (workers publish only while
someone does) and subscribes to the events of everything, one class or one object.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient

from ..core import wire


def render(event: dict[str, Any]) -> str:
    """One event as one line: time, object, what happened."""
    ts = dt.datetime.fromtimestamp(float(event.get("ts", 0)), dt.UTC).strftime("%H:%M:%S.%f")[:-3]
    who = f"{event.get('namespace')}:{str(event.get('object_id'))[:12]}"
    kind = event.get("kind")
    if kind == "request":
        line = f"{event.get('verb')} {event.get('outcome')} {event.get('ms')} ms"
        if event.get("error"):
            line += f" ({event['error']})"
    elif kind == "alarm":
        line = f"alarm {event.get('outcome')}"
    elif kind == "log":
        line = f"log {event.get('level')} {event.get('logger')}: {event.get('message')}"
    else:
        line = json.dumps(event)
    return f"{ts} {who} {line}"


async def tail(nc: NatsClient, deployment_key: int, namespace: str | None, object_id: str | None,
               out: Callable[[dict[str, Any]], None], stop: asyncio.Event) -> None:
    """Print (through ``out``) every event until ``stop`` is set."""
    async def on_event(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            out(wire.decode_tail_event(msg.data))

    sub = await nc.subscribe(wire.tail_filter(deployment_key, namespace, object_id), cb=on_event)
    interest = wire.tail_interest_subject(deployment_key)
    try:
        while not stop.is_set():
            await nc.publish(interest, b"")
            await nc.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wire.TAIL_INTEREST_EVERY_S)
    finally:
        await sub.unsubscribe()
