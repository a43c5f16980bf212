"""Alarms: one per object, Postgres the truth, a JetStream message schedule the wake-up.

``set_alarm`` is a storage write (a ``do_alarms`` row, committed with the event's other writes
and behind the output gate). Once it commits, the worker publishes a schedule on the object's
own subject ``dal.<key>.s.<partition>.<object>`` (``Nats-Schedule: @at <ms>``), so a new alarm
replaces the old one; at the due time the server puts the fire message on
``dal.<key>.f.<partition>.<object>`` in the same work-queue stream, where a durable consumer per
partition holds it until the partition's owner acknowledges it, across failovers.

Every row carries a random *generation*: a fire runs the alarm only if the row still has the
generation the fire was published for, so a fire for an alarm changed or deleted meanwhile is
acknowledged and ignored, and duplicates (at-least-once) run nothing twice. JetStream may lose a
recent write (its fsync is lazy by default) and a publish can fail after the commit, so an owner
also looks in Postgres on taking a partition (re-publishing what is due soon, running what is
overdue) and every ``alarm_sweep_interval``: a lost wake-up makes an alarm late, never lost.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from ..core import codec
from ..core.errors import ConfigError, DurableError, ObjectReset
from ..core.settings import Settings
from .base import AlarmInfo

if TYPE_CHECKING:
    from .host import PartitionState, Worker
    from .instance import Instance

log = logging.getLogger("durable.alarms")

#: Cloudflare: at most 6 retries of a failing alarm, then it is abandoned.
MAX_RETRIES = 6
#: Cloudflare adds up to 25 % of the delay as jitter.
RETRY_JITTER = 0.25
#: message schedules (ADR-51 ``@at``) arrived in nats-server 2.12
SCHEDULES_SINCE = (2, 12)
#: a fire is redelivered if not acknowledged in this long (the owner died holding it)
ACK_WAIT = 30.0
#: on taking a partition, schedules of alarms due within this many seconds are re-published
REPUBLISH_HORIZON_MS = 60_000
#: at most this many overdue alarms are started by one sweep (the next sweep takes the rest)
SWEEP_BATCH = 10_000

_READ_DUE = (
    "SELECT object_id, namespace, partition, due_ms, generation FROM do_alarms "
    "WHERE partition = ANY($1::int[]) AND due_ms <= $2 ORDER BY due_ms LIMIT $3"
)


@dataclass(frozen=True, slots=True)
class AlarmRow:
    """One object's alarm as stored in ``do_alarms``."""

    scheduled_ms: int  #: the time the object set (what get_alarm() and info.scheduled_time report)
    due_ms: int  #: when it next runs: scheduled_ms, or the time of the next retry
    generation: int  #: names this set_alarm (or retry); a fire for another generation is stale
    retry_count: int = 0


def now_ms() -> int:
    return int(time.time() * 1000)


def new_generation() -> int:
    return secrets.randbits(62) + 1


