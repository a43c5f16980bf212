"""Helpers of the cluster fault tests and the failover bench: `durable worker` processes to kill,
pause and restart; a steady increment load that keeps the books (attempted / acknowledged per
object); and the two end checks (acknowledged <= stored <= attempted, and the commit audit:
no two epochs of one partition commit in overlapping time)."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
from durable.client import Client, Env
from durable.client.namespace import Stub
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.objects.ownership import SESSION_PREFIX

from tests.helpers.settings import ROOT, worker_env
from tests.helpers.waiting import assert_eventually


class ClusterWorker:
    """A `durable worker` process with a name of its own (a fresh one per start, so each
    incarnation is told apart in do_partitions and do_commit_audit) and commit auditing on."""

    def __init__(self, name: str, settings: Settings, log_dir: Path, audit: bool = True,
                 preexec: Callable[[], None] | None = None) -> None:
        self.name = name
        #: run in the child before exec (the partition tests enter a host's network namespace)
        self.preexec = preexec
        self.settings = settings
        self.log_path = log_dir / f"{name}.log"
        self.audit = audit
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.nats_url = settings.nats_url
        self.paused = False

    @property
    def worker_id(self) -> str:
        return f"{self.name}-g{self.generation}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        s = self.settings
        return worker_env(
            s, DURABLE_NATS_URL=self.nats_url, DURABLE_REQUEST_TIMEOUT=str(s.request_timeout),
            DURABLE_AUDIT_COMMITS="true" if self.audit else "false", DURABLE_WORKER_NAME=self.worker_id,
        )

    async def start(self, nats_url: str | None = None, timeout: float = 30.0) -> None:
        """Start a new incarnation; returns once it printed "started" (connected to NATS and
        Postgres, lease loop running: it takes its partitions within a heartbeat or two)."""
        assert not self.alive, f"{self.worker_id} is still running"
        self.generation += 1
        if nats_url is not None:
            self.nats_url = nats_url
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {self.worker_id} on {self.nats_url} =====\n".encode())
            self.proc = subprocess.Popen([sys.executable, "-m", "durable.cli", "worker"], env=self.env(),
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                                         preexec_fn=self.preexec)
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"worker {self.worker_id} started" in self.log_text(offset):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.worker_id} exited with {self.proc.returncode}:\n"
                                   f"{self.log_text(offset)[-3000:]}")
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{self.worker_id} did not start in {timeout}s")

    def log_text(self, offset: int = 0) -> str:
        return self.log_path.read_bytes()[offset:].decode(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def kill9(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        self.paused = False

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    async def terminate(self, timeout: float = 15.0) -> None:
        """SIGTERM: a clean leave (drain, flush, release)."""
        if self.alive:
            assert self.proc is not None
            self.resume()
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                await self.kill9()

    def close(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


# ----- ownership, as Postgres sees it ---------------------------------------------------------

async def live_workers(conn: asyncpg.Connection, settings: Settings) -> set[str]:
    """worker ids with a live lock session (the liveness the workers balance on)."""
    prefix = f"{SESSION_PREFIX}{settings.deployment_key}:"
    rows = await conn.fetch("SELECT application_name FROM pg_stat_activity "
                            "WHERE datname = current_database() AND application_name LIKE $1 || '%'", prefix)
    return {r[0][len(prefix):] for r in rows}


async def locks_held(conn: asyncpg.Connection, settings: Settings) -> int:
    return int(await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = $1 "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        settings.deployment_key))


async def owners(conn: asyncpg.Connection) -> dict[int, tuple[int, str | None]]:
    """partition -> (epoch, owner) of do_partitions (the owner of the latest epoch, alive or not)."""
    return {r["partition"]: (r["epoch"], r["owner"])
            for r in await conn.fetch("SELECT partition, epoch, owner FROM do_partitions")}


async def wait_balanced(database_url: str, settings: Settings, workers: Sequence[str],
                        timeout: float = 30.0) -> None:
    """Until exactly ``workers`` are live, every partition's lock is held and each of them owns
    its share (within one of P / N) of the latest epochs."""
    deadline = time.monotonic() + timeout
    last: object = None
    conn = await asyncpg.connect(database_url)
    try:
        while time.monotonic() < deadline:
            try:
                live = await live_workers(conn, settings)
                held = await locks_held(conn, settings)
                by_owner = Counter(o for _, o in (await owners(conn)).values())
                last = (sorted(live), held, dict(by_owner))
                ideal = settings.partitions / len(workers)
                if (live == set(workers) and held == settings.partitions and set(by_owner) == set(workers)
                        and all(abs(n - ideal) <= 1 for n in by_owner.values())):
                    return
            except (OSError, asyncpg.PostgresError):
                pass
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    raise TimeoutError(f"workers {list(workers)} not balanced within {timeout}s: {last}")


async def wait_all_owned(database_url: str, settings: Settings, timeout: float = 30.0) -> None:
    """Until every partition's lock is held by a live worker (Postgres may be restarting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(database_url, timeout=2)
            try:
                if await locks_held(conn, settings) == settings.partitions:
                    return
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"partitions not all owned within {timeout}s")


