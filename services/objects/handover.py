"""Taking, handing over and losing partitions: when this worker serves a partition's requests.

Acquired: subscribe to the partition's requests (queue group ``p<partition>``) and reconcile
its alarms. Handed over (rebalancing): refuse new requests with NotOwner, which callers retry,
finish the events in flight, flush, release the lock; the subscription stays, refusing, until
the next owner holds the partition (so it is never without a subscriber), then withdraws and
lingers a little, refusing what NATS still routes here, so no request is dropped unanswered. Lost (lease lapsed,
fenced): reset every instance at once; their callers get ObjectReset, not a silent retry; the
subscription is withdrawn and lingers as in a hand-over, so requests that had not reached an
instance are refused with NotOwner rather than dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from ..core.errors import ObjectReset
from ..core.nats_private import withdraw_interest
from ..core.tasks import TaskSet
from ..core.wire import acquired_subject, partition_filter, partition_queue
from .alarms import Alarms
from .dispatch import Dispatcher
from .flusher import Flusher
from .partitions import Partitions, PartitionState

log = logging.getLogger("durable.worker")

#: how long a released partition's subscription keeps refusing requests before it is dropped
HANDOVER_LINGER = 0.5


class Handover:
    """The ownership callbacks (ownership.py calls them) and the drain of a stopping worker."""

    def __init__(self, nc: NatsClient, partitions: Partitions, dispatcher: Dispatcher, alarms: Alarms,
                 flusher: Flusher, release: Callable[[int], Awaitable[None]],
                 taken_over: Callable[[int, int], Awaitable[bool]] | None = None,
                 successor_wait: float = 5.0, deployment_key: int | None = None) -> None:
        self.nc = nc
        #: announces each partition taken (acquired_subject), if set
        self.deployment_key = deployment_key
        #: whether a partition released at an epoch has been taken under a newer one (a hand-over
        #: keeps refusing, rather than leave the partition without a subscriber, until it has)
        self._taken_over = taken_over
        self.successor_wait = successor_wait
        self.partitions = partitions
        self.dispatcher = dispatcher
        self.alarms = alarms
        self.flusher = flusher
        self._release = release
        self.tasks = TaskSet()
        #: partitions taken, handed over to another worker, and lost (lease lapsed, fenced): metrics
        self.acquired_count = 0
        self.handed_over = 0
        self.lost_count = 0

    async def acquired(self, partition: int, epoch: int) -> None:
        state = self.partitions.open(partition, epoch)
        self.acquired_count += 1
        dispatcher, tasks = self.dispatcher, self.tasks

        async def on_msg(msg: Msg) -> None:
            dispatcher.last_request = time.monotonic()
            state.begin()
            tasks.spawn(dispatcher.handle(state, msg))

        if self.deployment_key is not None:
            # before subscribing: a request sent before a caller hears this went to the previous
            # owner (or found none), never to us, so the caller may give up on it (client.py)
            try:
                await self.nc.publish(acquired_subject(self.deployment_key, partition), str(epoch).encode())
            except Exception as exc:  # noqa: BLE001 - only a hint: callers then wait for their timeout
                log.debug("could not announce partition %d: %s", partition, exc)
        state.sub = await self.nc.subscribe(
            partition_filter(partition), queue=partition_queue(partition), cb=on_msg,
            pending_msgs_limit=200_000, pending_bytes_limit=256 * 1024 * 1024,
        )
        self.alarms.attach(state)

    def lost(self, partition: int, reason: str) -> None:
        state = self.partitions.get(partition)
        if state is None:
            return
        self.lost_count += 1  # ownership logs one line for all the partitions it steps down from
        # ObjectReset, not NotOwner: these events may have run (and a flush may be in flight), so
        # the caller must not retry them blindly as it does a NotOwner that proves nothing ran
        self.partitions.close(partition, ObjectReset(
            f"this worker stepped down from partition {partition} ({reason}); "
            "the object was reset; writes not yet acknowledged may be lost"))
        if state.sub is not None:
            # as a hand-over does: withdraw interest but keep the subscription a little, so what
            # is queued for it or still on its way is refused with NotOwner (it never ran: the
            # caller retries elsewhere) instead of dropped unanswered (the caller's timeout)
            self.tasks.spawn(self._withdraw_and_linger(state), "unsubscribe")

    async def _withdraw_and_linger(self, state: PartitionState) -> None:
        if state.sub is not None:
            await self._withdraw(state.sub)
        await self.linger([state])

    async def hand_over(self, partition: int, grace: float = 5.0) -> None:
        """Give a partition to the worker it is now assigned to (see the module docstring)."""
        state = self.partitions.get(partition)
        if state is None:
            return
        log.debug("handing over partition %d", partition)  # ownership logs one line for the lot
        # the subscription keeps its interest, refusing with NotOwner (retryable: nothing runs),
        # until the next owner has the partition: withdrawn now, the partition would have no
        # subscriber at all (callers get "no responders") until the next owner's heartbeat
        await self.quiesce([state], grace, withdraw=self._taken_over is None)
        closed = self.partitions.close(partition, ObjectReset(
            f"partition {partition} was handed over to another worker; retry"), state)
        if closed is None:
            if state.sub is not None:  # stepped down meanwhile (lost() withdraws and lingers)
                await self._withdraw(state.sub)
            return
        await self._release(partition)
        self.handed_over += 1
        await self._await_successor(partition, state.epoch)
        if state.sub is not None:
            await self._withdraw(state.sub)
        await self.linger([state])

    async def _await_successor(self, partition: int, epoch: int) -> None:
        """Until another worker holds ``partition`` under an epoch after ``epoch`` (bounded)."""
        if self._taken_over is None:
            return
        deadline = time.monotonic() + self.successor_wait
        while time.monotonic() < deadline:
            try:
                if await self._taken_over(partition, epoch):
                    return
            except Exception as exc:  # noqa: BLE001 - Postgres unreachable: stop waiting, withdraw
                log.debug("could not see who took partition %d: %s", partition, exc)
                return
            await asyncio.sleep(0.02)  # no event says "taken" here: a short poll, during hand-overs only

    async def quiesce(self, states: list[PartitionState], grace: float, withdraw: bool = True) -> None:
        """Refuse new requests (and withdraw interest, unless told not to), then wait for those
        taken to finish and their replies to go out."""
        for state in states:
            state.closing = True
            if state.sub is not None and withdraw:
                await self._withdraw(state.sub)
        deadline = time.monotonic() + grace
        # busy() spans requests, events and flushes of many instances: no one event covers it, so
        # it is polled, briefly, and only while partitions are handed over
        while any(state.busy() for state in states) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        await self.flusher.replies_sent()

    async def _withdraw(self, sub: Subscription) -> None:
        """Tell the server we want no more messages, but keep the subscription registered in
        the client: a request the server routed to us just before it saw the UNSUB can still
        arrive (even after a PING round trip), and nats-py drops messages of unknown
        subscriptions, which would leave the caller waiting for a timeout. Kept, it is refused
        with NotOwner and retried."""
        try:
            await withdraw_interest(self.nc, sub)
        except (NatsError, OSError, ConnectionError, TimeoutError) as exc:  # closed or reconnecting
            log.debug("could not withdraw a subscription (%s); the server drops it with the connection", exc)

    async def linger(self, states: list[PartitionState]) -> None:
        """Drop the withdrawn subscriptions once stragglers have had time to arrive and be refused."""
        await asyncio.sleep(HANDOVER_LINGER)
        for state in states:
            if state.sub is not None:
                sub, state.sub = state.sub, None
                await _unsubscribe(sub)


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # noqa: BLE001 - the connection may be gone; the server drops it then
        log.debug("could not unsubscribe: %s", exc)
