"""Streams into objects: each ``[[subscriptions]]`` entry's JetStream messages become events on objects.

**Who pulls.** Each subscription has one durable pull consumer (its ``name``) on the app's stream,
and one *active puller* in the whole cluster: the worker that owns the partition the
subscription's name hashes to (``partition_of(name)``), chosen through the existing ownership
(advisory lock + epoch), so it moves with partitions on a join, a drain or a crash. One puller is
what makes stream order per object easy to keep: JetStream hands a consumer's messages out in
stream order, and a single puller queues them per object and delivers each object's messages one
at a time, in that order, while different objects proceed concurrently. Several pullers on one
consumer would each get an arbitrary share of an object's messages and race each other.

**Delivery.** A message is a request to its object (``msg.<subscription>``; the object's name is
the subject's ``object_token``-th token, turned into an id by ``id_from_name``) carrying the
idempotency key ``sub:<subscription>:<stream sequence>`` (messages.py): the key's record commits
in the same flush as the handler's writes, the reply leaves after that commit, and only then is
the JetStream message acknowledged. A crash anywhere before the ack makes JetStream redeliver it;
the redelivery finds the record and is acknowledged without running the handler again: exactly
once in effect.

**Order across a change of puller.** A puller stops before its partition is handed over (and
at once when it is lost), and naks the messages it holds, oldest first: the server redelivers
them ahead of new messages. A puller that died holds its messages until their ack wait runs
out, and new messages are handed out first meanwhile. So a new puller that finds messages
pending on the consumer takes messages without delivering any until all those are back in hand
(at once after a clean stop; within the ack wait after a crash), and queues each object's
messages in sequence order: an object's older message always runs before its newer ones. If
order is lost anyway (a puller cut off but still running past the ack wait), the object's guard
(messages.py) refuses the older message and it is parked, never run out of order.

**Failures.** A handler that raises is retried by the puller with exponential backoff (base
``DURABLE_SUBSCRIPTION_RETRY_BASE``, jittered, at most a minute), the other objects' messages
flowing meanwhile; after ``max_attempts`` (redeliveries count) the message is *parked*: published
to the dead-letter stream (core/dead_letters.py) with the reason, then acknowledged. A message
that can never be delivered (no object token in its subject, too large, out of order, an
interrupted handler) is parked at once. While the cluster cannot take the call (no owner, a
timeout) the puller retries without counting attempts: that is an outage, not a poison message.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from ..client import Client
from ..core import codec, dead_letters
from ..core.dead_letters import DeadLetters
from ..core.errors import ConfigError, DurableError
from ..core.ids import IdFactory
from ..core.settings import Settings
from ..core.streams import STREAM_EXISTS_DIFFERENTLY, put_stream
from ..core.subscription_config import StreamDecl, Subscription
from ..core.tasks import TaskSet
from ..core.wire import IDEMPOTENCY_HEADER, partition_of
from .messages import MESSAGE_VERB, Message, encode_message, message_key

log = logging.getLogger("durable.subscriptions")

#: messages one puller holds at most (fetched, not yet acknowledged)
IN_HAND = 512
#: messages asked for per fetch, and how long a fetch waits for the first one
FETCH_BATCH = 128
FETCH_WAIT = 1.0
#: the longest pause between two tries of a failing message
MAX_BACKOFF = 60.0
#: how often the supervisor checks which subscriptions this worker should pull
SUPERVISE_INTERVAL = 0.5
#: errors that say the call did not get through (retried without counting an attempt)
TRANSIENT = frozenset({"not_owner", "unavailable", "timeout", "storage_unavailable", "overloaded"})
#: errors that say the handler ran and failed (an attempt; retried, then parked)
FAILED = frozenset({"message_failed", "object_reset", "remote", "internal"})
#: JetStream: "stream name already in use with a different configuration"


def leader_partition(subscription: str, partitions: int) -> int:
    """The partition whose owner runs the subscription's puller."""
    return partition_of(subscription, partitions)


def backoff(attempt: int, base: float) -> float:
    """The pause after failed attempt ``attempt`` (1-based): base * 2^(attempt-1), +-20 %."""
    return float(min(MAX_BACKOFF, base * 2 ** min(attempt - 1, 16)) * random.uniform(0.8, 1.2))


