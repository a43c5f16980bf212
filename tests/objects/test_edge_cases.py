"""Regression tests for edge cases a review found in the gates, resets, eviction and shutdown.

Most of them hold a partition's ``do_partitions`` row ``FOR UPDATE`` from the test: every flush
of the worker starts with a ``FOR SHARE`` fence on that row, so its flush waits there for as long
as the test wants, and the test then fences it (bumps the epoch), fails it (terminates the
waiting backend) or lets it commit. The objects (``Edge``, ``Booter`` in tests/helpers/objects.py)
run in the test's own process and event loop, and are steered through ``Edge.event``/``Edge.notes``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from durable.client import Client, Env
from durable.client.namespace import Stub
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.errors import DurableError, ObjectReset, RequestTimeout
from durable.core.settings import Settings
from durable.core.wire import partition_of
from durable.objects import Worker
from durable.objects.instance import Instance
from nats.aio.subscription import Subscription

from tests.helpers.objects import Edge
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.timeout(120)

#: the worker's pool bounds a statement by the lease TTL: a flush the test holds up must not
#: run into that bound on a slow machine
PATIENT = {"lease_ttl": 8.0, "heartbeat_interval": 1.0}

_WAITING_ON_A_LOCK = ("FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
                      "AND pid <> pg_backend_pid()")


class PartitionRowLock:
    """Holds a partition's row of do_partitions FOR UPDATE, so the worker's flushes wait."""

    def __init__(self, settings: Settings, partition: int) -> None:
        self.settings = settings
        self.partition = partition
        self.conn: asyncpg.Connection
        self.watch: asyncpg.Connection  # pg_stat_activity is a snapshot per transaction: look from outside
        self.tr: Any = None

    async def __aenter__(self) -> PartitionRowLock:
        self.conn = await asyncpg.connect(self.settings.database_url)
        self.watch = await asyncpg.connect(self.settings.database_url)
        self.tr = self.conn.transaction()
        await self.tr.start()
        await self.conn.execute("SELECT 1 FROM do_partitions WHERE partition = $1 FOR UPDATE", self.partition)
        return self

    async def flush_waits(self) -> None:
        """Until a flush is waiting for the row."""

        async def waiting() -> bool:
            return bool(await self.watch.fetchval(f"SELECT count(*) {_WAITING_ON_A_LOCK}"))

        await assert_eventually(waiting, 10, "a flush waiting for the partition row")

    async def fence(self) -> None:
        """A takeover, as another worker's acquisition does it: the waiting flush fails its fence."""
        await self.conn.execute("UPDATE do_partitions SET epoch = epoch + 1 WHERE partition = $1", self.partition)
        await self.tr.commit()
        self.tr = None

    async def kill_waiters(self) -> None:
        """The waiting flush's connection dies (the lease is not touched), then the row is free."""
        await self.watch.execute(f"SELECT pg_terminate_backend(pid) {_WAITING_ON_A_LOCK}")
        await self.release()

    async def release(self) -> None:
        if self.tr is not None:
            tr, self.tr = self.tr, None
            await tr.rollback()

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.release()
        finally:
            await self.conn.close()
            await self.watch.close()


def _partition(settings: Settings, stub: Stub) -> int:
    return partition_of(stub.id.hex, settings.partitions)


def _live(worker: Worker, settings: Settings, stub: Stub) -> Instance | None:
    state = worker.parts.get(_partition(settings, stub))
    return None if state is None else state.instances.get(stub.id.hex)


async def _stored(settings: Settings, stub: Stub, key: str) -> Any:
    conn = await asyncpg.connect(settings.database_url)
    try:
        raw = await conn.fetchval("SELECT value FROM do_storage WHERE object_id = $1 AND key = $2",
                                  stub.id.hex, key.encode())
    finally:
        await conn.close()
    return None if raw is None else codec.unpack(bytes(raw))