def alarm_time_ms(when: Any) -> int:
    """Epoch milliseconds of a ``set_alarm`` argument: an aware datetime or a number of ms."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise TypeError("set_alarm() needs a timezone-aware datetime (e.g. datetime.now(UTC) + ...); "
                            "a naive one is ambiguous")
        ms = int(when.timestamp() * 1000)
    elif isinstance(when, int | float) and not isinstance(when, bool):
        if when != when or when in (float("inf"), float("-inf")):
            raise TypeError(f"set_alarm() needs a finite time, not {when!r}")
        ms = int(when)
    else:
        raise TypeError(f"set_alarm() takes a datetime or epoch milliseconds, not {type(when).__name__}")
    if ms <= 0:
        raise TypeError("set_alarm() cannot be called with an alarm time <= 0")
    return ms


def retry_delay(retry_count: int, base: float) -> float:
    """Seconds before retry number ``retry_count + 1``: base * 2**n plus up to 25 % jitter."""
    delay = base * (2 ** min(retry_count, 9))
    return delay * (1 + random.uniform(0, RETRY_JITTER))


def at_header(ms: int) -> str:
    """``Nats-Schedule`` value for a one-shot at ``ms``: RFC 3339, UTC, with milliseconds."""
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return "@at " + stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def schedule_support_problem(version: str, jetstream: bool) -> str | None:
    """Why a nats-server of ``version`` (with or without JetStream) cannot run alarms, or None."""
    try:
        major, minor = (int(part) for part in version.split("-")[0].split(".")[:2])
    except ValueError:
        return f"the NATS server reports version {version!r}, which is not a version number"
    if (major, minor) < SCHEDULES_SINCE:
        return (f"the NATS server is version {version}; durable's alarms need message schedules, which "
                f"need nats-server {SCHEDULES_SINCE[0]}.{SCHEDULES_SINCE[1]} or later")
    if not jetstream:
        return (f"the NATS server (version {version}) runs without JetStream; durable's alarms need it: "
                "start nats-server with -js (or a jetstream {} block in its config)")
    return None


def check_server(nc: nats.NATS) -> None:
    """Alarms need message schedules: nats-server 2.12 or later with JetStream enabled."""
    info = nc._server_info
    problem = schedule_support_problem(str(info.get("version", "?")), bool(info.get("jetstream")))
    if problem is not None:
        raise ConfigError(problem)


class AlarmStream:
    """The JetStream side: one work-queue stream of schedules and fires, a consumer per partition."""

    def __init__(self, nc: nats.NATS, settings: Settings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        key = settings.deployment_key
        self.prefix = f"dal.{key}"
        self.name = f"DURABLE_ALARMS_{key}"

    def schedule_subject(self, partition: int, object_id: str) -> str:
        return f"{self.prefix}.s.{partition}.{object_id}"

    def fire_subject(self, partition: int, object_id: str) -> str:
        return f"{self.prefix}.f.{partition}.{object_id}"

    @property
    def deliver_subject(self) -> str:
        return f"{self.prefix}.d"

    #: one durable consumer for every fire, delivered to the workers as a queue group
    CONSUMER = "fires"

    async def ensure_stream(self) -> None:
        config = StreamConfig(
            name=self.name, subjects=[f"{self.prefix}.s.>", f"{self.prefix}.f.>"],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            num_replicas=self.settings.alarm_replicas, allow_msg_schedules=True,
            description="durable alarms: a schedule per object (s), fired wake-ups (f)",
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != 10058:  # "stream name already in use with a different configuration"
                raise
            await self.js.update_stream(config)

    async def ensure_consumer(self) -> None:
        """One durable push consumer on the fire subjects (never on the schedule subjects, whose
        acknowledgement would delete, that is cancel, the schedules of a work queue), delivered
        to a queue group of every worker. Measured: nats-server delivers a burst of fires 3-4x
        slower through one consumer per partition (256) than through one consumer."""
        try:  # an earlier layout had a consumer per partition; their filters would overlap this one
            for info in await self.js.consumers_info(self.name):
                if info.name.startswith("fire-"):
                    await self.js.delete_consumer(self.name, info.name)
        except Exception as exc:  # noqa: BLE001 - nothing to clean up, or add_consumer says why below
            log.debug("could not list alarm consumers: %s", exc)
        await self.js.add_consumer(self.name, ConsumerConfig(
            durable_name=self.CONSUMER, deliver_subject=self.deliver_subject, deliver_group=self.CONSUMER,
            filter_subject=f"{self.prefix}.f.>", ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=ACK_WAIT, max_ack_pending=100_000,
        ))

    async def publish(self, items: list[tuple[int, str, str, AlarmRow]]) -> None:
        """Publish (replace) the schedules of ``(partition, object id, namespace, row)``."""
        futures = []
        for partition, object_id, namespace, row in items:
            futures.append(await self.js.publish_async(
                self.schedule_subject(partition, object_id),
                codec.dumps({"ns": namespace, "gen": row.generation}, False),
                headers={"Nats-Schedule": at_header(row.due_ms),
                         "Nats-Schedule-Target": self.fire_subject(partition, object_id)},
            ))
        if futures:
            await asyncio.gather(*futures)


class Alarms:
    """The alarms of one worker's partitions: wake-ups in, alarm events run, schedules out."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.stream: AlarmStream
        self.stream_ready = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None
        #: schedules to publish, in commit order: a later set_alarm must replace an earlier one
        self._outbox: collections.deque[tuple[int, str, str, AlarmRow]] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._publishing = False
        self.fired = 0
        self.abandoned = 0

    async def start(self) -> None:
        self.stream = AlarmStream(self.worker.nc, self.worker.settings)
        try:
            await self._consume()
        except Exception as exc:  # noqa: BLE001 - e.g. a cluster without a meta leader yet: the sweeper retries
            log.warning("could not set up the alarm stream yet (%s: %s); retrying", type(exc).__name__, exc)
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="alarm-sweeper")
        self._publisher = asyncio.create_task(self._publish_loop(), name="alarm-publisher")

    async def withdraw(self) -> None:
        """Take no more fires (the other workers of the queue group get them)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may be gone: the server drops it then
                pass

    async def stop(self, grace: float = 2.0) -> None:
        """Stop sweeping; give schedule publishes of committed alarms a moment to finish."""
        await self.withdraw()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        deadline = time.monotonic() + grace
        while (self._outbox or self._publishing) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- schedules out ------------------------------------------------------------------

    def committed(self, items: list[tuple[int, str, str, AlarmRow]]) -> None:
        """Alarm rows just committed: publish their wake-ups (a failure leaves them to the sweep)."""
        self._outbox.extend(items)
        self._outbox_ready.set()

    async def _publish_loop(self) -> None:
        """One publisher, in commit order, so a schedule never replaces a newer one."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                items = [self._outbox.popleft() for _ in range(min(len(self._outbox), 1000))]
                self._publishing = True
                try:
                    await self.stream.publish(items)
                except Exception as exc:  # noqa: BLE001 - Postgres has the alarms; the sweep runs them late
                    log.warning("could not publish %d alarm schedule(s) (%s: %s); the sweep will run them",
                                len(items), type(exc).__name__, exc)
                finally:
                    self._publishing = False

    async def _consume(self) -> None:
        """Create the stream and the fires consumer; join the workers' queue group on it."""
        await self.stream.ensure_stream()
        await self.stream.ensure_consumer()
        if self._sub is None:
            self._sub = await self.worker.nc.subscribe(
                self.stream.deliver_subject, queue=AlarmStream.CONSUMER, cb=self._on_fire,
                pending_msgs_limit=500_000, pending_bytes_limit=256 * 1024 * 1024)
        self.stream_ready = True

    # ----- partitions ---------------------------------------------------------------------

    def attach(self, state: PartitionState) -> None:
        """A partition was acquired: re-arm the schedules due soon, run what Postgres says is due."""
        self._spawn(self._attach(state), f"alarm-attach-{state.partition}")

    async def _attach(self, state: PartitionState) -> None:
        try:
            await self._reconcile([state], republish=True)
        except Exception as exc:  # noqa: BLE001 - the sweep runs what is overdue anyway
            log.warning("could not reconcile the alarms of partition %d: %s: %s", state.partition,
                        type(exc).__name__, exc)

    # ----- wake-ups in --------------------------------------------------------------------

    async def _on_fire(self, msg: Msg) -> None:
        """A fire, delivered to one worker of the queue group: run it if this worker owns the
        object's partition, else forward it to the owner as an ordinary request (the request
        path routes to the owner and retries through hand-overs)."""
        tokens = msg.subject.split(".")
        try:
            body = codec.loads(msg.data, False)
            namespace, generation = body["ns"], body["gen"]
            if len(tokens) != 5 or not isinstance(namespace, str) or not isinstance(generation, int):
                raise ValueError("bad fields")
            partition = int(tokens[3])
        except Exception as exc:  # noqa: BLE001 - not ours to run: drop it for good
            log.warning("dropping malformed alarm wake-up on %s: %s", msg.subject, exc)
            self._spawn(_ack(msg), "alarm-ack")
            return
        state = self.worker.parts.get(partition)
        if state is not None and not state.closing:
            self.fire(state, tokens[4], namespace, generation, msg)
        else:
            self._spawn(self._forward(tokens[4], namespace, generation, msg), "alarm-forward")

    async def _instance(self, state: PartitionState, object_id: str, namespace: str,
                        generation: int) -> Instance | None:
        """The object to run the alarm in, or None for a stale wake-up: an object not live is not
        built (its constructor run) for a wake-up whose alarm is gone or changed."""
        if object_id in state.instances:
            return self.worker.instance_for(state, namespace, object_id)
        row = await self.worker.read_alarm(object_id)
        if row is None or row.generation != generation:
            return None
        inst = self.worker.instance_for(state, namespace, object_id)
        inst.storage.prime_alarm(row)  # read just now: the alarm event need not read it again
        return inst

    async def _forward(self, object_id: str, namespace: str, generation: int, msg: Msg) -> None:
        try:
            row = await self.worker.read_alarm(object_id)  # without building the object anywhere
            if row is None or row.generation != generation:
                await _ack(msg)
                return
            value = await self.worker.client.call(namespace, object_id, "alarm",
                                                      codec.dumps({"gen": generation}, False))
        except DurableError as exc:
            if exc.retryable or isinstance(exc, ObjectReset):
                log.info("alarm wake-up of %s/%s not delivered now (%s); redelivered", namespace, object_id, exc)
                await _nak(msg, 1.0)
            else:  # e.g. its class is no longer bound: nobody can ever run it
                log.warning("dropping the alarm wake-up of %s/%s: %s", namespace, object_id, exc)
                await _ack(msg)
            return
        except Exception as exc:  # noqa: BLE001 - NATS trouble: redelivered after the ack wait
            log.info("alarm wake-up of %s/%s not delivered now (%s)", namespace, object_id, exc)
            return
        if value == "busy":
            await _nak(msg, 1.0)
        else:
            await _ack(msg)

    def fire(self, state: PartitionState, object_id: str, namespace: str, generation: int,
             msg: Msg | None) -> None:
        """Run the alarm of ``object_id`` if its row still has ``generation``."""
        if msg is None:
            if object_id in state.alarm_sweeping:
                return
            state.alarm_sweeping.add(object_id)
        state.pending += 1
        self._spawn(self._fire(state, object_id, namespace, generation, msg), "alarm-fire")

    async def _fire(self, state: PartitionState, object_id: str, namespace: str, generation: int,
                    msg: Msg | None) -> None:
        try:
            if state.closing or self.worker.parts.get(state.partition) is not state:
                return  # not acknowledged: the next owner gets it (and its sweep finds it anyway)
            inst = await self._instance(state, object_id, namespace, generation)
            if inst is None:
                if msg is not None:
                    await _ack(msg)
                return
            ok, value, seq = await inst.run_event(lambda obj: run_alarm(inst, obj, generation))
            if not ok:
                # the runtime failed (storage unreachable, object reset): nothing was recorded and
                # the alarm is still due; the handler's own failures are recorded as retries
                log.info("alarm of %s/%s not run now: %s", namespace, object_id, value)
                if msg is not None:
                    await msg.nak(delay=1.0)
                return
            await inst.storage.wait_durable(seq)
            if msg is not None:
                if value == "busy":
                    await msg.nak(delay=1.0)  # this object's alarm is running: look again shortly
                else:
                    await msg.ack()
        except DurableError as exc:
            if exc.retryable or isinstance(exc, ObjectReset):
                log.info("alarm of %s/%s not run now (%s); it stays due", namespace, object_id, exc)
            else:  # e.g. its class is no longer bound: nobody can ever run it
                log.warning("dropping the alarm wake-up of %s/%s: %s", namespace, object_id, exc)
                if msg is not None:
                    await _ack(msg)
        except Exception as exc:  # noqa: BLE001 - a wake-up that fails is redelivered or swept
            log.warning("alarm of %s/%s could not run: %s: %s", namespace, object_id, type(exc).__name__, exc)
        finally:
            state.pending -= 1
            if msg is None:
                state.alarm_sweeping.discard(object_id)

    # ----- Postgres is the truth ------------------------------------------------------------

    async def _reconcile(self, states: list[PartitionState], republish: bool) -> None:
        """Run the alarms overdue in ``states``' partitions; with ``republish``, also re-publish
        the schedules of those due within the horizon (a failover or a lost JetStream write)."""
        now = now_ms()
        parts = [s.partition for s in states]
        overdue_before = now if republish else now - int(self.worker.settings.alarm_sweep_interval * 1000)
        horizon = now + REPUBLISH_HORIZON_MS if republish else overdue_before
        async with self.worker.pool.acquire() as conn:
            rows = await conn.fetch(_READ_DUE, parts, horizon, SWEEP_BATCH)
        by_partition = {s.partition: s for s in states}
        later: list[tuple[int, str, str, AlarmRow]] = []
        for r in rows:
            state = by_partition[r["partition"]]
            if self.worker.parts.get(state.partition) is not state or state.closing:
                continue
            if r["due_ms"] <= overdue_before:
                self.fire(state, r["object_id"], r["namespace"], r["generation"], None)
                continue
            live = state.instances.get(r["object_id"])
            if live is not None and live.storage.alarm_changed_since(r["generation"]):
                continue  # set again after we read it: its own (newer) schedule is queued
            later.append((r["partition"], r["object_id"], r["namespace"], AlarmRow(0, r["due_ms"], r["generation"])))
        if later:
            self.committed(later)

    async def _sweep_loop(self) -> None:
        interval = self.worker.settings.alarm_sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                if not self.stream_ready:
                    await self._consume()
                states = [s for s in self.worker.parts.values() if not s.closing]
                if states:
                    await self._reconcile(states, republish=False)
            except Exception as exc:  # noqa: BLE001 - the sweep must outlive any one failure
                log.warning("alarm sweep failed: %s: %s", type(exc).__name__, exc)


