"""Alarm firing lateness and set rate, next to bare NATS message schedules measured in the same run.

    .venv/bin/python bench/bench_alarms.py [--quick] [--bare-consumers 256] [--tap]

Starts its own nats-server and PostgreSQL (embedded) and a `durable worker` process bound to
bench/durable.bench-alarms.toml (class bench/alarm_objects.py:BenchAlarmer, whose alarm()
records [scheduled_time, start time] in its storage; the records are read back from Postgres).
Lateness is the time alarm() started minus info.scheduled_time. Measured:

(a) one alarm due 0.5 s after it is set, waited for, N times in a row (a fresh object each time);
(b) 10,000 alarms on 10,000 objects, all due at the same instant;
(c) 100,000 pending alarms on 100,000 objects, due uniformly over one minute (set in random
    order, all set before the first is due);
(d) the set rate: set_alarm RPCs/s with 64 in flight, from the set phase of (c): the clock runs
    until every reply arrived *and* every schedule is in the alarm stream (commit + publish);
(e) kill -9: three `durable worker` processes (lease_ttl 3 s, heartbeat 0.5 s), alarms due 3-5 s
    ahead on 200 objects of one worker and (as a control) 100 of the two others; that worker is
    killed -9 right after the last set_alarm returned; lateness of each group.

The baseline is nats-py alone on the same nats-server: a work-queue stream with
allow_msg_schedules, one schedule subject per item (`Nats-Schedule: @at <RFC 3339 with ms>`,
the target a fire subject), a push consumer acking each fire, lateness = receipt - due time; the
same shapes (a)-(c), and for (d) the rate of schedule publishes with 64 awaited in flight. Each
baseline runs right before its durable figure. ``--bare-consumers 256`` gives the bare stream one
filtered consumer per partition (durable's first layout, 3-4x slower to deliver bursts than the
one queue-group consumer durable uses now); ``--tap`` listens in on durable's fire
deliveries to split its lateness into NATS and worker. --quick: 1,000 and 10,000 over 20 s.
(nats-server arms its schedule timer at least 250 ms ahead, so with schedules coming due all the
time even the bare figure is some 0-250 ms late, and so is one due less than ~0.5 s after the
previous fire: hence 0.5 s in (a), where a lone schedule fires within a few ms.)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

ROOT = Path(__file__).resolve().parents[1]
#: `durable worker`/`gateway` refuse the development id secret: the bench's processes share this one
os.environ.setdefault("DURABLE_ID_SECRET", "durable-bench-id-secret")
sys.path.insert(0, str(ROOT))

from durable.client import Client, Env  # noqa: E402
from durable.client.namespace import Namespace  # noqa: E402
from durable.core import codec  # noqa: E402
from durable.core.config import AppConfig, load_config  # noqa: E402
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from durable.core.settings import Settings  # noqa: E402
from durable.core.wire import partition_of  # noqa: E402

from tests.helpers.faults import ClusterWorker, owners, wait_balanced  # noqa: E402

PARTITIONS = 256
CONFIG_FILE = ROOT / "bench" / "durable.bench-alarms.toml"
FIRED_KEY = b"fired"
#: deployment keys: (a)-(d) and (e) each have their own alarm stream (DURABLE_ALARMS_<key>)
MAIN_KEY = 0x0D0B
FAILOVER_KEY = 0x0D0C
SINGLE_DELAY_MS = 500


def now_ms() -> float:
    return time.time() * 1000


def at_header(ms: int) -> str:
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return "@at " + stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Lateness:
    """Lateness (ms) of one shape; ``missing``: alarms that never fired within the wait."""

    values: list[float]
    expected: int
    notes: list[str] = field(default_factory=list)
    #: objects whose alarm ran more than once (durable only)
    twice: int = 0

    @property
    def missing(self) -> int:
        return self.expected - len(self.values)

    def stats(self) -> tuple[float, float, float] | None:
        if not self.values:
            return None
        return percentile(self.values, 50), percentile(self.values, 99), max(self.values)


async def run_inflight(count: int, inflight: int, op: Callable[[int], Awaitable[object]]) -> list[float]:
    """Run op(0..count-1) with ``inflight`` at a time; returns each one's completion time (epoch ms)."""
    done = [0.0] * count
    next_index = 0

    async def runner() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            await op(i)
            done[i] = now_ms()

    await asyncio.gather(*(runner() for _ in range(inflight)))
    return done