def _sequence(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


class Park(Exception):
    """A message to park now, with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Puller:
    """The active puller of one subscription on this worker: fetch, queue per object, deliver."""

    def __init__(self, nc: NatsClient, client: Client, sub: Subscription, ids: IdFactory, settings: Settings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.client = client
        self.sub = sub
        self.ids = ids
        self.ack_wait = settings.subscription_ack_wait
        self.retry_base = settings.subscription_retry_base
        self.dlq = DeadLetters(settings.deployment_key)
        #: per object name, its messages in stream order (the first is being delivered)
        self.queues: dict[str, deque[Msg]] = {}
        #: every message held (fetched, not acknowledged), by stream sequence
        self.in_hand: dict[int, Msg] = {}
        self.room = asyncio.Event()
        #: objects whose messages are being delivered (a task each)
        self.draining: set[str] = set()
        #: taking back a previous puller's messages: queue, do not deliver yet (_recover)
        self.recovering = False
        self.tasks = TaskSet()
        #: counters (tests, logs)
        self.delivered = 0
        self.parked = 0

    async def run(self) -> None:
        """Pull until cancelled; a failure of the loop (NATS trouble) restarts it after a pause."""
        self.tasks.spawn(self._keep_alive(), f"subscription-{self.sub.name}-in-progress")
        while True:
            try:
                await self._pull()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS trouble: pull again shortly
                log.warning("subscription %s: pulling failed (%s: %s); retrying", self.sub.name,
                            type(exc).__name__, exc)
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        """Stop delivering; give back every held message, oldest first, for the next puller."""
        await self.tasks.cancel()
        for seq in sorted(self.in_hand):
            try:
                await self.in_hand[seq].nak()
            except Exception:  # noqa: BLE001 - not given back: redelivered after the ack wait
                break
        self.in_hand.clear()
        self.queues.clear()
        self.draining.clear()

    async def _recover(self, psub: JetStreamContext.PullSubscription) -> None:
        """Messages pending on the consumer were held by a previous puller. Given back (a clean
        stop naks them) they are redelivered at once, ahead of new messages; held by a puller that
        died, only once their ack wait runs out, and new messages come first meanwhile. So until
        every pending message is back in hand (or an ack wait has passed), messages are taken but
        not delivered: each object's queue is in sequence order when its delivery starts."""
        info = await self.js.consumer_info(self.sub.stream, self.sub.name)
        pending = info.num_ack_pending - len(self.in_hand)
        if pending <= 0:
            return
        log.info("subscription %s: %d messages pending from a previous puller; taking them back first",
                 self.sub.name, pending)
        self.recovering = True
        deadline = time.monotonic() + self.ack_wait + 2 * FETCH_WAIT
        back = 0
        try:
            while back < pending and time.monotonic() < deadline and len(self.in_hand) < IN_HAND:
                try:
                    msgs = await psub.fetch(min(IN_HAND - len(self.in_hand), FETCH_BATCH), timeout=FETCH_WAIT)
                except (TimeoutError, NatsTimeout):
                    continue
                for msg in msgs:
                    back += msg.metadata.num_delivered > 1
                    self._accept(msg)
        finally:
            self.recovering = False
        log.info("subscription %s: %d of %d pending messages back; delivering", self.sub.name, back, pending)
        for name in list(self.queues):
            self._start_drain(name)

    async def _pull(self) -> None:
        psub = await self.js.pull_subscribe_bind(self.sub.name, self.sub.stream)
        try:
            await self._recover(psub)
            while True:
                room = IN_HAND - len(self.in_hand)
                if room <= 0:
                    self.room.clear()
                    await self.room.wait()
                    continue
                try:
                    msgs = await psub.fetch(min(room, FETCH_BATCH), timeout=FETCH_WAIT)
                except (TimeoutError, NatsTimeout):
                    continue
                for msg in msgs:
                    self._accept(msg)
        finally:
            await psub.unsubscribe()

    def _accept(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq in self.in_hand:
            return  # a redelivery of one being delivered: that delivery acknowledges it
        self.in_hand[seq] = msg
        name = self.sub.object_name(msg.subject)
        if name is None:
            self.tasks.spawn(self._park_now(msg, f"the subject {msg.subject!r} has no token {self.sub.object_token} "
                                                 "to name the object by"), "subscription-park")
            return
        queue = self.queues.setdefault(name, deque())
        # in sequence order (a redelivery may be older than messages already queued), behind the
        # message being delivered, if any
        bisect.insort(queue, msg, lo=1 if name in self.draining and queue else 0, key=_sequence)
        if not self.recovering:
            self._start_drain(name)

    def _start_drain(self, name: str) -> None:
        if name not in self.draining:
            self.draining.add(name)
            self.tasks.spawn(self._drain(name), f"subscription-{self.sub.name}-object")

    async def _drain(self, name: str) -> None:
        """Deliver one object's messages in order, one at a time."""
        queue = self.queues[name]
        try:
            while queue:
                msg = queue[0]
                await self._deliver(name, msg)
                queue.popleft()
                self._release(msg)
            del self.queues[name]
        finally:
            self.draining.discard(name)

    def _release(self, msg: Msg) -> None:
        self.in_hand.pop(msg.metadata.sequence.stream, None)
        self.room.set()

    async def _park_now(self, msg: Msg, reason: str) -> None:
        try:
            await self._park(msg, reason, msg.metadata.num_delivered)
        finally:
            self._release(msg)

    async def _deliver(self, name: str, msg: Msg) -> None:
        """Call the object until it took the message (then ack) or the message is parked."""
        meta = msg.metadata
        seq = meta.sequence.stream
        attempt = max(1, meta.num_delivered)  # redeliveries (a puller died) count as attempts
        outages = 0
        while True:
            try:
                await self._call(name, msg, seq, attempt)
            except Park as park:
                await self._park(msg, park.reason, attempt)
                return
            except _Transient as exc:
                outages += 1
                if outages in (1, 10) or outages % 100 == 0:
                    log.warning("subscription %s: message %d for %r not delivered yet (%s); retrying",
                                self.sub.name, seq, name, exc)
                await asyncio.sleep(backoff(min(outages, 6), 0.5))
                continue
            except _Failed as exc:
                if attempt >= self.sub.max_attempts:
                    await self._park(msg, f"{exc} (after {attempt} attempts)", attempt)
                    return
                log.info("subscription %s: message %d for %r failed attempt %d of %d: %s", self.sub.name, seq,
                         name, attempt, self.sub.max_attempts, exc)
                await asyncio.sleep(backoff(attempt, self.retry_base))
                attempt += 1
                continue
            await self._ack(msg)
            self.delivered += 1
            return

    async def _call(self, name: str, msg: Msg, seq: int, attempt: int) -> None:
        try:
            object_id = self.ids.from_name(name)
        except DurableError as exc:
            raise Park(f"{type(exc).__name__}: {exc.message}") from None
        message = Message(self.sub.name, msg.subject, msg.data, dict(msg.headers or {}), seq, attempt)
        payload = codec.pack(encode_message(message, self.sub.handler, name))
        subject = self.client.subject_base(self.sub.namespace, object_id.hex) + f"{MESSAGE_VERB}.{self.sub.name}"
        try:
            await self.client.request(subject, payload, {IDEMPOTENCY_HEADER: message_key(self.sub.name, seq)})
        except DurableError as exc:
            text = f"{exc.remote_type}: {exc.message}" if exc.code in FAILED else f"{exc.code}: {exc.message}"
            if exc.code in TRANSIENT:
                raise _Transient(text) from None
            if exc.code in FAILED:
                raise _Failed(exc.message if exc.code == "message_failed" else text) from None
            raise Park(text) from None
        except Exception as exc:  # noqa: BLE001 - a NATS connection problem: the call did not get through
            raise _Transient(f"{type(exc).__name__}: {exc}") from None

    async def _ack(self, msg: Msg) -> None:
        """Acknowledge; not waiting for the server's answer: a lost ack is a redelivery, which the
        recorded key answers without running the handler."""
        try:
            await msg.ack()
        except Exception as exc:  # noqa: BLE001 - redelivered after the ack wait, then acked
            log.warning("subscription %s: ack of %d failed: %s", self.sub.name, msg.metadata.sequence.stream, exc)

    async def _park(self, msg: Msg, reason: str, attempts: int) -> None:
        """Publish the message to the dead-letter subject with why, then acknowledge it. The park
        carries a message id, so a puller that dies between the two parks it only once."""
        seq = msg.metadata.sequence.stream
        headers = dict(msg.headers or {})
        original_id = headers.pop(dead_letters.MSG_ID_HEADER, None)
        headers.update({
            dead_letters.SUBSCRIPTION_HEADER: self.sub.name,
            dead_letters.ORIGINAL_SUBJECT_HEADER: msg.subject,
            dead_letters.ORIGINAL_STREAM_HEADER: self.sub.stream,
            dead_letters.ORIGINAL_SEQUENCE_HEADER: str(seq),
            dead_letters.REASON_HEADER: dead_letters.one_line(reason),
            dead_letters.ATTEMPTS_HEADER: str(attempts),
            dead_letters.PARKED_AT_HEADER: str(int(time.time() * 1000)),
            dead_letters.MSG_ID_HEADER: f"{self.sub.stream}:{self.sub.name}:{seq}",
        })
        if original_id is not None:
            headers[dead_letters.ORIGINAL_MSG_ID_HEADER] = original_id
        tries = 0
        while True:
            try:
                await self.js.publish(self.dlq.subject(self.sub.name), msg.data, headers=headers)
                break
            except Exception as exc:  # noqa: BLE001 - keep the message until it is parked
                tries += 1
                log.warning("subscription %s: parking message %d failed (%s: %s); retrying", self.sub.name, seq,
                            type(exc).__name__, exc)
                await asyncio.sleep(backoff(min(tries, 6), 0.5))
        await self._ack(msg)
        self.parked += 1
        log.warning("subscription %s: message %d (%s) parked after %d attempts: %s", self.sub.name, seq,
                    msg.subject, attempts, reason)

    async def _keep_alive(self) -> None:
        """Held messages are not redelivered while their puller lives: tell the server so,
        well within the ack wait (also for messages waiting behind their object's earlier ones)."""
        while True:
            await asyncio.sleep(max(0.2, self.ack_wait / 3))
            for msg in list(self.in_hand.values()):
                try:
                    await msg.in_progress()
                except Exception:  # noqa: BLE001 - the connection is down: redelivery will tell
                    break


class _Transient(Exception):
    """The call did not reach a live owner; retried without counting an attempt."""


class _Failed(Exception):
    """The handler ran and raised; an attempt."""


class Subscriptions:
    """The worker's part: the consumers and the dead-letter stream at start, and a puller for each
    subscription whose leader partition this worker owns."""

    def __init__(self, nc: NatsClient, client: Client, subscriptions: tuple[Subscription, ...],
                 ids: dict[str, IdFactory], settings: Settings, owned: Callable[[], Any],
                 streams: tuple[StreamDecl, ...] = ()) -> None:
        self.config_path = client.config.path if client.config is not None else settings.config_file
        self.nc = nc
        self.js = nc.jetstream()
        self.client = client
        self.subscriptions = subscriptions
        self.streams = streams
        self.ids = ids
        self.settings = settings
        self.owned = owned
        self.pullers: dict[str, tuple[Puller, asyncio.Task[None]]] = {}
        self.tasks = TaskSet()

    async def check(self) -> None:
        """Start-up: every stream exists and takes its consumer (a ConfigError otherwise), and the
        dead-letter stream exists. Streams are the app's (retention, replicas, subjects): a missing
        one is an error, not created with guessed settings, unless ``[[streams]]`` declares it."""
        for decl in self.streams:
            await self._ensure_stream(decl)
        if not self.subscriptions:
            return
        for sub in self.subscriptions:
            await self._ensure_consumer(sub)
        await self._ensure_dead_letters()

    def start(self) -> None:
        """Pull the subscriptions whose leader partition this worker owns, from now on."""
        if self.subscriptions:
            self.tasks.spawn(self._supervise(), "subscriptions")

    async def stop(self) -> None:
        await self.tasks.cancel()
        for name in list(self.pullers):
            await self._stop_puller(name)

    async def _ensure_stream(self, decl: StreamDecl) -> None:
        """Create a declared stream that does not exist; one that does is the app's, left alone."""
        try:
            await self.js.stream_info(decl.name)
            return
        except NotFoundError:
            pass
        try:
            await self.js.add_stream(StreamConfig(
                name=decl.name, subjects=list(decl.subjects), retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE, num_replicas=decl.replicas, max_age=decl.max_age or None,
                description="durable: declared in durable.toml [[streams]]"))
        except BadRequestError as exc:
            if exc.err_code == STREAM_EXISTS_DIFFERENTLY:
                return  # another worker created it meanwhile
            raise ConfigError(f"{self.config_path}: stream {decl.name!r}: JetStream refused to create it: "
                              f"{exc.description}") from None
        log.info("created stream %s (subjects %s)", decl.name, ", ".join(decl.subjects))

    async def _ensure_dead_letters(self) -> None:
        dlq = DeadLetters(self.settings.deployment_key)
        config = StreamConfig(name=dlq.stream, subjects=[dlq.subjects], retention=RetentionPolicy.LIMITS,
                              storage=StorageType.FILE, num_replicas=self.settings.dlq_replicas,
                              duplicate_window=120.0,
                              description="durable: parked stream messages, one subject per subscription")
        await put_stream(self.js, config)

    async def _ensure_consumer(self, sub: Subscription) -> None:
        where = f"{self.config_path}: subscription {sub.name!r}"
        try:
            await self.js.stream_info(sub.stream)
        except NotFoundError:
            raise ConfigError(f"{where}: stream {sub.stream!r} does not exist; create it first (the app owns its "
                              f"retention and replicas), e.g. `nats stream add {sub.stream} --subjects "
                              f"'{sub.subject}'`") from None
        try:
            await self.js.add_consumer(sub.stream, ConsumerConfig(
                durable_name=sub.name, filter_subject=sub.subject, ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL, ack_wait=self.settings.subscription_ack_wait,
                max_deliver=-1, max_ack_pending=IN_HAND * 2,
                description=f"durable: stream {sub.stream} into {sub.binding} objects",
            ))
        except BadRequestError as exc:
            raise ConfigError(f"{where}: JetStream refused its consumer on stream {sub.stream!r}: "
                              f"{exc.description}") from None

    async def leaving(self, partition: int) -> None:
        """``partition`` is being handed over: stop its pullers (held messages go back) before it is
        released, so the next owner's puller never overlaps this one."""
        for sub in self._led_by(partition):
            await self._stop_puller(sub.name)

    def lost(self, partition: int) -> None:
        """``partition`` was lost (lease, fencing): stop its pullers' deliveries at once; their
        held messages are given back (or redelivered after the ack wait) in the background."""
        for sub in self._led_by(partition):
            puller, task = self.pullers.pop(sub.name)
            task.cancel()
            for t in puller.tasks:
                t.cancel()
            self.tasks.spawn(self._stop(sub.name, puller, task), "subscription-stop")

    def _led_by(self, partition: int) -> list[Subscription]:
        return [s for s in self.subscriptions if s.name in self.pullers
                and leader_partition(s.name, self.settings.partitions) == partition]

    async def _supervise(self) -> None:
        while True:
            try:
                owned = set(self.owned())
                for sub in self.subscriptions:
                    leads = leader_partition(sub.name, self.settings.partitions) in owned
                    if leads and sub.name not in self.pullers:
                        self._start_puller(sub)
                    elif not leads and sub.name in self.pullers:
                        await self._stop_puller(sub.name)
            except Exception as exc:  # noqa: BLE001 - checked again next round
                log.warning("subscriptions: supervision failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(SUPERVISE_INTERVAL)

    def _start_puller(self, sub: Subscription) -> None:
        puller = Puller(self.nc, self.client, sub, self.ids[sub.namespace], self.settings)
        self.pullers[sub.name] = (puller, asyncio.get_running_loop().create_task(puller.run()))
        log.info("subscription %s: pulling %s (%s) into %s", sub.name, sub.stream, sub.subject, sub.binding)

    async def _stop_puller(self, name: str) -> None:
        entry = self.pullers.pop(name, None)
        if entry is not None:
            await self._stop(name, *entry)

    @staticmethod
    async def _stop(name: str, puller: Puller, task: asyncio.Task[None]) -> None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping: its end is not news
            pass
        await puller.stop()
        log.info("subscription %s: stopped pulling here", name)
