"""Partition ownership: a session advisory lock per partition plus an epoch, held as a lease.

All of a worker's partition locks live on one dedicated, non-pooled connection (asyncpg's pool
would run ``pg_advisory_unlock_all()`` on release). That session sets ``idle_session_timeout``
to the lease TTL, so Postgres itself ends the lease of a worker that goes silent (crash, pause,
partition), plus ``statement_timeout`` and ``client_connection_check_interval``; it runs nothing
but heartbeats and acquisitions. Each acquisition bumps the partition's epoch in
``do_partitions``; storage transactions are fenced on it (see flusher.py).

The local lease deadline is the send time of the last successful heartbeat plus 80 % of the
TTL: Postgres cannot end the session before the TTL counted from *after* that heartbeat, so
while the deadline holds no other worker can own our partitions. Past it, we step down.

Availability under network faults (issue 14): a worker that cannot be reached over NATS
(liveness.py) leaves the lock session so the others take its partitions at once; while a
renewal is overdue it refuses new requests (:meth:`Ownership.reaching_postgres`) but keeps
the lease, riding out flaps shorter than it; having lost its session to a failure, it rejoins
only once Postgres has answered for a lease (rejoin.py); and partitions being handed over to
it are tried for every few milliseconds, since the old owner keeps refusing until we hold them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import asyncpg

from ..core.db import connect_writable, require_primary
from ..core.logs import ranges
from ..core.settings import Settings
from ..core.tasks import TaskSet
from .balance import assign
from .rejoin import RejoinProbe

log = logging.getLogger("durable.ownership")

SESSION_PREFIX = "durable-owner:"
#: heartbeats a partition may stay without any owner before a worker it is not assigned to takes it
ORPHAN_HEARTBEATS = 3
#: how often a worker tries for partitions being handed over to it (see Ownership._incoming)
INCOMING_POLL = 0.02
#: how soon a worker without a lock session tries to open one again (at most a heartbeat)
RECONNECT_INTERVAL = 0.25

#: live lock sessions of this deployment (in this database) and the partitions locked by anyone
_LIVE = """
SELECT application_name AS name, NULL::int AS partition FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'durable-owner:' || $1::int || ':%'
UNION ALL
SELECT NULL, objid::int FROM pg_locks
WHERE locktype = 'advisory' AND granted AND classid = $1::int::oid AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

_TRY_LOCK = "SELECT p FROM unnest($2::int[]) AS p WHERE pg_try_advisory_lock($1, p)"
#: rows are locked in partition order, the order flushes take their FOR SHARE locks in, so a
#: bump and a flush never deadlock
_BUMP = """
UPDATE do_partitions SET epoch = epoch + 1, owner = $2, acquired_at = now()
WHERE partition IN (SELECT partition FROM do_partitions WHERE partition = ANY($1::int[])
                    ORDER BY partition FOR NO KEY UPDATE)
RETURNING partition, epoch
"""


