"""Fault tests: epoch fencing and lease expiry.

(a) Another owner takes a partition (its epoch moves on in do_partitions): the old owner's next
    storage transaction fails its FOR SHARE fence, commits nothing, the caller gets an error
    and the worker steps down from the partition (it may re-acquire it later, with a new epoch).
(b) A paused owner (SIGSTOP) loses its lease when Postgres ends its silent lock session; a
    second worker takes over; once resumed (SIGCONT) the old owner steps down and never commits
    for the partitions it lost: nothing the new owner acknowledged is ever overwritten. Back as a
    live worker, it may take its share of the partitions again, but only through a clean hand-over
    and under new epochs (the commit audit shows it never committed under an epoch it had lost).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import asyncpg
import pytest
from durable.client import Client, Env
from durable.client.namespace import Stub
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.errors import ObjectReset, RequestTimeout
from durable.core.settings import Settings
from durable.core.wire import partition_of

from tests.helpers.logs import stepped_down_from
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory, WorkerProcess

pytestmark = pytest.mark.timeout(120)
#: a lease that a slow, shared machine does not lose by accident (heartbeat at most ttl / 4)
LEASE = {"lease_ttl": 4.0, "heartbeat_interval": 0.5}
#: the paused owner's lease, which the takeover test needs to run out soon
LAPSING_LEASE = {"lease_ttl": 2.0, "heartbeat_interval": 0.25}


async def _stored(conn: asyncpg.Connection, object_id: str, key: str) -> object:
    raw = await conn.fetchval("SELECT value FROM do_storage WHERE object_id = $1 AND key = $2",
                              object_id, key.encode())
    return None if raw is None else codec.unpack(bytes(raw))


async def test_superseded_epoch_fences_the_write_and_the_worker_steps_down(
        start_worker: WorkerFactory, env: Env, settings: Settings) -> None:
    worker = await start_worker(**LEASE)
    stub = env.COUNTERS.get_by_name("fenced")
    assert await stub.increment() == 1
    partition = partition_of(stub.id.hex, settings.partitions)
    old_epoch = worker.parts[partition].epoch
    others = {p: e for p, e in worker.ownership.epochs.items() if p != partition}

    conn = await asyncpg.connect(settings.database_url)
    try:
        # a takeover, as another worker's acquisition would do it
        await conn.execute("UPDATE do_partitions SET epoch = epoch + 1 WHERE partition = $1", partition)
        # an error reply (a lost reply would surface as RequestTimeout)
        with pytest.raises(ObjectReset):
            await stub.increment()
        assert await _stored(conn, stub.id.hex, "value") == 1, "a fenced write was committed"
        state = worker.parts.get(partition)
        assert state is None or state.epoch != old_epoch, "the worker still serves the superseded epoch"
        assert worker.ownership.epochs.get(partition) != old_epoch

        async def reacquired() -> bool:
            state = worker.parts.get(partition)
            return state is not None and state.sub is not None and state.epoch > old_epoch + 1

        await assert_eventually(reacquired, 15, "the worker re-acquired the partition with a new epoch")
        row = await conn.fetchrow("SELECT epoch, owner FROM do_partitions WHERE partition = $1", partition)
        assert row["epoch"] == worker.parts[partition].epoch
        assert row["owner"] == worker.worker_id
    finally:
        await conn.close()
    # only the fenced partition was touched
    assert {p: e for p, e in worker.ownership.epochs.items() if p != partition} == others
    # the new instance starts from committed state: the fenced increment never happened
    assert await stub.increment() == 2


async def _put_until_acked(stub: Stub, key: str, tag: str, attempts: int = 30) -> str:
    """Put a fresh value until one is acknowledged. While the paused worker is still subscribed,
    the queue group may hand it a request, which then times out: each attempt has its own value,
    so a stale commit of an abandoned attempt would show up as a wrong final value."""
    for attempt in range(attempts):
        value = f"{tag}-{attempt}"
        try:
            await stub.storage("put", key, value)
            return value
        except RequestTimeout:
            continue
    raise AssertionError(f"no put acknowledged in {attempts} attempts")


@pytest.mark.fault
async def test_paused_owner_loses_its_lease_and_never_commits_after_takeover(
        worker_process: Callable[..., WorkerProcess], start_worker: WorkerFactory,
        settings: Settings, config: AppConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = settings.model_copy(update={"request_timeout": 0.75, "retry_deadline": 5.0})
    monkeypatch.setenv("DURABLE_AUDIT_COMMITS", "true")  # the old worker's commits go to do_commit_audit
    old = worker_process(**LAPSING_LEASE)
    await old.start()
    client = await Client.connect(fast, config)
    conn = await asyncpg.connect(settings.database_url)
    stale: list[asyncio.Task[object]] = []
    try:
        probes = [Env(client, config).PROBES.get_by_name(f"fence-{i}") for i in range(6)]
        for p in probes:
            await p.storage("put", "k", "old-owner")
        old_epochs = dict(await conn.fetch("SELECT partition, epoch FROM do_partitions"))

        # an event in the middle of its handler when the owner is paused: on resume it must not
        # commit (the lease check resets it first, or its flush under the old epoch fails the fence)
        stale = [asyncio.create_task(probes[0].put_after({"k": "stale-in-flight", "k2": "stale"}, 300))]
        # into the middle of that 300 ms handler: nothing of it shows outside the worker's process
        # until it writes, so the pause is placed by time (the fault's timing, not a wait)
        await asyncio.sleep(0.1)
        old.kill(signal.SIGSTOP)
        # requests the paused owner receives but can only look at after it resumes
        stale += [asyncio.create_task(p.storage("put", "k", "stale")) for p in probes]

        new = await start_worker(**LEASE)

        async def taken_over() -> bool:  # once Postgres ended the paused owner's lock session
            return set(new.ownership.epochs) == set(range(settings.partitions))

        await assert_eventually(taken_over, 20, "the new worker took over every partition")
        for part, epoch in new.ownership.epochs.items():
            assert epoch > old_epochs[part]
        new_epochs = dict(new.ownership.epochs)
        taken_over_at = await conn.fetchval("SELECT clock_timestamp()")
        stale_results = await asyncio.gather(*stale, return_exceptions=True)
        assert all(isinstance(r, RequestTimeout) for r in stale_results), stale_results

        values = await asyncio.gather(*(_put_until_acked(p, "k", "new-owner") for p in probes))
        acked = {p.id.hex: v for p, v in zip(probes, values, strict=True)}
        for oid, value in acked.items():
            assert await _stored(conn, oid, "k") == value

        old.kill(signal.SIGCONT)

        def stepped_down() -> bool:
            return len(stepped_down_from(old.log_path.read_text(errors="replace"))) >= settings.partitions

        async def check() -> bool:
            return stepped_down()

        await assert_eventually(check, 15, "the resumed worker stepped down from every partition")
        assert old.proc is not None and old.proc.poll() is None, "the old worker should live on, as a standby"

        # it is a live worker again: the balance hands it its share of the partitions, each through
        # a hand-over by the new owner and under a new epoch, never under one it had lost
        old_id = await conn.fetchval("SELECT worker_id FROM do_workers WHERE pid = $1", old.pid)
        assert old_id is not None

        async def balanced() -> bool:
            rows = await conn.fetch("SELECT partition, epoch, owner FROM do_partitions")
            owners = {r["owner"] for r in rows}
            return owners == {new.worker_id, old_id} and all(
                r["epoch"] > new_epochs[r["partition"]] for r in rows if r["owner"] == old_id)

        await assert_eventually(balanced, 30, "the resumed worker took its share back through hand-overs")

        # nothing the new owner acknowledged was overwritten, in the database or through the object
        for p in probes:
            assert await _stored(conn, p.id.hex, "k") == acked[p.id.hex]
            assert await p.storage("get", "k") == acked[p.id.hex]
        assert await _stored(conn, probes[0].id.hex, "k2") is None, "the paused owner's in-flight write committed"
        # and both keep serving
        for p in probes:
            await p.storage("put", "k", "after")
            assert await _stored(conn, p.id.hex, "k") == "after"
        # after the takeover, the old worker committed only under the epochs it acquired since
        assert await conn.fetchval("SELECT count(*) FROM do_commit_audit WHERE worker_id = $1", old_id), \
            "the old worker's commits are not audited: the check below would prove nothing"
        stale_commits = await conn.fetch(
            "SELECT partition, epoch FROM do_commit_audit WHERE worker_id = $1 AND committed_at >= $2",
            old_id, taken_over_at)
        assert [r for r in stale_commits if r["epoch"] <= new_epochs[r["partition"]]] == [], stale_commits
    finally:
        for t in stale:
            t.cancel()
        await conn.close()
        await client.close()
