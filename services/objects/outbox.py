"""The outbox publisher: committed events (ctx.emit, events.py) go to JetStream, then are deleted.

An event is a ``do_outbox`` row committed by the same ``do_flush`` as the storage writes of the
event that emitted it, numbered per object (``seq``) in commit order. After a commit the
flusher wakes this publisher, which reads the oldest rows of the partitions its worker owns and
publishes them on their subjects (``evt.<Class>.<object id>.<name>``) with ``Nats-Msg-Id`` =
``<object id>:<incarnation>:<seq>``, so the stream drops a repeat within its duplicate window.

- **Order**: one object's events are published one at a time, each after the stream
  acknowledged the one before; a failure stops that object's run there, and the next round
  starts again from its oldest unpublished row. So the stream holds each object's events in
  seq order, without a gap. Objects are published concurrently (``CONCURRENCY``).
- **Marking**: published rows are *deleted* (one statement per round, ``d.seq <= upto`` per
  object, not waiting for its WAL flush: migration 006), rather than flagged: the table stays
  the size of the backlog, which is what the round reads. The per-object counter lives in
  ``do_outbox_seq``, so a number is never reused.
- **A new owner** wakes the publisher when it takes a partition (and it polls every
  ``POLL`` seconds): it publishes what the previous owner committed and had not deleted. Rows the
  previous owner had published but not yet deleted are sent again with the same id, and the
  stream drops them. An old owner still publishing after losing the partition does the same
  harmless repeats, in the same order.
- **Fairness**: a round publishes at most ``PER_OBJECT`` events of one object and the next round
  starts after the last object of the one before (a cursor), so a hot object's backlog takes
  turns with the others instead of holding them back, and a round stays short.
- **JetStream unavailable**: rows stay in Postgres; the round fails and is retried with
  exponential backoff (to ``MAX_BACKOFF``), a bounded slice at a time (``BATCH`` rows, about
  ``BATCH_BYTES`` of payload), so memory stays bounded and events keep committing meanwhile:
  publishing never holds up a flush or a partition.
- **One object failing** (an event the server refuses, however often it is sent) waits out a
  backoff of its own, left out of the rounds meanwhile, and is logged each time; the other
  objects' events keep flowing at full speed. Its events are kept, never skipped: the order
  guarantee leaves no other choice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NoStreamResponseError

from ..core.errors import ConfigError
from ..core.settings import Settings
from ..core.streams import SUBJECTS_OVERLAP, put_stream
from ..core.tasks import TaskSet
from .events import HEADROOM, SUBJECT_PREFIX
from .sql import ObjectStore

log = logging.getLogger("durable.events")


def event_max_bytes(settings: Settings, nats_max_payload: int) -> int:
    """The payload limit of ctx.emit: the setting, below what the NATS server carries."""
    return max(1, min(settings.event_max_bytes, nats_max_payload - HEADROOM))


class EventStream:
    """The events stream: ``evt.>``, limits retention by age, de-duplicated by message id."""

    def __init__(self, nc: NatsClient, settings: Settings) -> None:
        self.js = nc.jetstream()
        self.settings = settings
        self.name = settings.events_stream

    def config(self) -> StreamConfig:
        s = self.settings
        return StreamConfig(
            name=self.name, subjects=[f"{SUBJECT_PREFIX}.>"], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, num_replicas=s.events_replicas, max_age=s.events_max_age,
            duplicate_window=s.events_duplicate_window, discard=DiscardPolicy.OLD,
            description="durable events: evt.<Class>.<object id>.<name>, published from the outbox",
        )

    async def ensure(self) -> None:
        """Create the stream, or bring its settings up to date."""
        config = self.config()
        try:
            await put_stream(self.js, config)
        except BadRequestError as exc:
            if exc.err_code == SUBJECTS_OVERLAP:
                raise ConfigError(
                    f"the events stream {self.name!r} needs the subjects '{SUBJECT_PREFIX}.>', which another "
                    f"JetStream stream already takes ({exc.description}); delete that stream or set "
                    "DURABLE_EVENTS_STREAM to its name") from None
            raise


class PublishFailed(Exception):
    """A round found several objects' events and could publish none (the first error is the cause)."""