def late_sets(dues: Sequence[int], completed: Sequence[float]) -> int:
    return sum(1 for d, c in zip(dues, completed, strict=True) if c > d)


async def wait_push_bound(js: JetStreamContext, stream: str, consumers: int, timeout: float = 60) -> None:
    """Until ``consumers`` push consumers of ``stream`` have a subscriber on their deliver subject."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bound = 0
        try:
            offset = 0
            while True:
                page = await js.consumers_info(stream, offset)
                bound += sum(1 for c in page if c.push_bound)
                offset += len(page)
                if len(page) < 256:
                    break
        except NotFoundError:
            pass
        if bound >= consumers:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{stream}: push consumers not all bound within {timeout}s")


# ----- the baseline: nats-py alone ----------------------------------------------------------------


class BareSchedules:
    """A work-queue stream with message schedules and a push consumer acking every fire (or
    ``consumers`` of them, each filtered on its share of the fire subjects, as durable's first
    layout had one per partition)."""

    STREAM = "BENCH_BARE_SCHEDULES"

    def __init__(self, nc: nats.NATS, consumers: int = 1) -> None:
        self.nc = nc
        self.consumers = consumers
        self.js: JetStreamContext = nc.jetstream()
        self.received: dict[str, float] = {}
        self.expected = 0
        self.all_in = asyncio.Event()
        self.waiter: tuple[str, asyncio.Future[float]] | None = None
        self.run = 0

    async def setup(self) -> None:
        await self.js.add_stream(StreamConfig(
            name=self.STREAM, subjects=["bare.s.>", "bare.f.>"], retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE, allow_msg_schedules=True))
        for c in range(self.consumers):
            await self.js.add_consumer(self.STREAM, ConsumerConfig(
                durable_name=f"fires-{c}", deliver_subject=f"bare.d.{c}", filter_subject=f"bare.f.{c}.>",
                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30,
                max_ack_pending=200_000))
            # one subscription per deliver subject: a wildcard one does not count as a push
            # consumer's interest (the consumer never delivers)
            await self.nc.subscribe(f"bare.d.{c}", cb=self._on_fire, pending_msgs_limit=500_000)
        await self.nc.flush()
        await wait_push_bound(self.js, self.STREAM, self.consumers)

    async def _on_fire(self, msg: Msg) -> None:
        received = now_ms()
        item = msg.subject[len("bare.f."):]
        self.received[item] = received - int(msg.data)
        await msg.ack()
        if self.waiter is not None and self.waiter[0] == item and not self.waiter[1].done():
            self.waiter[1].set_result(received)
        if self.expected and len(self.received) >= self.expected:
            self.all_in.set()

    async def publish(self, item: str, due: int) -> None:
        """``item`` is ``<consumer>.<name>``."""
        await self.js.publish(f"bare.s.{item}", str(due).encode(),
                              headers={"Nats-Schedule": at_header(due), "Nats-Schedule-Target": f"bare.f.{item}"})

    async def single(self, repeats: int) -> Lateness:
        out = Lateness([], repeats)
        for i in range(repeats):
            item = f"{i % self.consumers}.single{i}"
            fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            self.waiter = (item, fut)
            await self.publish(item, int(now_ms()) + SINGLE_DELAY_MS)
            try:
                await asyncio.wait_for(fut, 30)
                out.values.append(self.received[item])
            except TimeoutError:
                pass
        self.waiter = None
        return out

    async def many(self, label: str, dues: list[int], inflight: int) -> tuple[Lateness, float]:
        """Publish one schedule per due time; returns the lateness and the publish rate."""
        self.run += 1
        n = self.consumers
        self.received = {}
        self.expected = len(dues)
        self.all_in.clear()
        start = time.perf_counter()
        completed = await run_inflight(len(dues), inflight, lambda i: self.publish(f"{i % n}.r{self.run}-{i}", dues[i]))
        rate = len(dues) / (time.perf_counter() - start)
        out = Lateness([], len(dues))
        if late := late_sets(dues, completed):
            out.notes.append(f"bare {label}: {late:,} schedules published after their due time")
        try:
            await asyncio.wait_for(self.all_in.wait(), max(0.0, (max(dues) - now_ms()) / 1000) + 120)
        except TimeoutError:
            pass
        out.values = list(self.received.values())
        self.expected = 0
        return out, rate


# ----- durable ------------------------------------------------------------------------------------


class BenchWorker(ClusterWorker):
    """A `durable worker` process of the bench's deployment (its config file and deployment key)."""

    def env(self) -> dict[str, str]:
        return {**super().env(), "DURABLE_DEPLOYMENT_KEY": str(self.settings.deployment_key)}


