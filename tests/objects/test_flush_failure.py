"""Fault test: Postgres goes away under a running worker.

A write whose flush fails must come back to its caller as an error reply (ObjectReset), not as
a silent timeout; the object is reset (its in-memory state is gone) and nothing of the failed
batch is visible once Postgres is back. The worker re-acquires its partitions (its lock session
died with the server) with new epochs and serves again from committed state.

A write meets the outage in one of two ways: its flush fails, or the worker first loses its
lease and resets the object (``Edge.put_when`` holds the input gate until the server is gone).
Which one comes first when the whole server stops is a race, so a second test makes the flush
itself fail, deterministically, by killing the worker's storage connections under its writers
while its lock session (and so its lease) lives on.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest
from durable.client import Client, Env
from durable.client.namespace import Stub
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.embedded import EmbeddedNats
from durable.core.errors import DurableError, ObjectReset, RequestTimeout
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.objects import Edge
from tests.helpers.postgres import dedicated_postgres
from tests.helpers.settings import make_settings
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]
WRITERS = 8
#: a lease that a slow, shared machine does not lose by accident (heartbeat at most ttl / 4)
LEASE = {"lease_ttl": 4.0, "heartbeat_interval": 0.5}


async def _write_until_error(stub: Stub, progress: list[int], i: int) -> tuple[int, int, BaseException]:
    """Put {a, b, c} = n, n+1, ... until a put fails: (last acknowledged n, failed n, error).
    ``progress[i]`` follows the last acknowledged n."""
    n = 0
    while True:
        try:
            await stub.storage("put", {"a": n + 1, "b": n + 1, "c": n + 1})
        except Exception as exc:  # noqa: BLE001 - the test looks at what it got
            return n, n + 1, exc
        n += 1
        progress[i] = n


async def _writers_going(progress: list[int]) -> None:
    """Until every writer has had a batch acknowledged."""

    async def going() -> bool:
        return all(progress)

    await assert_eventually(going, 15, "every writer had a batch acknowledged")


async def test_failed_flush_resets_the_object_and_commits_nothing(
        nats_server: EmbeddedNats, config: AppConfig, tmp_path: Path) -> None:
    async with dedicated_postgres(tmp_path) as pg:
        settings = make_settings(nats_server.url, pg.url, **LEASE, request_timeout=8.0, retry_deadline=1.0)
        worker = Worker(settings, config)
        await worker.start()
        client = await Client.connect(settings, config)
        try:
            await worker.wait_ready()
            env = Env(client, config)
            probe = env.PROBES.get_by_name("flush-failure")
            batcher = env.EDGES.get_by_name("flush-failure-batch")
            life = env.LIFECYCLES.get_by_name("flush-failure")
            writers = [env.PROBES.get_by_name(f"flush-writer-{i}") for i in range(WRITERS)]

            await probe.storage("put", "x", 1)
            assert await life.remember("only in memory") == "only in memory"
            state = await life.state()
            assert state["loaded"]["memory"] == "only in memory"
            assert state["loaded"]["boots"] == 1
            epochs_before = dict(worker.ownership.epochs)
            assert len(epochs_before) == settings.partitions

            # an event that writes a multi-key batch once Postgres is already gone (it holds the
            # input gate until the test tells it the server is down)
            tag = "flush-failure-batch"
            batch = asyncio.create_task(batcher.put_when(tag, {"a": 1, "b": 2, "c": 3}))
            # writers whose flushes are in flight when the server shuts down
            progress = [0] * WRITERS
            load = [asyncio.create_task(_write_until_error(w, progress, i)) for i, w in enumerate(writers)]
            await _writers_going(progress)

            async def batch_waiting() -> bool:
                return "waiting" in Edge.notes.get(tag, [])

            await assert_eventually(batch_waiting, 15, "the batch event running")
            started = time.monotonic()
            await pg.stop()
            Edge.event(tag).set()
            with pytest.raises(ObjectReset):
                await batch
            results = await asyncio.gather(*load)
            assert time.monotonic() - started < settings.request_timeout, "errors must be replies"
            for acked, _, error in results:
                assert acked > 0, "the writer never got going before the outage"
                assert isinstance(error, DurableError) and not isinstance(error, RequestTimeout), repr(error)
                assert error.retryable, repr(error)
            # which of the two detections (a failed flush, a failed lock session) comes first is a
            # race: both reset the object and reply with ObjectReset (or, once the partition is
            # released, the request meets no responder and ends as Unavailable)

            # writes while the database is down fail fast with a retryable error, not a timeout
            for key in ("y", "z"):
                t0 = time.monotonic()
                with pytest.raises(DurableError) as failed:
                    await probe.storage("put", key, 1)
                assert not isinstance(failed.value, RequestTimeout), failed.value
                assert failed.value.retryable, failed.value
                assert time.monotonic() - t0 < settings.request_timeout

            async def stepped_down() -> bool:
                return not worker.parts

            # its lock session is gone: once the lease runs out, the worker steps down
            await assert_eventually(stepped_down, settings.lease_ttl + 10, "the worker stepped down")

            await pg.start()  # same port, same data directory
            await worker.wait_ready(15)
            for partition, epoch in worker.ownership.epochs.items():
                assert epoch > epochs_before[partition], f"partition {partition} kept its old epoch"

            # the failed batch is absent as a whole; the earlier committed write is there
            assert await batcher.get(["a", "b", "c"]) == {}
            assert await probe.storage("get", ["a", "b", "c", "x", "y", "z"]) == {"x": 1}
            conn = await asyncpg.connect(pg.url)
            try:
                for stub, stored in ((batcher, []), (probe, [b"x"])):
                    keys = await conn.fetch("SELECT key FROM do_storage WHERE object_id = $1 ORDER BY key",
                                            stub.id.hex)
                    assert [bytes(r["key"]) for r in keys] == stored
                # each writer's batches are all-or-nothing: the last acknowledged one (or, if the
                # server died between commit and reply, the one that failed), never a mix
                for w, (acked, failed_n, _) in zip(writers, results, strict=True):
                    rows = await conn.fetch("SELECT key, value FROM do_storage WHERE object_id = $1", w.id.hex)
                    stored = {bytes(r["key"]).decode(): codec.unpack(bytes(r["value"])) for r in rows}
                    assert set(stored) == {"a", "b", "c"}
                    assert len(set(stored.values())) == 1, f"a partial batch is visible: {stored}"
                    assert stored["a"] in (acked, failed_n), (stored, acked)
                    assert await w.storage("get", ["a", "b", "c"]) == stored
            finally:
                await conn.close()

            # the object was reset: its memory is gone and its constructor ran again
            state = await life.state()
            assert "memory" not in state["loaded"]
            assert state["loaded"]["boots"] == 2

            # and it works again
            await probe.storage("put", {"a": 10, "b": 20, "c": 30})
            assert await probe.storage("get", ["a", "b", "c"]) == {"a": 10, "b": 20, "c": 30}
        finally:
            await client.close()
            await worker.stop(grace=2)


async def test_flush_on_a_killed_connection_resets_the_object_with_an_error_reply(
        start_worker: WorkerFactory, env: Env, settings: Settings) -> None:
    worker = await start_worker(**LEASE)
    epochs = dict(worker.ownership.epochs)
    writers = [env.PROBES.get_by_name(f"conn-kill-{i}") for i in range(WRITERS)]
    for w in writers:
        assert await w.bump_memory() == 1
        assert await w.bump_memory() == 2
    progress = [0] * WRITERS
    load = [asyncio.create_task(_write_until_error(w, progress, i)) for i, w in enumerate(writers)]
    conn = await asyncpg.connect(settings.database_url)
    try:
        await _writers_going(progress)
        # terminate the worker's pooled storage connections (never its lock session) until
        # every writer has met a failed flush
        deadline = time.monotonic() + 15
        while not all(t.done() for t in load):
            assert time.monotonic() < deadline, "the writers never met a failed flush"
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND application_name NOT LIKE 'durable-owner:%'")
            await asyncio.sleep(0.01)  # the next round of the fault, until every writer met it
        results = [t.result() for t in load]
        assert any(acked > 0 for acked, *_ in results), "no batch was committed before the failures"
        for *_, error in results:
            assert isinstance(error, ObjectReset), repr(error)
            assert "storage write failed" in error.message, error.message
            assert error.retryable

        # the lease was never in doubt: same partitions, same epochs
        assert worker.ownership.epochs == epochs
        for w, (acked, failed_n, _) in zip(writers, results, strict=True):
            # reset: the instance was rebuilt, its memory is gone
            assert await w.bump_memory() == 1
            # all or nothing: the last acknowledged batch, or (if the connection died between
            # commit and reply) the failed one; never a mix of the two
            got = await w.storage("get", ["a", "b", "c"])
            assert got == {} or (set(got) == {"a", "b", "c"} and len(set(got.values())) == 1), got
            assert got.get("a", 0) in (acked, failed_n), (got, acked)
            rows = await conn.fetch("SELECT value FROM do_storage WHERE object_id = $1", w.id.hex)
            assert [codec.unpack(bytes(r["value"])) for r in rows] == list(got.values())
            # and it takes writes again
            await w.storage("put", {"a": -1, "b": -1, "c": -1})
    finally:
        for t in load:
            t.cancel()
        await conn.close()
