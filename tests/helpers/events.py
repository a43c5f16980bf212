"""Reading the events stream (ctx.emit, services/objects/outbox.py) as a consumer would: a
JetStream consumer on a subject filter, and the outbox rows left in Postgres."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
from durable.core.settings import Settings
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .waiting import assert_eventually


@dataclass(frozen=True)
class Event:
    subject: str
    seq: int
    msg_id: str
    headers: dict[str, str]
    data: bytes

    @property
    def object_id(self) -> str:
        return self.subject.split(".")[2]

    @property
    def name(self) -> str:
        return self.subject.split(".", 3)[3]

    def json(self) -> Any:
        return json.loads(self.data)


async def count(nc: NatsClient, settings: Settings, subject_filter: str) -> int:
    """How many messages the events stream holds on ``subject_filter``."""
    info = await nc.jetstream().stream_info(settings.events_stream, subjects_filter=subject_filter)
    return sum((info.state.subjects or {}).values())


async def read_all(nc: NatsClient, settings: Settings, subject_filter: str) -> list[Event]:
    """Every message the events stream holds on ``subject_filter``, in stream order, read by an
    ephemeral pull consumer (no acknowledgement needed)."""
    js = nc.jetstream()
    total = await count(nc, settings, subject_filter)
    sub = await js.pull_subscribe(subject_filter, stream=settings.events_stream, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0))
    out: list[Event] = []
    try:
        while len(out) < total:
            for m in await sub.fetch(batch=min(1000, total - len(out)), timeout=10):
                h = dict(m.headers or {})
                out.append(Event(m.subject, int(h["Durable-Seq"]), h["Nats-Msg-Id"], h, m.data))
    finally:
        await sub.unsubscribe()
    return out


async def wait_for(nc: NatsClient, settings: Settings, subject_filter: str, n: int,
                   timeout: float = 30.0) -> list[Event]:
    """Until the stream holds at least ``n`` events on ``subject_filter``; then all of them."""
    async def enough() -> bool:
        return await count(nc, settings, subject_filter) >= n

    await assert_eventually(enough, timeout, f"{n} events on {subject_filter}")
    return await read_all(nc, settings, subject_filter)


async def outbox_rows(settings: Settings, object_id: str | None = None) -> int:
    """Committed events not yet published (still in do_outbox)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        if object_id is None:
            return int(await conn.fetchval("SELECT count(*) FROM do_outbox"))
        return int(await conn.fetchval("SELECT count(*) FROM do_outbox WHERE object_id = $1", object_id))
    finally:
        await conn.close()


async def wait_drained(settings: Settings, timeout: float = 30.0) -> None:
    """Until every committed event was published (the outbox is empty)."""
    async def empty() -> bool:
        return await outbox_rows(settings) == 0

    await assert_eventually(empty, timeout, "the outbox drained")