# ----- clients and load ------------------------------------------------------------------------

async def connect_client(urls: Sequence[str], first: int, settings: Settings, config: AppConfig) -> Client:
    """A Client on its own NATS connection that knows every node, trying node ``first`` first."""
    order = list(urls[first % len(urls):]) + list(urls[:first % len(urls)])
    nc = await nats.connect(servers=order, dont_randomize=True, max_reconnect_attempts=-1,
                            reconnect_time_wait=0.5, name=f"durable-test-client-{first}")
    client = Client(nc, settings, config)
    client._owns_connection = True
    return client


@dataclass
class Tally:
    """The books of a load: per object, increments attempted, acknowledged, and the highest
    value a reply reported (that value was durable when the reply left)."""

    attempted: Counter[str] = field(default_factory=Counter)
    acked: Counter[str] = field(default_factory=Counter)
    max_value: dict[str, int] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    #: the first message of each error type
    samples: dict[str, str] = field(default_factory=dict)
    #: monotonic times of acknowledgements, to see when serving resumed
    ack_times: list[float] = field(default_factory=list)

    @property
    def total_attempted(self) -> int:
        return sum(self.attempted.values())

    @property
    def total_acked(self) -> int:
        return sum(self.acked.values())

    def last_gap(self, after: float) -> float:
        """The longest stretch without any acknowledgement, from ``after`` on."""
        times = [after] + sorted(t for t in self.ack_times if t >= after)
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("inf"))


class Load:
    """Increments over ``names`` from every client, ``per_client`` loops each, until stopped.
    An increment is acknowledged when its reply arrives; any error (RequestTimeout,
    ObjectReset, Unavailable, a connection error...) leaves it "attempted, outcome unknown",
    and the loop goes on."""

    def __init__(self, clients: Sequence[Client], config: AppConfig, names: Sequence[str],
                 per_client: int = 4, seed: int = 1, pace: float = 0.0) -> None:
        self.envs = [Env(c, config) for c in clients]
        self.names = list(names)
        self.stubs: list[list[Stub]] = [[e.COUNTERS.get_by_name(n) for n in self.names] for e in self.envs]
        self.ids = [s.id.hex for s in self.stubs[0]]
        self.per_client = per_client
        self.seed = seed
        self.pace = pace
        self.tally = Tally()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(c, k))
                       for c in range(len(self.envs)) for k in range(self.per_client)]

    async def _loop(self, c: int, k: int) -> None:
        rng = random.Random(self.seed * 1000 + c * 100 + k)
        stubs, tally = self.stubs[c], self.tally
        while not self._stop.is_set():
            i = rng.randrange(len(stubs))
            oid = self.ids[i]
            tally.attempted[oid] += 1
            try:
                value = await stubs[i].increment()
            except Exception as exc:  # noqa: BLE001 - attempted, outcome unknown; the load goes on
                tally.errors[type(exc).__name__] += 1
                tally.samples.setdefault(type(exc).__name__, str(exc)[:300])
                await asyncio.sleep(0.05)  # back off a little, as a client would, and try again
                continue
            tally.acked[oid] += 1
            tally.max_value[oid] = max(tally.max_value.get(oid, 0), int(value))
            tally.ack_times.append(time.monotonic())
            if self.pace:
                await asyncio.sleep(self.pace)  # the load's pace between increments, when asked for

    async def acknowledged(self, count: int, since: float | None = None, timeout: float = 20.0) -> None:
        """Until ``count`` increments were acknowledged (after ``since``, a ``time.monotonic()``)."""
        def enough() -> bool:
            times = self.tally.ack_times
            return (len(times) if since is None else sum(1 for t in times if t >= since)) >= count

        await assert_eventually(enough, timeout, f"{count} increments acknowledged")

    async def stop(self, grace: float = 15.0) -> None:
        """Stop issuing; let the calls in flight finish (a cancelled one stays "attempted")."""
        self._stop.set()
        _, pending = await asyncio.wait(self._tasks, timeout=grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ----- end checks ------------------------------------------------------------------------------

async def stored_values(conn: asyncpg.Connection, ids: Sequence[str]) -> dict[str, int]:
    rows = await conn.fetch("SELECT object_id, value FROM do_storage WHERE object_id = ANY($1::text[]) "
                            "AND key = $2", list(ids), b"value")
    return {r["object_id"]: int(codec.unpack(bytes(r["value"]))) for r in rows}


async def read_through_stubs(stubs: Sequence[Stub], attempts: int = 5) -> dict[str, int]:
    """Counter.get() of every object, retrying a call that failed (the cluster has settled)."""
    async def one(stub: Stub) -> int:
        for attempt in range(attempts):
            try:
                return int(await stub.get())
            except Exception:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.5)  # a retry's back-off: the cluster is settling
        raise AssertionError("unreachable")

    values = await asyncio.gather(*(one(s) for s in stubs))
    return {s.id.hex: v for s, v in zip(stubs, values, strict=True)}