class Durable:
    """Sets alarms through stubs and reads what alarm() recorded back from Postgres."""

    def __init__(self, env: Env, conn: asyncpg.Connection, js: JetStreamContext, settings: Settings) -> None:
        self.ns: Namespace = env.ALARMERS
        self.conn = conn
        self.js = js
        self.stream = f"DURABLE_ALARMS_{settings.deployment_key}"
        self.key = settings.deployment_key
        #: object id -> when its fire was first pushed to the worker (see tap())
        self.delivered: dict[str, float] = {}
        #: object id -> [scheduled_time, alarm() start, retry_count] of the last shape measured
        self.records: dict[str, list[float]] = {}

    async def tap(self, nc: nats.NATS) -> None:
        """Listen in on the fire deliveries (a second subscriber on the consumers' deliver
        subjects), to split lateness into NATS (fire pushed to the worker) and the worker."""

        async def on_delivery(msg: Msg) -> None:
            self.delivered.setdefault(msg.subject.rsplit(".", 1)[-1], now_ms())

        await nc.subscribe(f"dal.{self.key}.d", cb=on_delivery, pending_msgs_limit=500_000)

    def split(self, label: str, records: dict[str, list[float]]) -> str:
        nats_part, worker_part = [], []
        for oid, (scheduled, started, _) in records.items():
            if oid in self.delivered:
                nats_part.append(self.delivered[oid] - scheduled)
                worker_part.append(started - self.delivered[oid])
        if not nats_part:
            return f"{label}: no fire deliveries seen"
        a, b = (" / ".join(f"{f(v):.0f}" for f in (lambda v: percentile(v, 50), lambda v: percentile(v, 99), max))
                for v in (nats_part, worker_part))
        return (f"{label}: of the lateness, the fire reached the worker {a} ms (p50 / p99 / max) after its time; "
                f"alarm() started {b} ms after that ({len(nats_part):,} deliveries seen)")

    async def stream_messages(self) -> int:
        return (await self.js.stream_info(self.stream)).state.messages

    async def wait_attached(self, consumers: int, timeout: float = 60) -> None:
        """Until the fires consumer exists and the workers' queue subscription is bound to it."""
        await wait_push_bound(self.js, self.stream, consumers, timeout)

    async def fired(self, ids: Sequence[str]) -> dict[str, list[float]]:
        rows = await self.conn.fetch("SELECT object_id, value FROM do_storage WHERE key = $1 AND object_id = ANY($2)",
                                     FIRED_KEY, list(ids))
        return {r["object_id"]: codec.unpack(r["value"]) for r in rows}

    async def ran_twice(self, ids: Sequence[str]) -> int:
        """Objects among ``ids`` whose alarm ran more than once (each run writes a ``ran.`` key)."""
        return int(await self.conn.fetchval(
            "SELECT count(*) FROM (SELECT object_id FROM do_storage WHERE object_id = ANY($1) AND key >= 'ran.' "
            "AND key < 'ran/' GROUP BY object_id HAVING count(*) > 1) t", list(ids)))

    async def wait_fired(self, last_due: float, timeout: float) -> None:
        """Until no alarm due by ``last_due`` is left in do_alarms (each fire deletes its row in
        the same commit as its record), or ``timeout`` after ``last_due``."""
        await asyncio.sleep(max(0.0, (last_due - now_ms()) / 1000 + 0.01))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = await self.conn.fetchval("SELECT count(*) FROM do_alarms WHERE due_ms <= $1", int(last_due))
            if left == 0:
                return
            await asyncio.sleep(0.5)

    async def single(self, repeats: int) -> Lateness:
        out = Lateness([], repeats)
        self.records = {}
        for i in range(repeats):
            stub = self.ns.get_by_name(f"single-{i}")
            await stub.arm(int(now_ms()) + SINGLE_DELAY_MS)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                record = await self.conn.fetchval("SELECT value FROM do_storage WHERE object_id = $1 AND key = $2",
                                                  stub.id.hex, FIRED_KEY)
                if record is not None:
                    scheduled, started, _ = codec.unpack(record)
                    out.values.append(started - scheduled)
                    self.records[stub.id.hex] = [scheduled, started, 0]
                    break
                await asyncio.sleep(0.01)
        return out

    async def many(self, label: str, dues: list[int], inflight: int) -> tuple[Lateness, float, str]:
        """Set one alarm per due time on fresh objects; returns the lateness, the set rate
        (until every reply came and every schedule is in the stream) and a note on the set phase."""
        stubs = [self.ns.get_by_name(f"{label}-{i}") for i in range(len(dues))]
        before = await self.stream_messages()
        start = time.perf_counter()
        completed = await run_inflight(len(dues), inflight, lambda i: stubs[i].arm(dues[i]))
        replies = time.perf_counter() - start
        published = None
        while time.perf_counter() - start < replies + 60 and now_ms() < min(dues):  # (fires remove schedules)
            if await self.stream_messages() - before >= len(dues):
                published = time.perf_counter() - start
                break
            await asyncio.sleep(0.05)
        out = Lateness([], len(dues))
        if late := late_sets(dues, completed):
            out.notes.append(f"durable {label}: {late:,} set_alarm calls returned after their due time")
        elapsed = published if published is not None else replies
        note = (f"set {len(dues):,} alarms: replies after {replies:.1f}s, every schedule in the stream after "
                + (f"{published:.1f}s" if published is not None else "- (not all before the first was due)"))
        await self.wait_fired(max(dues), 120)
        records = await self.fired([s.id.hex for s in stubs])
        out.values = [started - scheduled for scheduled, started, _ in records.values()]
        out.twice = await self.ran_twice([s.id.hex for s in stubs])
        self.records = records
        retried = sum(1 for *_, retry in records.values() if retry)
        if retried:
            out.notes.append(f"durable {label}: {retried:,} alarms ran as retries")
        return out, len(dues) / elapsed, note


