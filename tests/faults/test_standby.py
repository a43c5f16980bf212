"""Losing the Postgres primary: a synchronous standby is promoted and the workers carry on.

The deployment under test: a primary with a synchronous streaming-replication standby
(tests/helpers/standby.py), ``DURABLE_DATABASE_URL`` naming both with
``target_session_attrs=read-write``, two `durable worker` processes on one NATS server, and an
independent load of increments over 50 counters that keeps the books (every acknowledged value).
First the standby is cut off from the primary (so every commit waits for it), then the primary
is lost, killed (-9: the postmaster and every process of it, so connections are refused) or
frozen (SIGSTOP: connections hang, as with a hung machine or a network cut), and the standby is
promoted a moment later (what an operator or an orchestrator does; durable does not promote).
The workers, which are not restarted, carry on by themselves: their lock sessions fail, and a
new connection, tried on both hosts at once, finds the one that now accepts writes.

Checked: every acknowledged increment is on the promoted standby (none lost), none applied twice
(acknowledged <= stored <= attempted, and what the object reads is what is stored), every
partition was re-acquired under a higher epoch than it had on the primary (the epochs live in a
replicated table, so the new primary continues them), and the commit audit, replicated with the
rest, shows no two owners committing for one partition in overlapping time. The outage (the
longest stretch without an acknowledgement) is printed.

A second test: a read-only standby is never used for writes or lock sessions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from durable.core.config import AppConfig, load_config
from durable.core.db import NotPrimary, connect_writable
from durable.core.embedded import EmbeddedNats
from durable.core.settings import Settings
from durable.objects.ownership import SESSION_PREFIX, Ownership

from tests.helpers.faults import (
    ROOT,
    ClusterWorker,
    Load,
    check_audit,
    check_counts,
    connect_client,
    owners,
    read_through_stubs,
    stored_values,
    wait_all_owned,
    wait_balanced,
)
from tests.helpers.settings import PARTITIONS, make_settings
from tests.helpers.standby import ReplicatedPostgres

pytestmark = pytest.mark.timeout(300)

SEED = 20261130
OBJECTS = 50
LEASE_TTL = 3.0
HEARTBEAT = 0.5
#: how long the primary is gone before the standby is promoted: the time an orchestrator takes
#: to notice (Patroni's loop_wait is 10 s by default; kept short here, the test is about durable)
PROMOTE_AFTER = 1.0
#: how long the standby is cut off from the primary (and falls behind) before the primary is killed
STANDBY_LAG = 1.5
CONFIG_FILE = ROOT / "durable.toml"  # the shipped Counter


@pytest.fixture
async def replicated(tmp_path: Path) -> AsyncIterator[ReplicatedPostgres]:
    async with ReplicatedPostgres(tmp_path / "pg") as pair:
        yield pair


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats(tmp_path / "nats", partitions=PARTITIONS) as server:
        yield server


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[[Settings, int], ClusterWorker]]:
    """ClusterWorker factory; every worker is killed at teardown."""
    made: list[ClusterWorker] = []

    def factory(settings: Settings, i: int) -> ClusterWorker:
        w = ClusterWorker(f"w{i}", settings, tmp_path)
        made.append(w)
        return w

    yield factory
    for w in made:
        w.close()


async def create_database(pair: ReplicatedPostgres, name: str) -> str:
    """A database made on the primary (replicated to the standby); the URL naming both servers."""
    conn = await asyncpg.connect(pair.primary.url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return pair.url(name)


async def server_port(url: str) -> int:
    """The port of the server a connection with ``url`` reaches (as a worker connects)."""
    conn = await connect_writable(url, timeout=5)
    try:
        return int(await conn.fetchval("SELECT inet_server_port()"))
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize("fault", ["kill -9", "SIGSTOP"])
async def test_losing_the_primary_and_promoting_the_standby_loses_no_acknowledged_write(
        fault: str, replicated: ReplicatedPostgres, nats_server: EmbeddedNats,
        spawn: Callable[[Settings, int], ClusterWorker]) -> None:
    """kill -9: the primary's port refuses connections at once. SIGSTOP: connections to it are
    accepted by the kernel and never answered, as when its machine hangs or is cut off; the
    workers' sessions on it time out, and new connections must not wait on it."""
    config: AppConfig = load_config(CONFIG_FILE)
    url = await create_database(replicated, "failover")
    promoted = replicated.server_url(replicated.standby, "failover")  # the checks look there
    settings = make_settings(nats_server.url, url, config_file=CONFIG_FILE, lease_ttl=LEASE_TTL,
                             heartbeat_interval=HEARTBEAT, request_timeout=2.0, retry_deadline=10.0,
                             idle_timeout=120.0)
    workers = [spawn(settings, i) for i in range(2)]
    await asyncio.gather(*(w.start() for w in workers))
    ids = [w.worker_id for w in workers]
    await wait_balanced(url, settings, ids)
    assert await server_port(url) == replicated.primary.port
    clients = [await connect_client([nats_server.url], i, settings, config) for i in range(2)]
    load = Load(clients, config, [f"standby-{i}" for i in range(OBJECTS)], per_client=3, seed=SEED)
    try:
        load.start()
        await load.acknowledged(4 * OBJECTS)  # the load is going, on the primary
        conn = await asyncpg.connect(url)
        try:
            before = await owners(conn)
        finally:
            await conn.close()
        acked_before = load.tally.total_acked

        # the harshest moment to lose the primary: its standby has fallen behind. Commits wait
        # for it (synchronous replication), so whatever was acknowledged is on the standby
        await replicated.cut_standby()
        cut_at = time.monotonic()
        await asyncio.sleep(STANDBY_LAG)
        acked_while_lagging = sum(1 for t in load.tally.ack_times if t > cut_at)
        lost_at = time.monotonic()
        if fault == "kill -9":
            await replicated.kill_primary()
        else:
            replicated.freeze_primary()
        await asyncio.sleep(PROMOTE_AFTER)  # the primary is gone; nobody has promoted yet
        acked_while_down = sum(1 for t in load.tally.ack_times if t > lost_at + 0.5)
        await replicated.promote()
        promoted_at = time.monotonic()

        deadline = promoted_at + 30
        while not any(t > promoted_at for t in load.tally.ack_times):
            assert time.monotonic() < deadline, "no increment acknowledged after the promotion"
            await asyncio.sleep(0.02)
        resumed_at = min(t for t in load.tally.ack_times if t > promoted_at)
        await load.acknowledged(4 * OBJECTS, since=resumed_at)  # the load goes on, on the new primary
        await load.stop()
        outage = load.tally.last_gap(cut_at - 1.0)

        assert all(w.alive for w in workers), "a worker died instead of reconnecting"
        await wait_all_owned(promoted, settings, 30)
        await wait_balanced(promoted, settings, ids, 30)  # the same workers (not restarted) own everything
        assert await server_port(url) == replicated.standby.port
        assert not await replicated.in_recovery(replicated.standby)

        conn = await asyncpg.connect(promoted)
        try:
            after = await owners(conn)
            # the locks died with the primary; every partition was taken again on the promoted
            # standby, under an epoch above the one it had on the primary: fencing continues
            assert sorted(after) == sorted(before) == list(range(PARTITIONS))
            assert all(after[p][0] > before[p][0] for p in before), (before, after)
            db = await stored_values(conn, load.ids)
            audit = await check_audit(conn)
        finally:
            await conn.close()
        via_stub = await read_through_stubs(load.stubs[0])
        counts = check_counts(load.tally, load.ids, db, via_stub)
        assert counts.violations == [], counts.violations[:20]
        assert counts.lost == 0
        assert audit.violations == [], audit.violations[:20]
        assert audit.commits > 0
    finally:
        await load.stop()
        for c in clients:
            await c.close()
        if replicated.primary.running:  # frozen: fence it for good (it must never serve again)
            await replicated.kill_primary()
    tally = load.tally
    errors = ", ".join(f"{k} {v}" for k, v in tally.errors.most_common()) or "none"
    print(f"\n--- losing the Postgres primary ({fault}; its standby cut off {STANDBY_LAG:.1f}s before, "
          f"promoted {PROMOTE_AFTER:.1f}s after) ---\n"
          f"increments attempted {tally.total_attempted}, acknowledged {tally.total_acked} "
          f"({acked_before} before the standby was cut off, {acked_while_lagging} while it was, "
          f"{acked_while_down} while no primary was up), unknown outcome "
          f"{tally.total_attempted - tally.total_acked} ({errors})\n"
          f"acknowledged writes lost: {counts.lost}; stored beyond the acknowledged (unknown outcome, "
          f"applied once): {counts.unacked_applied}; commit audit: {audit.commits} commits under "
          f"{audit.epochs} (partition, epoch) ownerships, no overlap\n"
          f"first acknowledgement {resumed_at - promoted_at:.2f}s after the promotion, "
          f"{resumed_at - lost_at:.2f}s after the primary was lost; longest stretch without an "
          f"acknowledgement {outage:.2f}s (standby lag + time to promote + reconnection)")
    assert acked_while_down == 0, "an increment was acknowledged while no primary was up"