class Publisher:
    """Publishes the committed events of the owned partitions (see the module docstring)."""

    #: rows read per round, and about this much payload; at most PER_OBJECT of one object are
    #: published per round, and a round starts after the last object of the one before: a hot
    #: object's backlog takes its turn with the others' instead of holding them back
    BATCH = 1000
    PER_OBJECT = 100
    BATCH_BYTES = 8 * 1024 * 1024
    #: objects published at once
    CONCURRENCY = 64
    #: a look at the outbox this often even when nothing woke the publisher
    POLL = 2.0
    #: how long one publish waits for the stream's acknowledgement
    ACK_TIMEOUT = 5.0
    BASE_BACKOFF = 0.2
    MAX_BACKOFF = 10.0

    def __init__(self, nc: NatsClient, settings: Settings, store: ObjectStore,
                 owned: Callable[[], list[int]]) -> None:
        self.stream = EventStream(nc, settings)
        self.js = self.stream.js
        self.store = store
        self.owned = owned
        self.delay = settings.events_publish_delay
        self._wake = asyncio.Event()
        #: where the next round starts (object ids after it); "": from the first
        self._cursor = ""
        #: objects whose last publish failed: (failures in a row, monotonic time of the next try)
        self._waiting: dict[str, tuple[int, float]] = {}
        self.tasks = TaskSet()
        #: events published, and failures (whole rounds, or one object's publish) since start (metrics)
        self.published = 0
        self.failures = 0
        #: the last round read a full slice: more events may be waiting behind it
        self.more = False

    def start(self) -> None:
        self.tasks.spawn(self._run(), "event-publisher")

    async def stop(self) -> None:
        await self.tasks.cancel()

    def wake(self) -> None:
        """Events committed, or a partition taken: publish soon."""
        self._wake.set()

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.POLL)
            except TimeoutError:
                pass
            if self.delay:
                await asyncio.sleep(self.delay)
            self._wake.clear()
            try:
                # a short slice was the whole backlog: the next commit wakes the publisher again
                while await self.publish_round() and self.more:
                    pass
                attempt = 0
            except Exception as exc:  # noqa: BLE001 - NATS or Postgres trouble: the rows stay, retried
                self.failures += 1
                attempt += 1
                backoff = self._backoff(attempt)
                log.warning("publishing events failed (attempt %d, retry in %.1fs): %s: %s",
                            attempt, backoff, type(exc).__name__, exc)
                await asyncio.sleep(backoff)
                self._wake.set()

    async def publish_round(self) -> bool:
        """Publish one bounded slice of the outbox; whether any event was published (then there
        may be more). Raises when several objects had events and none could be published."""
        partitions = self.owned()
        if not partitions:
            return False
        now = time.monotonic()
        skip = [o for o, (_, until) in self._waiting.items() if until > now]
        self.more = False
        rows = await self.store.read_outbox(partitions, self.BATCH, self.BATCH_BYTES, skip, self._cursor)
        if not rows:
            if not self._cursor:
                return False
            self._cursor = ""  # the end of the objects: from the first again
            self.more = True
            return True
        # a full slice (rows or bytes): the next round goes on after its last object; a short one
        # reached the end of the objects: the next round starts from the first again
        full = len(rows) >= self.BATCH or sum(len(r["payload"]) for r in rows) >= self.BATCH_BYTES
        self._cursor = rows[-1]["object_id"] if full else ""
        self.more = full
        by_object: dict[str, list[Any]] = {}
        for r in rows:
            items = by_object.setdefault(r["object_id"], [])
            if len(items) < self.PER_OBJECT:  # the rest waits for the object's next turn
                items.append(r)
        upto: dict[str, int] = {}
        errors: dict[str, BaseException] = {}
        gate = asyncio.Semaphore(self.CONCURRENCY)

        async def publish_object(object_id: str, items: list[Any]) -> None:
            async with gate:
                for r in items:
                    try:
                        await self._publish(r)
                    except Exception as exc:  # noqa: BLE001 - this object stops here, in order
                        errors[object_id] = exc
                        return
                    upto[object_id] = r["seq"]

        await asyncio.gather(*(publish_object(o, items) for o, items in by_object.items()))
        if upto:
            await self.store.delete_outbox(list(upto), list(upto.values()))
            self.published += sum(1 for items in by_object.values() for r in items
                                  if upto.get(r["object_id"], 0) >= r["seq"])
        # objects whose wait was over and that published (or had nothing left) wait no more
        for object_id in [o for o, (_, until) in self._waiting.items() if until <= now and o not in errors]:
            del self._waiting[object_id]
        if errors:
            await self._failed(errors, len(by_object))
        return True

    async def _failed(self, errors: dict[str, BaseException], tried: int) -> None:
        """Some objects' events were not published: the stream may be gone; each failing object
        waits a backoff of its own, unless several were tried and none got through (JetStream
        itself, most likely: then the whole round waits and is retried)."""
        first = next(iter(errors.values()))
        if isinstance(first, NoStreamResponseError):
            await self._recreate_stream()
        if len(errors) == tried > 1:  # nothing got through: JetStream itself, most likely
            raise PublishFailed(f"no object's events were published ({len(errors)} tried): "
                                f"{type(first).__name__}: {first}") from first
        # others got through: only the failing objects wait, each on a backoff of its own
        now = time.monotonic()
        for object_id, exc in errors.items():
            failures = self._waiting.get(object_id, (0, 0.0))[0] + 1
            self._waiting[object_id] = (failures, now + self._backoff(failures))
            self.failures += 1
            log.warning("publishing the events of object %s failed (%d in a row): %s: %s",
                        object_id, failures, type(exc).__name__, exc)

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter (so many objects retried at once spread out)."""
        backoff: float = min(self.MAX_BACKOFF, self.BASE_BACKOFF * 2.0 ** min(attempt, 16))
        return backoff * (0.5 + random.random() / 2)

    async def _publish(self, row: Any) -> None:
        headers: dict[str, str] = json.loads(row["headers"]) if row["headers"] else {}
        headers["Nats-Msg-Id"] = row["msg_id"]
        headers["Durable-Seq"] = str(row["seq"])
        await self.js.publish(row["subject"], bytes(row["payload"]), timeout=self.ACK_TIMEOUT,
                              stream=self.stream.name, headers=headers)

    async def _recreate_stream(self) -> None:
        """No stream answered: it may have been deleted. Making it again lets the retry succeed
        (the events are still in Postgres); if JetStream itself is down this fails too."""
        try:
            await self.stream.ensure()
            log.warning("the events stream %r did not answer; it was created again", self.stream.name)
        except Exception as exc:  # noqa: BLE001 - the retry tries again
            log.warning("the events stream %r could not be created: %s: %s", self.stream.name,
                        type(exc).__name__, exc)