# ----- (e) kill -9 --------------------------------------------------------------------------------


def names_in(ns: Namespace, partitions: set[int], count: int, tag: str) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        name = f"{tag}-{i}"
        if partition_of(ns.id_from_name(name).hex, PARTITIONS) in partitions:
            out.append(name)
        i += 1
    return out


@dataclass
class FailoverResult:
    victim: Lateness
    control: Lateness
    reacquired: list[float] = field(default_factory=list)  #: s from the kill to the last re-acquired partition
    due_after_kill: list[tuple[float, float]] = field(default_factory=list)  #: first, last due (s after kill)
    notes: list[str] = field(default_factory=list)


async def failover_trial(n: int, victim: BenchWorker, env: Env, durable: Durable, conn: asyncpg.Connection,
                         objects: int, result: FailoverResult) -> None:
    before = await owners(conn)
    mine = {p for p, (_, o) in before.items() if o == victim.worker_id}
    others = set(before) - mine
    victims = [env.ALARMERS.get_by_name(x) for x in names_in(env.ALARMERS, mine, objects, f"victim{n}")]
    control = [env.ALARMERS.get_by_name(x) for x in names_in(env.ALARMERS, others, objects // 2, f"control{n}")]
    stubs = victims + control
    order = list(range(len(stubs)))
    random.shuffle(order)
    t0 = int(now_ms())
    dues = [0] * len(stubs)
    for rank, i in enumerate(order):  # both groups spread over 3-5 s after the first set_alarm
        dues[i] = t0 + 3000 + rank * 2000 // len(stubs)
    await run_inflight(len(stubs), 64, lambda i: stubs[i].arm(dues[i]))
    fault_db = await conn.fetchval("SELECT clock_timestamp()")
    killed = now_ms()
    await victim.kill9()
    result.due_after_kill.append(((min(dues) - killed) / 1000, (max(dues) - killed) / 1000))
    await durable.wait_fired(max(dues), 60)
    records = await durable.fired([s.id.hex for s in stubs])
    if durable.delivered:
        result.notes.append(durable.split(f"(e) trial {n + 1}, the killed worker's objects",
                                          {s.id.hex: records[s.id.hex] for s in victims if s.id.hex in records}))
    for group, out in ((victims, result.victim), (control, result.control)):
        out.twice += await durable.ran_twice([s.id.hex for s in group])
        out.expected += len(group)
        out.values += [records[s.id.hex][1] - records[s.id.hex][0] for s in group if s.id.hex in records]
    last = await conn.fetchval("SELECT max(acquired_at) FROM do_partitions WHERE partition = ANY($1::int[]) "
                               "AND acquired_at > $2", sorted(mine), fault_db)
    if last is not None:
        result.reacquired.append((last - fault_db).total_seconds())


async def failover(ns: EmbeddedNats, pg: EmbeddedPostgres, tmp: Path, config: AppConfig, objects: int,
                   trials: int, lease_ttl: float, heartbeat: float, tap: bool) -> FailoverResult:
    admin = await asyncpg.connect(pg.url)
    await admin.execute("CREATE DATABASE bench_failover")
    await admin.close()
    url = pg.url.rsplit("/", 1)[0] + "/bench_failover"
    settings = Settings(nats_url=ns.url, database_url=url, partitions=PARTITIONS, config_file=CONFIG_FILE,
                        idle_timeout=5, lease_ttl=lease_ttl, heartbeat_interval=heartbeat, request_timeout=5,
                        deployment_key=FAILOVER_KEY)
    workers = [BenchWorker(f"fw{i}", settings, tmp, audit=False) for i in range(3)]
    result = FailoverResult(Lateness([], 0), Lateness([], 0))
    client = await Client.connect(settings, config)
    conn = await asyncpg.connect(url)
    nc = await nats.connect(ns.url)
    try:
        await asyncio.gather(*(w.start() for w in workers))
        env = Env(client, config)
        durable = Durable(env, conn, client.nc.jetstream(), settings)
        if tap:
            await durable.tap(nc)
        for n in range(trials):
            await wait_balanced(url, settings, [w.worker_id for w in workers], 60)
            await durable.wait_attached(1)
            victim = workers[n % len(workers)]
            await failover_trial(n, victim, env, durable, conn, objects, result)
            print(f"  (e) trial {n + 1}: kill -9 of {victim.worker_id}", flush=True)
            if n + 1 < trials:
                await victim.start(ns.url)
    finally:
        await client.close()
        await conn.close()
        await nc.close()
        for w in workers:
            w.close()
            result.notes += log_warnings(w)
    return result


def log_warnings(worker: BenchWorker) -> list[str]:
    warnings = [line for line in worker.log_text().splitlines() if " WARNING " in line or " ERROR " in line]
    if not warnings:
        return []
    return [f"worker {worker.name} logged {len(warnings)} warnings/errors, e.g.: {warnings[0][:300]}"]


# ----- the run ------------------------------------------------------------------------------------


def spread(count: int, start: int, seconds: float) -> list[int]:
    """``count`` due times uniform over ``seconds`` from ``start``, in random order."""
    dues = [start + int(i * seconds * 1000 / count) for i in range(count)]
    random.shuffle(dues)
    return dues


def fmt_row(label: str, mine: Lateness, bare: Lateness | None) -> str:
    ours = mine.stats()
    base = bare.stats() if bare is not None else None
    cells = [f"{label:<44}", f"{len(mine.values):>7,}"]
    cells += [f"{v:>8.1f}" for v in ours] if ours else [f"{'-':>8}"] * 3
    cells += [f"{v:>8.1f}" for v in base] if base else [f"{'-':>8}"] * 3
    if ours and base:
        cells += [f"{o / b:>6.1f}x" if b > 0 else f"{'-':>7}" for o, b in zip(ours, base, strict=True)]
    return " ".join(cells)


def report(args: argparse.Namespace, rows: list[tuple[str, Lateness, Lateness | None]],
           rates: tuple[int, float, float], notes: list[str], fo: FailoverResult | None) -> None:
    print("\nalarm lateness, ms (alarm() start - scheduled_time; bare: receipt - @at time)")
    bare_label = f"bare NATS, {args.bare_consumers} consumer{'s' if args.bare_consumers > 1 else ''}"
    print(f"{'':<44} {'':>7} {'durable':^26} {bare_label:^26} {'durable / bare':^23}")
    print(f"{'shape':<44} {'n':>7} " + " ".join(f"{h:>8}" for h in ("p50", "p99", "max") * 2)
          + " " + " ".join(f"{h:>7}" for h in ("p50", "p99", "max")))
    for label, mine, bare in rows:
        print(fmt_row(label, mine, bare))
    if fo is not None:
        print(fmt_row("(e) kill -9: the killed worker's objects", fo.victim, None))
        print(fmt_row("    the surviving workers' objects", fo.control, None))
    count, rate, bare_rate = rates
    print(f"\n{'set rate, 64 in flight':<44} {'n':>7} {'durable/s':>10} {'bare/s':>10} {'vs bare':>8}")
    print(f"{'(d) set_alarm RPC + commit + schedule publish':<44} {count:>7,} {rate:>10,.0f} {bare_rate:>10,.0f} "
          f"{rate / bare_rate * 100:>7.1f}%")
    missing = [(label, mine.missing) for label, mine, _ in rows if mine.missing]
    missing += [(label, bare.missing) for label, _, bare in rows if bare is not None and bare.missing]
    if fo is not None:
        missing += [("(e) killed", fo.victim.missing), ("(e) surviving", fo.control.missing)]
    print()
    for label, m in missing:
        if m:
            print(f"NOT FIRED within the wait: {label}: {m:,}")
    twice = [(label, mine.twice) for label, mine, _ in rows if mine.twice]
    if fo is not None:
        twice += [(label, out.twice) for label, out in (("(e) killed", fo.victim), ("(e) surviving", fo.control))
                  if out.twice]
    for label, n in twice:
        print(f"RAN MORE THAN ONCE: {label}: {n:,} alarms")
    if not any(m for _, m in missing) and not twice:
        print("every alarm set ran, and ran once (checked per object in Postgres)")
    for note in notes + (fo.notes if fo is not None else []):
        print(f"note: {note}")
    if fo is not None and fo.due_after_kill:
        print(f"note: (e) lease_ttl {args.lease_ttl}s, heartbeat {args.heartbeat}s, {args.failover_trials} "
              f"trial(s); the alarms were due {min(a for a, _ in fo.due_after_kill):.1f}-"
              f"{max(b for _, b in fo.due_after_kill):.1f}s after the kill; the killed worker's partitions were "
              f"all re-acquired {', '.join(f'{r:.2f}s' for r in fo.reacquired)} after it")


async def measure_main(args: argparse.Namespace, ns: EmbeddedNats, pg: EmbeddedPostgres, tmp: Path,
                       config: AppConfig, notes: list[str]) -> tuple[list[tuple[str, Lateness, Lateness | None]],
                                                                      tuple[int, float, float]]:
    settings = Settings(nats_url=ns.url, database_url=pg.url, partitions=PARTITIONS, config_file=CONFIG_FILE,
                        idle_timeout=args.idle_timeout, deployment_key=MAIN_KEY)
    worker = BenchWorker("w", settings, tmp, audit=False)
    nc = await nats.connect(ns.url)
    client = await Client.connect(settings, config)
    conn = await asyncpg.connect(pg.url)
    rows: list[tuple[str, Lateness, Lateness | None]] = []
    try:
        bare = BareSchedules(nc, args.bare_consumers)
        await bare.setup()
        await worker.start()
        await wait_balanced(pg.url, settings, [worker.worker_id], 60)
        durable = Durable(Env(client, config), conn, client.nc.jetstream(), settings)
        await durable.wait_attached(1)
        if args.tap:
            await durable.tap(nc)

        base = await bare.single(args.single)
        mine = await durable.single(args.single)
        rows.append((f"(a) 1 alarm, {args.single} times in a row", mine, base))
        if args.tap:
            notes.append(durable.split("(a)", durable.records))
        print("  (a) done", flush=True)

        # (b): the lead must cover the set phase; assume >= 1,500 publishes/s and >= 1,500 sets/s
        # (a set phase that overruns it is reported)
        n = args.burst
        base, bare_burst_rate = await bare.many("burst", [int(now_ms()) + 2000 + n * 1000 // 1500] * n,
                                                args.inflight)
        t = int(now_ms()) + 3000 + n * 1000 // 1500
        mine, burst_rate, note = await durable.many("burst", [t] * n, args.inflight)
        rows.append((f"(b) {n:,} objects, all due at one instant", mine, base))
        notes.append(f"(b) {note}; bare: {n:,} schedules published at {bare_burst_rate:,.0f}/s")
        if args.tap:
            notes.append(durable.split("(b)", durable.records))
        print(f"  (b) done; set rate {burst_rate:,.0f}/s", flush=True)

        # (c): leads from the rates of (b), with a margin (the set rate of 10,000 tends to be
        # higher than that of 100,000, hence the cap)
        n, secs = args.spread, args.spread_seconds
        base_dues = spread(n, int(now_ms()) + 3000 + int(n / min(bare_burst_rate, 4000) * 1000 * 1.2), secs)
        base, bare_rate = await bare.many("spread", base_dues, args.inflight)
        lead = 5000 + int(n / min(burst_rate, 2000) * 1000 * 1.15)
        mine, rate, note = await durable.many("spread", spread(n, int(now_ms()) + lead, secs), args.inflight)
        rows.append((f"(c) {n:,} pending, due over {secs:g} s", mine, base))
        notes.append(f"(c) {note} (the first was due after {lead / 1000:.1f}s)")
        if args.tap:
            notes.append(durable.split("(c)", durable.records))
        print("  (c) done", flush=True)
        for _, m, b in rows:
            notes += m.notes + (b.notes if b is not None else [])
        return rows, (n, rate, bare_rate)
    finally:
        await client.close()
        await nc.close()
        await conn.close()
        await worker.terminate()
        notes += log_warnings(worker)


async def main(args: argparse.Namespace, tmp: Path) -> None:
    began = time.perf_counter()
    load_before = os.getloadavg()
    config = load_config(CONFIG_FILE)
    notes: list[str] = []
    async with EmbeddedNats(tmp / "nats", partitions=PARTITIONS) as ns, EmbeddedPostgres(tmp / "pg") as pg:
        rows, rates = await measure_main(args, ns, pg, tmp, config, notes)
        fo = None
        if args.failover_trials:
            fo = await failover(ns, pg, tmp, config, args.failover_objects, args.failover_trials,
                                args.lease_ttl, args.heartbeat, args.tap)
        report(args, rows, rates, notes, fo)
    print(f"(1 `durable worker` process for (a)-(d), 3 for (e); idle_timeout {args.idle_timeout:g}s; {PARTITIONS} "
          f"partitions; cpu: {os.cpu_count()} cores; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; total run time {time.perf_counter() - began:.0f}s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a quick smoke run")
    parser.add_argument("--single", type=int, help="(a) repeats (default 20; quick 5)")
    parser.add_argument("--burst", type=int, help="(b) alarms due at one instant (default 10,000; quick 1,000)")
    parser.add_argument("--spread", type=int, help="(c) pending alarms (default 100,000; quick 10,000)")
    parser.add_argument("--spread-seconds", type=float, help="(c) spread of the due times (default 60; quick 20)")
    parser.add_argument("--inflight", type=int, default=64, help="set_alarm calls / publishes in flight")
    parser.add_argument("--idle-timeout", type=float, default=5.0, help="DURABLE_IDLE_TIMEOUT of the workers")
    parser.add_argument("--failover-objects", type=int, default=200, help="(e) objects of the killed worker")
    parser.add_argument("--failover-trials", type=int, default=1, help="(e) kills, victims in turn (0: skip)")
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="(e) DURABLE_LEASE_TTL")
    parser.add_argument("--heartbeat", type=float, default=0.5, help="(e) DURABLE_HEARTBEAT_INTERVAL")
    parser.add_argument("--bare-consumers", type=int, default=1,
                        help="push consumers of the bare stream, each on its share of the fire subjects "
                             f"(default 1, like durable's one queue-group consumer; {PARTITIONS}: one per partition)")
    parser.add_argument("--tap", action="store_true",
                        help="also subscribe to durable's fire deliveries, to split lateness into NATS and worker "
                             "(an extra subscriber: it perturbs the run and may fall behind at high rates)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    args = parser.parse_args()
    defaults = {"single": (20, 5), "burst": (10_000, 1_000), "spread": (100_000, 10_000),
                "spread_seconds": (60.0, 20.0)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    tmp = Path(tempfile.mkdtemp(prefix="durable-alarms-"))
    tmp.chmod(0o755)  # Postgres runs as a user of its own when the bench runs as root
    try:
        asyncio.run(main(args, tmp))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