async def _nak(msg: Msg, delay: float) -> None:
    try:
        await msg.nak(delay=delay)
    except Exception:  # noqa: BLE001 - unacknowledged: it comes back after the ack wait
        pass


async def _ack(msg: Msg) -> None:
    try:
        await msg.ack()
    except Exception:  # noqa: BLE001 - unacknowledged: it comes back and is dropped again
        pass


async def run_alarm(inst: Instance, obj: Any, generation: int) -> str:
    """The alarm event, under the object's input gate: run ``alarm(info)`` if the stored alarm
    still has ``generation``; then clear it, or on failure schedule a retry (Cloudflare's policy).
    Returns what happened: ``ran``, ``failed`` (the retry, if any, is recorded), ``stale``, ``busy``."""
    storage = inst.storage
    row = await storage.load_alarm()
    if row is None or row.generation != generation:
        return "stale"
    if storage.alarm_running:
        return "busy"
    handler = getattr(obj, "alarm", None)
    if handler is None:
        log.warning("Attempted to run a scheduled alarm without a handler: %s has no alarm() method; "
                    "the alarm of %s is dropped", inst.cls.__name__, inst.object_id)
        await storage.write_alarm(None)
        return "stale"
    storage.begin_alarm()
    try:
        await handler(AlarmInfo(row.scheduled_ms, row.retry_count))
    except Exception as exc:  # noqa: BLE001 - the object's failure: retried by policy
        touched = storage.end_alarm()
        name = f"{inst.cls.__name__} {inst.object_id}"
        if storage.closed is not None:
            log.warning("alarm of %s reset the object (%s); it stays due", name, exc)
        elif touched:  # a new alarm set (or deleted) by the failed run replaces the retry (Cloudflare)
            log.warning("alarm of %s failed (%s: %s); not retried: it changed its alarm", name,
                        type(exc).__name__, exc)
        elif row.retry_count >= MAX_RETRIES:
            log.warning("alarm of %s failed %d times; abandoned: %s: %s", name, row.retry_count + 1,
                        type(exc).__name__, exc)
            inst.host.alarms.abandoned += 1
            await storage.write_alarm(None)
        else:
            delay = retry_delay(row.retry_count, inst.host.settings.alarm_retry_base)
            log.warning("alarm of %s failed (%s: %s); retry %d in %.1f s", name, type(exc).__name__, exc,
                        row.retry_count + 1, delay)
            await storage.write_alarm(AlarmRow(row.scheduled_ms, now_ms() + int(delay * 1000),
                                               new_generation(), row.retry_count + 1))
        return "failed"
    except BaseException:
        storage.end_alarm()
        raise
    inst.host.alarms.fired += 1
    if not storage.end_alarm():
        await storage.write_alarm(None)
    return "ran"