@dataclass
class CountCheck:
    violations: list[str]
    #: acknowledged increments missing from storage (sum over objects): must be 0
    lost: int
    #: increments stored beyond the acknowledged ones (calls whose outcome was unknown, that ran)
    unacked_applied: int


def check_counts(tally: Tally, ids: Sequence[str], db: dict[str, int], via_stub: dict[str, int]) -> CountCheck:
    """For every object: acknowledged <= stored <= attempted, the highest acknowledged value
    <= stored, and the stored value is the same read through the object and from do_storage."""
    violations: list[str] = []
    lost = extra = 0
    for oid in ids:
        stored = db.get(oid, 0)
        acked, attempted, top = tally.acked[oid], tally.attempted[oid], tally.max_value.get(oid, 0)
        if via_stub.get(oid) != stored:
            violations.append(f"{oid[:12]}: read through the stub {via_stub.get(oid)} != do_storage {stored}")
        if not acked <= stored <= attempted:
            violations.append(f"{oid[:12]}: acknowledged {acked} <= stored {stored} <= attempted {attempted} "
                              "does not hold")
        if top > stored:
            violations.append(f"{oid[:12]}: a reply reported {top} but only {stored} is stored")
        lost += max(0, acked - stored, top - stored)
        extra += max(0, stored - acked)
    return CountCheck(violations, lost, extra)


@dataclass
class AuditCheck:
    violations: list[str]
    commits: int
    epochs: int
    partitions: int


async def check_audit(conn: asyncpg.Connection) -> AuditCheck:
    """No two epochs of one partition commit in overlapping time. For each partition, with its
    commits ordered by committed_at: every commit of epoch e precedes every commit of any epoch
    e' > e, i.e. last(e) < first(e') (a tie counts as an overlap); and each (partition, epoch)
    is committed by one worker only."""
    rows = await conn.fetch("SELECT partition, epoch, min(committed_at) AS first, max(committed_at) AS last, "
                            "count(*) AS n, array_agg(DISTINCT worker_id) AS workers "
                            "FROM do_commit_audit GROUP BY partition, epoch ORDER BY partition, epoch DESC")
    violations: list[str] = []
    later_first: dict[int, tuple[Any, int]] = {}  # partition -> (earliest first commit of a higher epoch, epoch)
    for r in rows:
        p, e = r["partition"], r["epoch"]
        if len(r["workers"]) > 1:
            violations.append(f"partition {p} epoch {e} committed by several workers: {r['workers']}")
        nxt = later_first.get(p)
        if nxt is not None and r["last"] >= nxt[0]:
            violations.append(f"partition {p}: epoch {e} committed at {r['last']}, not before epoch {nxt[1]}'s "
                              f"first commit at {nxt[0]}")
        if nxt is None or r["first"] < nxt[0]:
            later_first[p] = (r["first"], e)
    return AuditCheck(violations, sum(r["n"] for r in rows), len(rows), len(later_first))