class Ownership:
    """The lease of one worker over its partitions."""

    def __init__(self, settings: Settings, worker_id: str,
                 on_acquired: Callable[[int, int], Awaitable[None]], on_lost: Callable[[int, str], None],
                 on_handover: Callable[[int], Awaitable[None]] | None = None,
                 nats_reachable: Callable[[], bool] | None = None) -> None:
        self.settings = settings
        #: false while this worker cannot be reached over NATS (liveness.py): it then holds no lease
        self._nats_reachable = nats_reachable
        self.worker_id = worker_id
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._on_handover = on_handover
        #: partitions being handed over (drained, then released) by a task of their own
        self._handing_over: dict[int, asyncio.Task[None]] = {}
        #: partitions taken and not yet logged (_log_acquired), and since when
        self._acquired_unlogged: list[tuple[int, int]] = []
        self._acquired_since = 0.0
        #: how many consecutive heartbeats each unassigned partition had no owner at all
        self._orphaned: dict[int, int] = {}
        #: live workers of this deployment at the last heartbeat, and the resulting assignment
        self.live: list[str] = []
        self.assigned: set[int] = set(range(settings.partitions))
        self.epochs: dict[int, int] = {}
        self.lease_deadline = 0.0
        #: when the last lease renewal came back, and when the one in flight (if any) was sent
        #: (see :meth:`reaching_postgres`)
        self.renewed_at = 0.0
        self._renewal_sent: float | None = None
        #: until when partitions assigned to us but still held elsewhere are polled for (_incoming)
        self._incoming_until = 0.0
        self._overdue_logged = False
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: lock releases of partitions stepped down from (fenced), running in the background
        self._unlocks = TaskSet()
        #: asyncpg connections take one operation at a time
        self._conn_lock = asyncio.Lock()
        #: after the lock session was lost to a failure: when to open a new one (rejoin.py)
        self._rejoin = RejoinProbe(settings, self.worker_id)
        #: called when the lock session is lost with partitions held (the worker renews its pool)
        self.on_session_lost: Callable[[], None] | None = None

    @property
    def session_name(self) -> str:
        """The lock session's application_name: its presence in pg_stat_activity is liveness."""
        return f"{SESSION_PREFIX}{self.settings.deployment_key}:{self.worker_id}"[:63]

    def desired(self) -> set[int]:
        """The partitions this worker should hold now (see balance.py)."""
        return self.assigned

    def _call_timeout(self) -> float:
        """Client-side bound of one lock-session call: what is left of the lease, at least 0.5 s."""
        left = self.lease_deadline - time.monotonic() if self.epochs else self.settings.lease_ttl * 0.8
        return max(0.5, left)

    def lease_valid(self) -> bool:
        return time.monotonic() < self.lease_deadline

    def reaching_postgres(self) -> bool:
        """False while a lease renewal is overdue (the one in flight was sent more than max(1 s,
        an interval) ago, or none came back for two intervals plus that). Postgres is probably
        out of reach then, so a request taken now would wait for a commit that cannot happen
        and, when the lease lapses, fail as ObjectReset (outcome unknown). The dispatcher
        refuses new requests with NotOwner (retryable: they never ran) meanwhile; the lease
        itself is kept, so a flap shorter than the lease costs no partition."""
        if not self.epochs:
            return True
        interval, now = self.settings.heartbeat_interval, time.monotonic()
        sent = self._renewal_sent
        late = (now - sent if sent is not None else now - self.renewed_at - 2 * interval) - max(1.0, interval)
        if late > 0 and not self._overdue_logged:
            self._overdue_logged = True
            log.warning("lease renewal overdue (Postgres out of reach?): refusing new requests until it "
                        "returns or the lease lapses", extra={"worker": self.worker_id})
        return late <= 0

    def owns(self, partition: int, epoch: int) -> bool:
        return self.epochs.get(partition) == epoch and self.lease_valid()

    async def _open(self) -> asyncpg.Connection:
        ttl_ms = int(self.settings.lease_ttl * 1000)
        conn = await connect_writable(  # every host of the URL at once: a dead primary costs nothing
            self.settings.database_url, timeout=5, statement_cache_size=0,
            server_settings={
                "application_name": self.session_name,
                "idle_session_timeout": str(ttl_ms),
                "statement_timeout": "2000",
                "client_connection_check_interval": "1000",
            },
        )
        try:  # a standby would grant advisory locks that lock nothing on the primary
            await require_primary(conn)
        except BaseException:
            conn.terminate()
            raise
        await conn.execute(
            "INSERT INTO do_workers(worker_id, host, pid) VALUES ($1, $2, $3) "
            "ON CONFLICT (worker_id) DO UPDATE SET last_seen = now()",
            self.worker_id, socket.gethostname(), os.getpid(),
        )
        return conn

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ownership")

    async def _run(self) -> None:
        interval = self.settings.heartbeat_interval
        while not self._stopping:
            if self._nats_reachable is not None and len(self.live) > 1 and not self._nats_reachable():
                # nobody can reach our partitions: keeping their locks would keep them unserved
                # for as long as the cut lasts. Leaving the lock session releases them at once,
                # and the other workers see us leave and take them; we rejoin once NATS answers.
                # (The only live worker keeps them: nobody else could serve them, and its
                # objects' memory and sockets survive a short stall.)
                if self.epochs or self._conn is not None:
                    log.warning("NATS unreachable: giving up %d partition(s) and leaving the lock session "
                                "until it answers again", len(self.epochs), extra={"worker": self.worker_id})
                    await self._lose_all("NATS unreachable")
                await self._sleep_watching(interval)
                continue
            if not await self._rejoin.ready(max(1.0, 2 * interval)):
                await self._sleep_watching(interval)
                continue
            try:
                async with self._conn_lock:
                    if self._conn is not None and self._conn.is_closed() and self.epochs:
                        # the session that held our locks is gone (the server restarted, say):
                        # a new one holds none of them, so take them again, under new epochs
                        raise ConnectionError("the lock session was closed")
                    if self._conn is None or self._conn.is_closed():
                        self._conn = await self._open()
                    sent = time.monotonic()
                    # a black-holed connection must not outlive the lease: statement_timeout
                    # only works while the server hears us
                    self._renewal_sent = sent
                    try:
                        await self._conn.execute("UPDATE do_workers SET last_seen = now() WHERE worker_id = $1",
                                                 self.worker_id, timeout=self._call_timeout())
                    finally:
                        self._renewal_sent = None
                    self.lease_deadline = sent + self.settings.lease_ttl * 0.8
                    self.renewed_at = time.monotonic()
                    if self._overdue_logged:
                        self._overdue_logged = False
                        log.warning("lease renewed again: taking requests", extra={"worker": self.worker_id})
                    await self._rebalance()
                    await self._acquire()
            except Exception as exc:  # noqa: BLE001 - the lease loop must outlive any single failure
                if self.epochs or self._conn is not None:
                    self._rejoin.arm()  # we were a live worker: rejoin only once Postgres is steady
                if self.epochs:
                    log.warning("lock session failed (%s: %s); stepping down from all partitions",
                                type(exc).__name__, exc)
                else:
                    log.debug("lock session unavailable: %s: %s", type(exc).__name__, exc)
                await self._lose_all("lock session failed")
            # no lock session (Postgres restarting, a standby being promoted): try again soon,
            # not a whole heartbeat later, so serving resumes as soon as a primary is there
            await self._sleep_watching(interval if self._conn is not None else min(interval, RECONNECT_INTERVAL))

    async def _sleep_watching(self, interval: float) -> None:
        """Sleep until the next heartbeat, stepping down at once if the lease runs out meanwhile,
        and taking partitions handed over to us as soon as they are released (see
        :meth:`_incoming`)."""
        end = time.monotonic() + interval
        while not self._stopping:
            now = time.monotonic()
            if self.epochs and now >= self.lease_deadline:
                log.warning("lease expired before a heartbeat returned; stepping down")
                self._rejoin.arm()
                await self._lose_all("lease expired")
            if now >= end:
                return
            if self._incoming():
                await asyncio.sleep(INCOMING_POLL)
                await self._take_incoming()
                continue
            await asyncio.sleep(min(end - now, max(0.01, self.lease_deadline - now), 0.25))

    def _incoming(self) -> bool:
        """Partitions newly assigned to us are still held by the worker handing them over: it
        keeps refusing until we have them, so we try for them every INCOMING_POLL seconds, not
        once a heartbeat, for a lease after the assignment changed."""
        return (time.monotonic() < self._incoming_until and self.lease_valid()
                and bool(self.desired() - set(self.epochs) - set(self._handing_over)))

    async def _take_incoming(self) -> None:
        try:
            async with self._conn_lock:
                if self._conn is not None and not self._conn.is_closed() and self.lease_valid():
                    await self._acquire()
        except Exception as exc:  # noqa: BLE001 - the heartbeat deals with a failed lock session
            log.debug("taking incoming partitions failed: %s: %s", type(exc).__name__, exc)

    async def _rebalance(self) -> None:
        """Recompute the assignment from the live workers; hand over what is no longer ours."""
        assert self._conn is not None
        rows = await self._conn.fetch(_LIVE, self.settings.deployment_key, timeout=self._call_timeout())
        prefix = len(f"{SESSION_PREFIX}{self.settings.deployment_key}:")
        me = self.session_name[prefix:]
        live = sorted({r["name"][prefix:] for r in rows if r["name"]} | {me})
        held = {r["partition"] for r in rows if r["partition"] is not None}
        if live != self.live:
            if self.live:
                log.info("live workers changed: %d -> %d", len(self.live), len(live))
            self.live = live
            self.assigned = assign(self.settings.partitions, live).get(me, set())
            self._incoming_until = time.monotonic() + self.settings.lease_ttl
        # availability first: a partition nobody has held for a few heartbeats (its assignee is
        # stuck or disagrees about who is live) is taken by whoever sees it; balance moves it later
        for p in range(self.settings.partitions):
            if p in held or p in self.assigned:
                self._orphaned.pop(p, None)
            else:
                self._orphaned[p] = self._orphaned.get(p, 0) + 1
        handing = [p for p in sorted(set(self.epochs) - self.assigned)
                   if p not in self._handing_over and self._on_handover is not None and len(live) > 1]
        if handing:
            log.info("handing over %d partition(s) to the other workers (%d live)", len(handing), len(live),
                     extra={"worker": self.worker_id, "partitions": ranges(handing), "count": len(handing)})
        for p in handing:
            self._handing_over[p] = asyncio.get_running_loop().create_task(self._hand_over(p))

    async def _hand_over(self, partition: int) -> None:
        try:
            assert self._on_handover is not None
            await self._on_handover(partition)
        except Exception as exc:  # noqa: BLE001 - a failed hand-over must not kill anything
            log.warning("hand-over of partition %d failed: %s: %s", partition, type(exc).__name__, exc)
        finally:
            self._handing_over.pop(partition, None)

    def _log_acquired(self, taken: list[tuple[int, int]]) -> None:
        """One line for the lot, not one per partition, nor one per try while a join takes its
        share in several tries (partitions still being handed over come free one by one): the
        line is written once every wanted partition is held, or half a second after the first."""
        now = time.monotonic()
        if taken:
            if not self._acquired_unlogged:
                self._acquired_since = now
            self._acquired_unlogged.extend(taken)
        pending = self._acquired_unlogged
        if not pending:
            return
        held = set(self.epochs) | {p for p, _ in taken}
        if self.desired() <= held or now - self._acquired_since >= 0.5:
            log.info("acquired %d partition(s)", len(pending),
                     extra={"worker": self.worker_id, "partitions": ranges([p for p, _ in pending]),
                            "epochs": f"{min(e for _, e in pending)}..{max(e for _, e in pending)}",
                            "count": len(pending)})
            self._acquired_unlogged = []

    async def _acquire(self) -> None:
        assert self._conn is not None
        orphans = {p for p, n in self._orphaned.items() if n >= ORPHAN_HEARTBEATS}
        wanted = [p for p in sorted(self.desired() | orphans)
                  if p not in self.epochs and p not in self._handing_over]
        if not wanted:
            self._log_acquired([])
            return
        got = [r[0] for r in await self._conn.fetch(_TRY_LOCK, self.settings.deployment_key, wanted,
                                                   timeout=self._call_timeout())]
        if not got:
            self._log_acquired([])
            return
        try:
            rows = await self._conn.fetch(_BUMP, got, self.worker_id, timeout=self._call_timeout())
        except BaseException:
            await self._unlock_now(got)
            raise
        taken = sorted(rows)
        self._log_acquired(taken)
        for partition, epoch in taken:
            self.epochs[partition] = epoch
            try:
                await self._on_acquired(partition, epoch)
            except Exception as exc:  # noqa: BLE001 - e.g. NATS down: give this partition back
                log.warning("could not start serving partition %d: %s: %s", partition, type(exc).__name__, exc)
                self.epochs.pop(partition, None)
                self._on_lost(partition, "could not start serving")
                await self._unlock_now([partition])

    async def _unlock(self, partitions: list[int]) -> None:
        async with self._conn_lock:
            await self._unlock_now(partitions)

    async def _unlock_now(self, partitions: list[int]) -> None:
        if self._conn is None or self._conn.is_closed() or not partitions:
            return
        try:
            await self._conn.execute(
                "SELECT pg_advisory_unlock($1, p) FROM unnest($2::int[]) AS p",
                self.settings.deployment_key, partitions,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("unlock failed: %s", exc)

    async def _lose_all(self, reason: str) -> None:
        if self.epochs:
            log.warning("stepping down from %d partition(s): %s", len(self.epochs), reason,
                        extra={"worker": self.worker_id, "partitions": ranges(self.epochs), "reason": reason,
                               "count": len(self.epochs), "epochs": dict(sorted(self.epochs.items()))})
        if self.epochs and self.on_session_lost is not None:
            self.on_session_lost()
        for p in sorted(self.epochs):
            self.epochs.pop(p, None)
            self._on_lost(p, reason)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def release(self, partition: int) -> None:
        """Give a partition up (after the caller drained it) so another worker can take it."""
        if self.epochs.pop(partition, None) is not None:
            await self._unlock([partition])

    def step_down(self, partition: int, reason: str) -> None:
        """Stop owning a partition at once (fenced); the lock is released in the background."""
        epoch = self.epochs.pop(partition, None)
        if epoch is None:
            return
        log.warning("stepping down from partition %d: %s", partition, reason,
                    extra={"worker": self.worker_id, "partition": partition, "epoch": epoch, "reason": reason})
        self._on_lost(partition, reason)
        self._unlocks.spawn(self._unlock([partition]), f"unlock-{partition}")

    async def stop(self) -> None:
        """Release everything (after the worker drained its partitions)."""
        self._stopping = True
        self.lease_deadline = 0.0  # nothing may be sent under a lease we are about to give up
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._handing_over.values()):
            task.cancel()
        await asyncio.gather(*self._handing_over.values(), return_exceptions=True)
        await self._rejoin.close()
        await self._unlocks.wait(2.0)  # background unlocks of fenced partitions; _unlock_now covers the rest
        if self._conn is not None and not self._conn.is_closed():
            await self._unlock_now(sorted(self.epochs))
            try:
                await self._conn.execute("DELETE FROM do_workers WHERE worker_id = $1", self.worker_id)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
            await self._conn.close()
        self.epochs.clear()
        self._conn = None
