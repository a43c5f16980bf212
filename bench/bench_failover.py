"""Failover time after kill -9 and after SIGSTOP of the worker that owns the objects being called.

    .venv/bin/python bench/bench_failover.py [--trials 10] [--lease-ttl 3] [--heartbeat 0.5]

Starts its own nats-server and PostgreSQL (embedded) and three `durable worker` processes, with a
light background load of increments. Each trial picks a victim (the workers in turn), four
probe objects in partitions it owns and one caller per probe object calling increment() back to
back (request timeout 0.5 s; calls that meet no responder are retried, as always). Then it kills
the victim (-9) or stops it (SIGSTOP), and measures, from the fault:

- failover: until every probe object has answered a call made after the fault (and "first":
  until the first of them did);
- re-acquired: until the last of the victim's partitions had a new owner (do_partitions);
and, for SIGSTOP, the share of calls that still timed out in the 1.5 s after failover (the paused
worker keeps its queue-group subscriptions until NATS drops its connection).
The victim is then restarted (kill) or resumed (SIGSTOP) and the workers rebalance before the
next trial. Figures are seconds, median and max over the trials; they are bounded by the lease
(SIGSTOP) and the heartbeat interval (kill -9), so the settings are printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import nats

ROOT = Path(__file__).resolve().parents[1]
#: `durable worker`/`gateway` refuse the development id secret: the bench's processes share this one
os.environ.setdefault("DURABLE_ID_SECRET", "durable-bench-id-secret")
sys.path.insert(0, str(ROOT))

from durable.client import Client, Env  # noqa: E402
from durable.client.namespace import Stub  # noqa: E402
from durable.core.config import load_config  # noqa: E402
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from durable.core.settings import Settings  # noqa: E402
from durable.core.wire import partition_of  # noqa: E402

from tests.helpers.faults import ClusterWorker, Load, owners, wait_balanced  # noqa: E402

PARTITIONS = 256
PROBES = 4


@dataclass
class Probe:
    stub: Stub
    #: (issued, completed, ok) of every call
    calls: list[tuple[float, float, bool]] = field(default_factory=list)


async def probe_loop(probe: Probe, stop: asyncio.Event) -> None:
    while not stop.is_set():
        issued = time.monotonic()
        try:
            await probe.stub.increment()
            ok = True
        except Exception:  # noqa: BLE001 - a timeout or a reset: the call failed
            ok = False
            await asyncio.sleep(0.01)
        probe.calls.append((issued, time.monotonic(), ok))


def probe_names(env: Env, partitions: set[int], count: int, tag: str) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        name = f"probe-{tag}-{i}"
        if partition_of(env.COUNTERS.id_from_name(name).hex, PARTITIONS) in partitions:
            out.append(name)
        i += 1
    return out


@dataclass
class Trial:
    failover: float
    first: float
    reacquired: float
    stale_share: float | None


async def run_trial(kind: str, n: int, victim: ClusterWorker, env: Env, conn: asyncpg.Connection,
                    nats_url: str) -> Trial:
    before = await owners(conn)
    mine = {p for p, (_, o) in before.items() if o == victim.worker_id}
    probes = [Probe(env.COUNTERS.get_by_name(name)) for name in probe_names(env, mine, PROBES, f"{kind}-{n}")]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(probe_loop(p, stop)) for p in probes]
    await asyncio.sleep(0.5)
    fault_db = await conn.fetchval("SELECT clock_timestamp()")
    fault = time.monotonic()
    if kind == "kill -9":
        await victim.kill9()
    else:
        victim.pause()
    # failover: every probe object answered a call made after the fault
    while not all(any(ok and issued >= fault for issued, _, ok in p.calls) for p in probes):
        if time.monotonic() - fault > 60:
            raise TimeoutError(f"{kind}: no failover within 60 s")
        await asyncio.sleep(0.005)
    recovered = time.monotonic()
    answered = [min(done for issued, done, ok in p.calls if ok and issued >= fault) - fault for p in probes]
    stale_share = None
    if kind == "SIGSTOP":
        await asyncio.sleep(1.5)
        window = [ok for p in probes for issued, _, ok in p.calls if recovered <= issued]
        stale_share = window.count(False) / max(1, len(window))
    stop.set()
    await asyncio.gather(*tasks)
    while True:  # until every partition of the victim has a new owner
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE acquired_at > $2) AS n, max(acquired_at) AS last "
            "FROM do_partitions WHERE partition = ANY($1::int[])", sorted(mine), fault_db)
        if row["n"] == len(mine):
            break
        await asyncio.sleep(0.05)
    last_acquired = row["last"]
    if kind == "kill -9":
        await victim.start(nats_url)
    else:
        victim.resume()
    return Trial(max(answered), min(answered), (last_acquired - fault_db).total_seconds(), stale_share)


def report(kind: str, trials: list[Trial]) -> None:
    f = [t.failover for t in trials]
    r = [t.reacquired for t in trials]
    first = [t.first for t in trials]
    print(f"{kind:<8} failover    median {statistics.median(f):5.2f}s  max {max(f):5.2f}s   "
          f"(trials: {' '.join(f'{x:.2f}' for x in f)})")
    print(f"{'':<8} first       median {statistics.median(first):5.2f}s  max {max(first):5.2f}s")
    print(f"{'':<8} re-acquired median {statistics.median(r):5.2f}s  max {max(r):5.2f}s")
    shares = [t.stale_share for t in trials if t.stale_share is not None]
    if shares:
        print(f"{'':<8} calls timing out in the 1.5 s after failover (paused worker still subscribed): "
              f"median {statistics.median(shares):.0%}, max {max(shares):.0%}")


async def main(tmp: Path, trials: int, lease_ttl: float, heartbeat: float) -> None:
    async with EmbeddedNats(tmp / "nats", partitions=PARTITIONS) as ns, EmbeddedPostgres(tmp / "pg") as pg:
        settings = Settings(nats_url=ns.url, database_url=pg.url, partitions=PARTITIONS,
                            config_file=ROOT / "durable.toml", idle_timeout=600, lease_ttl=lease_ttl,
                            heartbeat_interval=heartbeat, request_timeout=0.5, retry_deadline=30)
        config = load_config(settings.config_file)
        workers = [ClusterWorker(f"w{i}", settings, tmp, audit=False) for i in range(3)]
        conn = await asyncpg.connect(pg.url)
        clients: list[Client] = []
        load: Load | None = None
        try:
            await asyncio.gather(*(w.start() for w in workers))
            await wait_balanced(pg.url, settings, [w.worker_id for w in workers], 60)
            for _ in range(2):
                clients.append(Client(await nats.connect(ns.url, max_reconnect_attempts=-1), settings, config))
            load = Load(clients[1:], config, [f"background-{i}" for i in range(100)], per_client=4, pace=0.005)
            load.start()
            env = Env(clients[0], config)
            results: dict[str, list[Trial]] = {"kill -9": [], "SIGSTOP": []}
            for kind, found in results.items():
                for n in range(trials):
                    victim = workers[n % len(workers)]
                    found.append(await run_trial(kind, n, victim, env, conn, ns.url))
                    print(f"  {kind} trial {n + 1}: failover {found[-1].failover:.2f}s", flush=True)
                    await wait_balanced(pg.url, settings, [w.worker_id for w in workers], 60)
            await load.stop()
            print(f"\nfailover of the objects of one of 3 workers under load (P={PARTITIONS}, lease_ttl "
                  f"{lease_ttl}s, heartbeat {heartbeat}s, {trials} trials each)")
            for kind, found in results.items():
                report(kind, found)
            print(f"(background load: {load.tally.total_acked} increments acknowledged of "
                  f"{load.tally.total_attempted}; errors {dict(load.tally.errors)})")
        finally:
            if load is not None:
                await load.stop()
            for c in clients:
                await c.nc.close()
            await conn.close()
            for w in workers:
                w.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10, help="trials of each fault")
    parser.add_argument("--lease-ttl", type=float, default=3.0, help="DURABLE_LEASE_TTL of the workers")
    parser.add_argument("--heartbeat", type=float, default=0.5, help="DURABLE_HEARTBEAT_INTERVAL")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="durable-failover-"))
    tmp.chmod(0o755)  # Postgres runs as a user of its own when the bench runs as root
    try:
        asyncio.run(main(tmp, args.trials, args.lease_ttl, args.heartbeat))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the servers' data
