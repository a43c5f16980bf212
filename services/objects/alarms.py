"""Alarms: one per object, Postgres the truth, a JetStream message schedule the wake-up.

``set_alarm`` is a storage write (a ``do_alarms`` row, committed with the event's other writes
and behind the output gate). Once it commits, the worker publishes the object's schedule
(alarm_stream.py); at the due time a fire reaches one worker of the queue group, which runs the
alarm if it owns the object's partition and forwards it to the owner otherwise.

Every row carries a random *generation*: a fire runs the alarm only if the row still has the
generation the fire was published for, so a fire for an alarm changed or deleted meanwhile is
acknowledged and ignored, and duplicates (at-least-once) run nothing twice. JetStream may lose a
recent write (its fsync is lazy by default) and a publish can fail after the commit, so an owner
also *reconciles* with Postgres on taking a partition (re-publishing what is due soon, running
what is overdue) and every ``alarm_sweep_interval``: a lost wake-up makes an alarm late, never
lost. The rules (retries, times) are in alarm_rules.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind

from ..client import Client
from ..core import telemetry
from ..core.errors import DurableError, ObjectReset, RequestTimeout
from ..core.metrics import LATE_AFTER, Histograms
from ..core.settings import Settings
from ..core.tasks import TaskSet
from ..core.wire import AlarmFire, alarm_wakeup, parse_alarm_fire
from .alarm_reads import AlarmRowReader
from .alarm_rules import AlarmRow, RunOutcome, after_failure, now_ms
from .alarm_stream import AlarmStream
from .alarm_timers import LocalTimers
from .base import AlarmInfo
from .flusher import CommittedAlarm
from .instance import Instance
from .partitions import Partitions, PartitionState
from .sql import ObjectStore
from .tail import Tail

log = logging.getLogger("durable.alarms")

#: on taking a partition, schedules of alarms due within this many seconds are re-published
REPUBLISH_HORIZON_MS = 60_000
#: at most this many overdue alarms are started by one reconciliation (the next takes the rest)
RECONCILE_BATCH = 10_000
#: a wake-up that found the object busy or unreachable comes back after this long
REDELIVER_DELAY = 1.0


async def run_alarm(inst: Instance, obj: Any, generation: int, retry_base: float,
                    starting: Callable[[AlarmRow], None] | None = None) -> RunOutcome:
    """The alarm event, under the object's input gate: run ``alarm(info)`` if the stored alarm
    still has ``generation``; then clear it, or on failure record what alarm_rules decides."""
    alarm = inst.storage.alarm
    row = await alarm.load()
    if row is None or row.generation != generation:
        return RunOutcome.STALE
    if alarm.running:
        return RunOutcome.BUSY
    handler = getattr(obj, "alarm", None)
    name = f"{inst.cls.__name__} {inst.object_id}"
    ctx = {"namespace": inst.namespace, "object_id": inst.object_id, "partition": inst.partition,
           "epoch": inst.epoch}
    if handler is None:
        log.warning("Attempted to run a scheduled alarm without a handler: %s has no alarm() method; "
                    "the alarm is dropped", name, extra=ctx)
        alarm.write(None)
        return RunOutcome.STALE
    if starting is not None:
        starting(row)
    alarm.begin_handler()
    try:
        await handler(AlarmInfo(row.scheduled_ms, row.retry_count))
    except Exception as exc:  # noqa: BLE001 - the object's failure: retried by policy
        touched = alarm.end_handler()
        reset = inst.storage.closed is not None
        decision = after_failure(row, touched, reset, retry_base, now_ms())
        what = f"{type(exc).__name__}: {exc}"
        if reset:
            log.warning("alarm of %s reset the object (%s); it stays due", name, what, extra=ctx)
        elif decision.action == "keep":  # a new alarm set (or deleted) by the failed run replaces the retry
            log.warning("alarm of %s failed (%s); not retried: it changed its alarm", name, what, extra=ctx)
        elif decision.action == "abandon":
            log.warning("alarm of %s failed %d times; abandoned: %s", name, row.retry_count + 1, what,
                        extra=ctx)
            alarm.write(None)
            return RunOutcome.ABANDONED
        else:
            log.warning("alarm of %s failed (%s); retry %d in %.1f s", name, what, row.retry_count + 1,
                        decision.delay, extra=ctx)
            alarm.write(decision.row)
        return RunOutcome.FAILED
    except BaseException:
        alarm.end_handler()
        raise
    if not alarm.end_handler():
        alarm.write(None)
    return RunOutcome.RAN


class Alarms:
    """The alarms of one worker's partitions: wake-ups in, alarm events run, schedules out."""

    def __init__(self, nc: NatsClient, settings: Settings, partitions: Partitions, store: ObjectStore,
                 client: Client, tail: Tail | None = None) -> None:
        self.nc = nc
        #: live events for `durable tail`
        self.tail = tail
        self.settings = settings
        self.partitions = partitions
        self.store = store
        self.client = client
        self.stream = AlarmStream(nc, settings)
        #: the rows wake-ups check first, read together for the fires that arrive together
        self.rows = AlarmRowReader(store)
        #: the owner's own timers: alarms fire on time without waiting for their JetStream schedule
        self.timers = LocalTimers(self._timer_due, partitions.is_current)
        self.stream_ready = False
        self.tasks = TaskSet()
        self._sweeper: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None
        #: schedules to publish, in commit order: a later set_alarm must replace an earlier one
        self._outbox: collections.deque[CommittedAlarm] = collections.deque()
        self._outbox_ready = asyncio.Event()
        #: set while nothing waits to be published
        self._published = asyncio.Event()
        self._published.set()
        self.fired = 0
        self.abandoned = 0
        #: handler runs that raised (a retry is recorded unless it changed its alarm), runs that
        #: were retries, and runs that started over LATE_AFTER seconds after their due time
        self.failed = 0
        self.retried = 0
        self.late = 0
        #: the lateness histogram (metrics.py), when the worker keeps metrics
        self.lateness: Histograms | None = None

    async def start(self) -> None:
        try:
            await self._consume()
        except Exception as exc:  # noqa: BLE001 - e.g. a cluster without a meta leader yet: the sweeper retries
            log.warning("could not set up the alarm stream yet (%s: %s); retrying", type(exc).__name__, exc)
        self.timers.start()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="alarm-sweeper")
        self._publisher = asyncio.create_task(self._publish_loop(), name="alarm-publisher")

    async def withdraw(self) -> None:
        """Take no more fires (the other workers of the queue group get them), and fire no timers."""
        await self.timers.stop()
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - the connection may be gone: the server drops it then
                log.debug("could not unsubscribe from alarm fires: %s", exc)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop sweeping; give schedule publishes of committed alarms a moment to finish."""
        await self.withdraw()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._published.wait(), grace)
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
        await self.tasks.close(grace)
        await self.rows.close()

    # ----- schedules out ------------------------------------------------------------------

    def committed(self, items: list[CommittedAlarm]) -> None:
        """Alarm rows just committed: arm their timers here, and publish their wake-ups (a failure
        leaves them to the sweep)."""
        for partition, object_id, namespace, row in items:
            state = self.partitions.serving(partition)
            if state is not None:
                self.timers.arm(state, object_id, namespace, row.generation, row.due_ms)
        self._outbox.extend(items)
        self._published.clear()
        self._outbox_ready.set()

    async def _publish_loop(self) -> None:
        """One publisher, in commit order, so a schedule never replaces a newer one."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                items = [self._outbox.popleft() for _ in range(min(len(self._outbox), 1000))]
                try:
                    await self.stream.publish(items)
                except Exception as exc:  # noqa: BLE001 - Postgres has the alarms; the sweep runs them late
                    log.warning("could not publish %d alarm schedule(s) (%s: %s); the sweep will run them",
                                len(items), type(exc).__name__, exc)
            self._published.set()

    async def _consume(self) -> None:
        """Create the stream and the fires consumer; join the workers' queue group on it."""
        await self.stream.ensure_stream()
        await self.stream.ensure_consumer()
        if self._sub is None:
            self._sub = await self.nc.subscribe(
                self.stream.deliver_subject, queue=AlarmStream.CONSUMER, cb=self._on_fire,
                pending_msgs_limit=500_000, pending_bytes_limit=256 * 1024 * 1024)
        self.stream_ready = True

    # ----- partitions ---------------------------------------------------------------------

    def attach(self, state: PartitionState) -> None:
        """A partition was acquired: re-arm the schedules due soon, run what Postgres says is due."""
        self.tasks.spawn(self._attach(state), f"alarm-attach-{state.partition}")

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
        try:
            fire = parse_alarm_fire(msg.subject, msg.data)
        except ValueError as exc:  # not ours to run: drop it for good
            log.warning("dropping %s", exc)
            self.tasks.spawn(_ack(msg), "alarm-ack")
            return
        state = self.partitions.serving(fire.partition)
        if state is not None:
            self.fire(state, fire.object_id, fire.namespace, fire.generation, msg)
        else:
            self.tasks.spawn(self._forward(fire, msg), "alarm-forward")

    async def _instance(self, state: PartitionState, object_id: str, namespace: str,
                        generation: int) -> Instance | None:
        """The object to run the alarm in, or None for a stale wake-up: an object not live is not
        built (its constructor run) for a wake-up whose alarm is gone or changed."""
        if object_id in state.instances:
            return self.partitions.instance(state, namespace, object_id)
        row = await self.rows.read(object_id)
        if row is None or row.generation != generation:
            return None
        inst = self.partitions.instance(state, namespace, object_id)
        inst.storage.alarm.prime(row)  # read just now: the alarm event need not read it again
        return inst

    async def _forward(self, fire: AlarmFire, msg: Msg) -> None:
        namespace, object_id = fire.namespace, fire.object_id
        try:
            row = await self.rows.read(object_id)  # without building the object anywhere
            if row is None or row.generation != fire.generation:
                await _ack(msg)
                return
            value = await self.client.call(namespace, object_id, "alarm", alarm_wakeup(fire.generation))
        except DurableError as exc:
            if exc.retryable or isinstance(exc, ObjectReset | RequestTimeout):  # runs are idempotent
                log.info("alarm wake-up of %s/%s not delivered now (%s); redelivered", namespace, object_id, exc)
                await _nak(msg, REDELIVER_DELAY)
            else:  # e.g. its class is no longer bound: nobody can ever run it
                log.warning("dropping the alarm wake-up of %s/%s: %s", namespace, object_id, exc)
                await _ack(msg)
            return
        except Exception as exc:  # noqa: BLE001 - NATS trouble: redelivered after the ack wait
            log.info("alarm wake-up of %s/%s not delivered now (%s)", namespace, object_id, exc)
            return
        if value == RunOutcome.BUSY.value:
            await _nak(msg, REDELIVER_DELAY)
        else:
            await _ack(msg)

    def alarm_event(self, inst: Instance, generation: int) -> Callable[[Any], Awaitable[RunOutcome]]:
        """The alarm event of ``inst`` for the wake-up of ``generation`` (counted here)."""
        retry_base = self.settings.alarm_retry_base

        async def event(obj: Any) -> RunOutcome:
            outcome = await run_alarm(inst, obj, generation, retry_base, self._starting)
            if outcome is RunOutcome.RAN:
                self.fired += 1
            elif outcome is RunOutcome.ABANDONED:
                self.abandoned += 1
                self.failed += 1
            elif outcome is RunOutcome.FAILED:
                self.failed += 1
            if self.tail is not None and self.tail.active:
                self.tail.emit("alarm", inst.namespace, inst.object_id, outcome=outcome.value)
            return outcome

        return event

    def _starting(self, row: AlarmRow) -> None:
        """An alarm handler is about to run: count it and how late it is."""
        late = max(0.0, (now_ms() - row.due_ms) / 1000)
        if late > LATE_AFTER:
            self.late += 1
        if row.retry_count:
            self.retried += 1
        if self.lateness is not None:
            self.lateness.observe(late)

    async def run_event(self, inst: Instance, generation: int) -> tuple[bool, Any, int]:
        """Run ``inst``'s alarm of ``generation`` as an event (under its input gate).
        Returns run_event's (ok, outcome or error, write sequence)."""
        return await inst.run_event(self.alarm_event(inst, generation))

    def fire(self, state: PartitionState, object_id: str, namespace: str, generation: int,
             msg: Msg | None) -> None:
        """Run the alarm of ``object_id`` if its row still has ``generation`` (``msg``: the fire
        to acknowledge; None when a reconciliation found it overdue)."""
        if msg is None and not state.claim_overdue(object_id):
            return
        state.begin()
        self.tasks.spawn(self._fire(state, object_id, namespace, generation, msg), "alarm-fire")

    async def _fire(self, state: PartitionState, object_id: str, namespace: str, generation: int,
                    msg: Msg | None) -> None:
        ctx = {"namespace": namespace, "object_id": object_id, "partition": state.partition, "epoch": state.epoch}
        try:
            if not self.partitions.is_current(state):
                return  # not acknowledged: the next owner gets it (and its sweep finds it anyway)
            inst = await self._instance(state, object_id, namespace, generation)
            if inst is None:
                if msg is not None:
                    await _ack(msg)
                return
            if telemetry.tracing_enabled():
                with telemetry.tracer.start_as_current_span(
                    f"{namespace} alarm", kind=SpanKind.CONSUMER,
                    attributes={"do.partition": state.partition, "do.epoch": state.epoch,
                                "do.object_id": object_id, "do.namespace": namespace},
                ) as span:
                    ok, value, seq = await self.run_event(inst, generation)
                    inst.trace_flush(span, seq)
                    span.set_attribute("do.alarm.outcome", str(value) if ok else type(value).__name__)
            else:
                ok, value, seq = await self.run_event(inst, generation)
            if not ok:
                # the runtime failed (storage unreachable, object reset): nothing was recorded and
                # the alarm is still due; the handler's own failures are recorded as retries
                log.info("alarm of %s/%s not run now: %s", namespace, object_id, value, extra=ctx)
                if msg is not None:
                    await msg.nak(delay=REDELIVER_DELAY)
                return
            await inst.output.wait_durable(seq)
            if msg is not None:
                if value is RunOutcome.BUSY:
                    await msg.nak(delay=REDELIVER_DELAY)  # this object's alarm is running: look again shortly
                else:
                    await msg.ack()
        except DurableError as exc:
            if exc.retryable or isinstance(exc, ObjectReset | RequestTimeout):  # runs are idempotent
                log.info("alarm of %s/%s not run now (%s); it stays due", namespace, object_id, exc, extra=ctx)
            else:  # e.g. its class is no longer bound: nobody can ever run it
                log.warning("dropping the alarm wake-up of %s/%s: %s", namespace, object_id, exc, extra=ctx)
                if msg is not None:
                    await _ack(msg)
        except Exception as exc:  # noqa: BLE001 - a wake-up that fails is redelivered or swept
            log.warning("alarm of %s/%s could not run: %s: %s", namespace, object_id, type(exc).__name__, exc,
                        extra=ctx)
        finally:
            state.end()
            if msg is None:
                state.release_overdue(object_id)

    def _timer_due(self, state: PartitionState, object_id: str, namespace: str, generation: int) -> None:
        """A timer of ours came due: run the alarm as a reconciliation does (its JetStream fire,
        when it arrives, finds it gone and is acknowledged)."""
        self.fire(state, object_id, namespace, generation, None)

    async def run_now(self, state: PartitionState, namespace: str, object_id: str) -> RunOutcome | None:
        """Run the object's alarm now, whatever its time (tests: ``runDurableObjectAlarm``);
        None when it has no alarm. Raises what the event raised."""
        row = await self.store.read_alarm(object_id)
        if row is None:
            return None
        inst = self.partitions.instance(state, namespace, object_id)
        ok, value, seq = await self.run_event(inst, row.generation)
        if not ok:
            raise value if isinstance(value, BaseException) else RuntimeError(str(value))
        await inst.output.wait_durable(seq)
        return value if isinstance(value, RunOutcome) else None

    # ----- Postgres is the truth ------------------------------------------------------------

    async def _reconcile(self, states: list[PartitionState], republish: bool) -> None:
        """Run the alarms overdue in ``states``' partitions; with ``republish``, also re-publish
        the schedules of those due within the horizon (a failover or a lost JetStream write)."""
        now = now_ms()
        parts = [s.partition for s in states]
        interval_ms = int(self.settings.alarm_sweep_interval * 1000)
        overdue_before = now if republish else now - interval_ms
        # a sweep also arms the timers of what comes due before the next sweep but one (alarms
        # set under an earlier owner, or beyond the timers' horizon when they were set)
        horizon = now + REPUBLISH_HORIZON_MS if republish else now + 2 * interval_ms
        rows = await self.store.read_due_alarms(parts, horizon, RECONCILE_BATCH)
        by_partition = {s.partition: s for s in states}
        later: list[CommittedAlarm] = []
        for r in rows:
            state = by_partition[r["partition"]]
            if not self.partitions.is_current(state):
                continue
            if r["due_ms"] <= overdue_before:
                self.fire(state, r["object_id"], r["namespace"], r["generation"], None)
                continue
            if not republish:
                if r["due_ms"] > now:  # (overdue by less than a sweep: its timer or fire is on its way)
                    self.timers.arm(state, r["object_id"], r["namespace"], r["generation"], r["due_ms"])
                continue
            live = state.instances.get(r["object_id"])
            if live is not None and live.storage.alarm.changed_since(r["generation"]):
                continue  # set again after we read it: its own (newer) schedule is queued
            later.append((r["partition"], r["object_id"], r["namespace"], AlarmRow(0, r["due_ms"], r["generation"])))
        if later:
            self.committed(later)

    async def _sweep_loop(self) -> None:
        interval = self.settings.alarm_sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                if not self.stream_ready:
                    await self._consume()
                states = [s for s in self.partitions.states.values() if not s.closing]
                if states:
                    await self._reconcile(states, republish=False)
            except Exception as exc:  # noqa: BLE001 - the sweep must outlive any one failure
                log.warning("alarm sweep failed: %s: %s", type(exc).__name__, exc)


async def _nak(msg: Msg, delay: float) -> None:
    try:
        await msg.nak(delay=delay)
    except Exception as exc:  # noqa: BLE001 - unacknowledged: it comes back after the ack wait
        log.debug("could not nak an alarm wake-up: %s", exc)


async def _ack(msg: Msg) -> None:
    try:
        await msg.ack()
    except Exception as exc:  # noqa: BLE001 - unacknowledged: it comes back and is dropped again
        log.debug("could not ack an alarm wake-up: %s", exc)