async def _noted(tag: str, what: Any = None, timeout: float = 10.0) -> None:
    """Until the objects noted ``what`` under ``tag`` (anything, if ``what`` is None)."""

    async def seen() -> bool:
        notes = Edge.notes.get(tag, [])
        return bool(notes) if what is None else what in notes

    await assert_eventually(seen, timeout, f"note {what!r} under {tag!r}")


# ----- H2: a reset instance's reply is an error, never a timeout -------------------------------


async def test_a_put_then_abort_gets_an_object_reset_reply(worker: Worker, env: Env) -> None:
    obj = env.EDGES.get_by_name("abort-at-once")
    with pytest.raises(ObjectReset, match="aborted by the test"):
        await obj.put_then_abort("k", "dropped")
    assert await obj.get("k") is None, "the write of an aborted event was committed"


@pytest.mark.parametrize("event", ["running", "calling"])
@pytest.mark.parametrize("how", ["fence", "kill"])
async def test_a_flush_failing_under_a_running_event_gets_an_error_reply(
        start_worker: WorkerFactory, env: Env, settings: Settings, how: str, event: str) -> None:
    """The flush of an event's write fails (its epoch is fenced, or its connection dies) while the
    event is still running ("running": in a plain await; "calling": at the output gate of an
    outgoing call). Its caller gets ObjectReset, not a timeout (or a broken input gate)."""
    await start_worker(**PATIENT)
    obj = env.EDGES.get_by_name(f"flush-{how}-{event}")
    await obj.ping()  # live already: the flush is all the test holds up
    async with PartitionRowLock(settings, _partition(settings, obj)) as row:
        if event == "running":
            call = asyncio.create_task(obj.put_then_wait_for_reset("k", "never committed"))
        else:
            call = asyncio.create_task(obj.put_then_call("k", "never committed", f"flush-{how}-callee"))
        await row.flush_waits()
        await (row.fence() if how == "fence" else row.kill_waiters())
        with pytest.raises(ObjectReset):
            await call
    # rebuilt from committed state (after a fence, by the worker that re-acquired the partition)
    assert await obj.get("k") is None
    assert await _stored(settings, obj, "k") is None
    await obj.put("k", "after")
    assert await _stored(settings, obj, "k") == "after"


# ----- H1: the input gate stays closed when an outgoing call fails or is cancelled -------------


async def test_a_call_cancelled_at_the_output_gate_keeps_the_input_gate(
        start_worker: WorkerFactory, env: Env, settings: Settings) -> None:
    worker = await start_worker(**PATIENT)
    tag = "cancelled-call"
    obj = env.EDGES.get_by_name(tag)
    await obj.ping()
    async with PartitionRowLock(settings, _partition(settings, obj)) as row:
        first = asyncio.create_task(obj.rmw_across_a_cancelled_call(tag, f"{tag}-callee"))
        try:
            await _noted(tag, "call cancelled")  # its write is held up, so its call timed out
            second = asyncio.create_task(obj.incr("n", tag))

            async def second_arrived() -> bool:
                inst = _live(worker, settings, obj)
                return "incr entered" in Edge.notes[tag] or (inst is not None and inst.inflight >= 2)

            # the second event is at the input gate, or (the bug) already ran inside the first one
            await assert_eventually(second_arrived, 10, "the second event reached the object")
            assert "incr entered" not in Edge.notes[tag], "an event ran in the middle of another's read-modify-write"
        finally:
            Edge.event(tag).set()
        await row.release()
        assert await first == 1
        assert await second == 2
    assert await obj.get("n") == 2