@pytest.mark.fault
async def test_a_read_only_standby_is_never_used_for_writes_or_lock_sessions(
        replicated: ReplicatedPostgres, nats_server: EmbeddedNats,
        spawn: Callable[[Settings, int], ClusterWorker]) -> None:
    url = await create_database(replicated, "readonly")
    standby_only = f"postgresql://postgres@127.0.0.1:{replicated.standby.port}/readonly"
    deadline = time.monotonic() + 30
    while True:  # until the standby has replayed the CREATE DATABASE
        try:
            await (await asyncpg.connect(standby_only, timeout=5)).close()
            break
        except asyncpg.InvalidCatalogNameError:
            assert time.monotonic() < deadline, "the standby never saw the database"
            await asyncio.sleep(0.05)
    settings = make_settings(nats_server.url, standby_only, config_file=CONFIG_FILE, lease_ttl=LEASE_TTL,
                             heartbeat_interval=HEARTBEAT)

    # a worker given the standby alone refuses to start, saying why
    worker = spawn(settings, 0)
    with pytest.raises(RuntimeError, match="exited with 2") as failed:
        await worker.start()
    assert f"127.0.0.1:{replicated.standby.port} is a read-only standby" in str(failed.value)
    assert "target_session_attrs=read-write" in str(failed.value)

    # nor does a lock session stay on it: a standby would grant advisory locks that lock nothing
    ownership = Ownership(settings, "on-standby", on_acquired=_never_acquired, on_lost=lambda p, r: None)
    with pytest.raises(NotPrimary, match="read-only standby"):
        await ownership._open()
    conn = await asyncpg.connect(standby_only)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1",
                                   f"{SESSION_PREFIX}%") == 0
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    finally:
        await conn.close()

    # with the primary gone and nobody promoted yet, the URL naming both reaches no server: the
    # standby is skipped, not written to
    await replicated.kill_primary()
    with pytest.raises(OSError):
        await asyncpg.connect(url, timeout=5)
    ownership = Ownership(settings.model_copy(update={"database_url": url}), "after-primary",
                          on_acquired=_never_acquired, on_lost=lambda p, r: None)
    with pytest.raises(OSError):
        await ownership._open()
    await replicated.promote()
    assert await server_port(url) == replicated.standby.port


async def _never_acquired(partition: int, epoch: int) -> None:
    raise AssertionError(f"partition {partition} acquired on a standby")