async def test_a_call_cancelled_while_taking_the_gate_back_still_takes_it(
        start_worker: WorkerFactory, env: Env, settings: Settings) -> None:
    """An event's call returned, but another event holds the input gate; the first one's timeout
    fires while it waits for the gate. It must still wait for the gate before its code goes on."""
    worker = await start_worker()
    tag = "cancelled-reacquire"
    obj = env.EDGES.get_by_name(tag)
    first = asyncio.create_task(obj.call_then_time_out(tag, f"{tag}-callee"))
    second: asyncio.Task[Any] | None = None
    try:
        await _noted(f"{tag}-callee", "callee waiting")  # the first event's gate is open now
        second = asyncio.create_task(obj.hold(tag))
        await _noted(tag, "holding")
        Edge.event(f"{tag}-callee").set()  # the call returns; the first event waits for the gate

        async def first_waits_for_the_gate() -> bool:
            inst = _live(worker, settings, obj)
            return inst is not None and bool(inst.input._turn._waiters)

        await assert_eventually(first_waits_for_the_gate, 10, "the first event waiting for the gate")
        timeout = Edge.timeouts[tag]
        timeout.reschedule(asyncio.get_running_loop().time())

        async def fired() -> bool:
            return timeout.expired()

        await assert_eventually(fired, 10, "the first event's timeout")
        await asyncio.sleep(0.1)  # room for the first event to (wrongly) go on without the gate
    finally:
        Edge.event(f"{tag}-callee").set()
        Edge.event(f"{tag}-hold").set()
    assert await second == "held"
    assert await first == "done"
    assert ("timed out while holding", 0) in Edge.notes[tag], Edge.notes[tag]


# ----- H3: an evicted instance is failed: a task it left behind cannot write -------------------


async def test_a_task_left_by_an_evicted_instance_cannot_write(
        start_worker: WorkerFactory, env: Env, settings: Settings) -> None:
    worker = await start_worker(idle_timeout=0.2)
    tag = "evicted-stray"
    obj = env.EDGES.get_by_name(tag)
    await obj.spawn_late_put(tag, "late", "from the evicted instance")

    async def evicted() -> bool:
        return _live(worker, settings, obj) is None

    await assert_eventually(evicted, 10, "eviction")
    assert await obj.get("late") is None  # a new instance, which now knows "late" is absent
    Edge.event(tag).set()
    await _noted(tag)
    assert Edge.notes[tag] == ["ObjectReset"], "the evicted instance's task wrote"
    assert await _stored(settings, obj, "late") is None
    assert await obj.get("late") is None


async def test_a_task_left_by_an_evicted_instance_cannot_break_a_group_commit(
        start_worker: WorkerFactory, env: Env, settings: Settings) -> None:
    """The evicted instance's task and the new instance write the same key into one batch (the
    flush lane is busy meanwhile): that must not fail the batch, nor anyone else's write in it."""
    worker = await start_worker(idle_timeout=0.3, flush_concurrency=1, **PATIENT)
    tag = "evicted-stray-batch"
    obj = env.EDGES.get_by_name(tag)
    bystander = env.EDGES.get_by_name(f"{tag}-bystander")
    other = env.EDGES.get_by_name(f"{tag}-other")
    await obj.spawn_late_put(tag, "late", "from the evicted instance")

    async def evicted() -> bool:
        return _live(worker, settings, obj) is None

    await assert_eventually(evicted, 10, "eviction")
    async with PartitionRowLock(settings, _partition(settings, bystander)) as row:
        writes = [asyncio.create_task(bystander.put("x", 1))]
        await row.flush_waits()  # the one flush lane is busy: later writes gather into one batch
        writes += [asyncio.create_task(obj.put("late", "from the new instance")),
                   asyncio.create_task(other.put("y", 1))]

        async def pending() -> bool:
            return all((inst := _live(worker, settings, s)) is not None and inst.has_unflushed
                       for s in (obj, other))

        await assert_eventually(pending, 10, "the writes waiting for the next batch")
        Edge.event(tag).set()
        await _noted(tag)  # refused at once, or (the bug) waiting in the batch too
        await row.release()
        results = await asyncio.gather(*writes, return_exceptions=True)
    assert results == [None, None, None]
    assert Edge.notes[tag] == ["ObjectReset"]
    assert await _stored(settings, obj, "late") == "from the new instance"
    assert await obj.get("late") == "from the new instance"


# ----- H4: calls from the constructor's block_concurrency_while wait for the output gate -------


async def test_a_call_from_the_constructor_waits_for_the_output_gate(
        start_worker: WorkerFactory, env: Env, settings: Settings) -> None:
    worker = await start_worker(**PATIENT)
    name = "booter"
    booter = env.BOOTERS.get_by_name(name)
    async with PartitionRowLock(settings, _partition(settings, booter)) as row:
        hello = asyncio.create_task(booter.hello())
        await row.flush_waits()  # the constructor's write is held up

        async def call_waits_or_went_out() -> bool:
            inst = _live(worker, settings, booter)
            return "registry called" in Edge.notes.get(name, []) or (
                inst is not None and bool(inst.output._waiters))

        await assert_eventually(call_waits_or_went_out, 10, "the constructor's call at the output gate")
        await row.release()
        assert await hello is True, "the constructor's call left before its write was committed"
    assert Edge.notes[name] == ["registry called"]
    assert await _stored(settings, booter, "booted") is True


# ----- M1: a new instance waits for its predecessor's flush ------------------------------------


async def test_a_new_instance_waits_for_the_flush_of_the_one_before(
        start_worker: WorkerFactory, env: Env, settings: Settings) -> None:
    worker = await start_worker(**PATIENT)
    obj = env.EDGES.get_by_name("successor")
    await obj.ping()
    first = _live(worker, settings, obj)
    async with PartitionRowLock(settings, _partition(settings, obj)) as row:
        aborted = asyncio.create_task(obj.put_then_abort("k", "in flight at the abort", True))

        async def reset() -> bool:
            return _live(worker, settings, obj) is not first

        await assert_eventually(reset, 10, "the abort")  # with its write's flush still waiting
        read = asyncio.create_task(obj.get("k"))  # builds the next instance

        async def read_done_or_waiting() -> bool:
            inst = _live(worker, settings, obj)
            return read.done() or (inst is not None and inst.obj is None and inst.input.held)

        await assert_eventually(read_done_or_waiting, 10, "the read")
        await row.release()  # the flush commits
        assert await read == "in flight at the abort", "the new instance read around its predecessor's write"
        with pytest.raises(DurableError):
            await aborted
    assert await _stored(settings, obj, "k") == "in flight at the abort"
    assert await obj.get("k") == "in flight at the abort"


# ----- M2: delete_all() discards reads in flight across it -------------------------------------


@pytest.mark.parametrize("op", ["get", "list"])
async def test_a_read_in_flight_across_delete_all_does_not_bring_keys_back(
        start_worker: WorkerFactory, env: Env, settings: Settings, op: str) -> None:
    worker = await start_worker(idle_timeout=0.2)
    obj = env.EDGES.get_by_name(f"delete-all-{op}")
    await obj.put("k", "old")

    async def evicted() -> bool:
        return _live(worker, settings, obj) is None

    await assert_eventually(evicted, 10, "eviction")  # "k" is only in Postgres now
    assert await obj.read_racing_delete_all("k", op) == {"get": None, "list": {}}
    assert await obj.get("k") is None
    assert await _stored(settings, obj, "k") is None


# ----- M3: a graceful stop answers every request it took ---------------------------------------


@pytest.fixture
def drained(monkeypatch: pytest.MonkeyPatch) -> set[tuple[int, int]]:
    """(connection, subscription id) of every subscription whose drain completed."""
    done: set[tuple[int, int]] = set()
    drain = Subscription._drain

    async def _drain(self: Subscription) -> None:
        await drain(self)
        done.add((id(self._conn), self._id))  # in the step that removed it: nothing came between

    monkeypatch.setattr(Subscription, "_drain", _drain)
    return done


def _count_late_deliveries(worker: Worker, drained: set[tuple[int, int]], late: list[str]) -> None:
    """Note the requests NATS hands ``worker`` for a subscription whose drain already completed:
    nats-server can send a message it matched before the UNSUB after the PONG that ends the
    drain's round trip, and nats-py drops a message for a subscription it removed, so its caller
    times out. That race is not one Worker.stop() can close by draining; the test counts it."""
    nc = worker.nc
    process = nc._process_msg

    async def process_msg(sid: int, subject: Any, reply: Any, data: bytes, headers: Any) -> None:
        name = subject.decode() if isinstance(subject, bytes) else str(subject)
        if sid not in nc._subs and (id(nc), sid) in drained and name.startswith("dop."):
            late.append(name)
        await process(sid, subject, reply, data, headers)

    nc._process_msg = process_msg  # type: ignore[method-assign]


async def test_graceful_stops_under_load_answer_every_request_they_took(
        start_worker: WorkerFactory, settings: Settings, config: AppConfig, drained: set[tuple[int, int]]) -> None:
    """Stop the serving worker under load, then start another, a few times over: every request a
    stopping worker took is answered. A request that met no worker is retried (no responder
    proves it did not run), so callers see latency, not errors."""
    late: list[str] = []
    serving = await start_worker()
    _count_late_deliveries(serving, drained, late)
    patient = settings.model_copy(update={"retry_deadline": 60.0})
    async with await Client.connect(patient, config) as client:
        counters = [Env(client, config).COUNTERS.get_by_name(f"graceful-{i}") for i in range(32)]
        replies: list[list[int]] = [[] for _ in counters]
        timeouts: list[RequestTimeout] = []
        errors: list[BaseException] = []
        done = asyncio.Event()

        async def drive(i: int) -> None:
            while not done.is_set():
                try:
                    replies[i].append(await counters[i].increment())
                except RequestTimeout as exc:
                    timeouts.append(exc)
                except DurableError as exc:
                    errors.append(exc)
                    return

        mark = [0] * len(counters)

        async def busy() -> bool:
            return all(len(r) >= m + 3 for r, m in zip(replies, mark, strict=True)) or bool(errors)

        drivers = [asyncio.create_task(drive(i)) for i in range(len(counters))]
        try:
            for _ in range(3):  # each stop catches some requests on their way in; a few make that likely
                await assert_eventually(busy, 30, "every caller served by the current worker")
                await serving.stop(grace=10)
                mark[:] = [len(r) for r in replies]
                serving = await start_worker()
                _count_late_deliveries(serving, drained, late)
            await assert_eventually(busy, 30, "every caller served by the last worker")
        finally:
            done.set()
            await asyncio.gather(*drivers)
    assert errors == [], errors[:3]
    # a request NATS routed to the stopping worker just before it withdrew its interest still
    # arrives there, and is refused with NotOwner (then retried), never dropped
    assert timeouts == [], (f"{len(timeouts)} callers timed out ({len(late)} requests arrived after their "
                            f"subscription was gone): {timeouts[:3]}")
    # every increment that ran was acknowledged: nothing ran without its caller hearing of it
    for counter, values in zip(counters, replies, strict=True):
        assert values == list(range(1, len(values) + 1)), values
        assert await _stored(settings, counter, "value") == len(values)


# ----- L1: a live object woken by a nameless request learns its name later ---------------------


async def test_an_object_woken_without_a_name_learns_it_from_a_named_request(worker: Worker, env: Env) -> None:
    named = env.PROBES.get_by_name("late-name")
    nameless = env.PROBES.get(env.PROBES.id_from_string(named.id.hex))
    assert nameless.name is None
    assert await nameless.whoami() == {"id": named.id.hex, "name": None}
    assert await named.whoami() == {"id": named.id.hex, "name": "late-name"}
    assert await nameless.whoami() == {"id": named.id.hex, "name": "late-name"}
    # one instance all along
    assert await nameless.bump_memory() == 1
    assert await named.bump_memory() == 2

