"""Counter throughput through the full path, as ratios to the bare hardware path of this run.

    .venv/bin/python bench/bench_counter.py [--seconds 3]

Starts its own nats-server and PostgreSQL (embedded), a bare nats-py echo responder and a
`durable worker`, each in its own process, then drives them from this process:

- bare nats-py request/reply echo (the baseline), bare asyncpg commits (one upsert per commit);
- RPC without writes (Counter.get) on one hot object;
- durable increments on one hot object, and spread over 1,000 objects;
each at 1 and 64 requests in flight. Figures are requests/s and the ratio to the bare echo at
the same concurrency, measured right before the figure in each round (median of the rounds).
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
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import nats

ROOT = Path(__file__).resolve().parents[1]
#: `durable worker`/`gateway` refuse the development id secret: the bench's processes share this one
os.environ.setdefault("DURABLE_ID_SECRET", "durable-bench-id-secret")
sys.path.insert(0, str(ROOT))

from durable.client import Client, Env  # noqa: E402
from durable.core.config import load_config  # noqa: E402
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from durable.core.settings import Settings  # noqa: E402

PARTITIONS = 256


async def run_for(op: Callable[[int], Awaitable[object]], inflight: int, seconds: float) -> tuple[int, float]:
    """(requests done, seconds taken) with ``inflight`` runners issuing requests back to back."""
    count = 0
    start = time.perf_counter()
    stop_at = start + seconds

    async def runner(i: int) -> None:
        nonlocal count
        n = i
        while time.perf_counter() < stop_at:
            await op(n)
            n += inflight
            count += 1

    await asyncio.gather(*(runner(i) for i in range(inflight)))
    return count, time.perf_counter() - start


async def measure(op: Callable[[int], Awaitable[object]], inflight: int, seconds: float) -> float:
    """Requests/s with `inflight` workers each issuing requests back to back for `seconds`."""
    await run_for(op, inflight, min(0.5, seconds / 4))  # warm-up
    count, took = await run_for(op, inflight, seconds)
    return count / took


async def wait_balanced(database_url: str, workers: int, timeout: float = 60) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = [r[0] for r in await conn.fetch(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE 'durable-owner:%' "
                "GROUP BY l.pid")]
            if len(counts) == workers and sum(counts) == PARTITIONS and max(counts) - min(counts) <= 1:
                return
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    raise TimeoutError("workers did not balance")


async def wait_line(proc: asyncio.subprocess.Process, text: str, timeout: float = 30) -> None:
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            while line := await proc.stdout.readline():
                if text in line.decode(errors="replace"):
                    return
    except TimeoutError:
        raise TimeoutError(text) from None
    raise RuntimeError(f"process exited before printing {text!r}")


async def stop(procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        if p.returncode is None:
            p.terminate()
        await asyncio.wait_for(p.wait(), 10)


async def main(tmp: Path, seconds: float, rounds: int, workers: int) -> None:
    procs: list[asyncio.subprocess.Process] = []
    async with EmbeddedNats(tmp / "nats", partitions=PARTITIONS) as ns, EmbeddedPostgres(tmp / "pg") as pg:
        settings = Settings(nats_url=ns.url, database_url=pg.url, partitions=PARTITIONS,
                            config_file=ROOT / "durable.toml", idle_timeout=600)
        env_vars = {**os.environ, "DURABLE_NATS_URL": ns.url, "DURABLE_DATABASE_URL": pg.url,
                    "DURABLE_PARTITIONS": str(PARTITIONS), "DURABLE_CONFIG_FILE": str(ROOT / "durable.toml"),
                    "DURABLE_IDLE_TIMEOUT": "600", "PYTHONPATH": str(ROOT)}
        try:
            echo = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "bench" / "echo_server.py"),
                                                        ns.url, stdout=asyncio.subprocess.PIPE)
            procs.append(echo)
            await wait_line(echo, "ready")
            for _ in range(workers):
                worker = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "durable.cli", "worker", env=env_vars, cwd=ROOT,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
                procs.append(worker)
                await wait_line(worker, "started")

            nc = await nats.connect(ns.url)
            payload = b"\x81\xa4args\x91\x01"  # same size as an increment request

            async def bare_echo(_: int) -> object:
                return await nc.request("bench.echo", payload, timeout=10)

            conn = await asyncpg.connect(pg.url)
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_kv (k text PRIMARY KEY, v bytea)")

            async def bare_commit(i: int) -> object:
                return await conn.execute(
                    "INSERT INTO bench_kv VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                    f"k{i % 1000}", b"12345678")

            client = await Client.connect(settings, load_config(settings.config_file))
            counters = Env(client, client.config).COUNTERS  # type: ignore[arg-type]
            hot = counters.get_by_name("hot")
            many = [counters.get_by_name(f"c{i}") for i in range(1000)]
            # wait until the workers own every partition and have balanced (no-responders and
            # refusals during hand-overs are retried meanwhile)
            await wait_balanced(pg.url, workers)
            for stub in many:
                await stub.get()

            async def rpc_read(_: int) -> object:
                return await hot.get()

            async def hot_increment(_: int) -> object:
                return await hot.increment()

            async def spread_increment(i: int) -> object:
                return await many[i % 1000].increment()

            rows: list[tuple[str, int, float, float | None]] = []
            for inflight in (1, 64):
                rows.append(("bare nats-py echo (baseline)", inflight,
                             await measure(bare_echo, inflight, seconds), 1.0))
            rows.append(("bare asyncpg commit (1 upsert/txn)", 1, await measure(bare_commit, 1, seconds), None))
            for label, op in (("RPC without writes, 1 object", rpc_read),
                              ("durable increment, 1 hot object", hot_increment),
                              ("durable increment, 1,000 objects", spread_increment)):
                for inflight in (1, 64):
                    # the machine is shared and noisy: each round measures the echo right next
                    # to the figure, and the median round is reported
                    rates, ratios = [], []
                    for _ in range(rounds):
                        echo_rate = await measure(bare_echo, inflight, seconds)
                        rate = await measure(op, inflight, seconds)
                        rates.append(rate)
                        ratios.append(rate / echo_rate)
                    rows.append((label, inflight, statistics.median(rates), statistics.median(ratios)))

            total = sum([await s.get() for s in many]) + await hot.get()
            print(f"\n{'measurement':<38} {'in flight':>9} {'req/s':>10} {'vs echo':>8}")
            for label, inflight, rate, ratio in rows:
                r = f"{ratio * 100:6.1f}%" if ratio is not None else "     -"
                print(f"{label:<38} {inflight:>9} {rate:>10,.0f} {r:>8}")
            print(f"\n(sanity: {total:,} increments stored; {workers} worker process(es); cpu: {os.cpu_count()} "
                  "cores; each figure is the "
                  f"median of {rounds} rounds of {seconds:g}s, its ratio taken against an echo measured "
                  "just before it)")
            await client.close()
            await nc.close()
            await conn.close()
        finally:
            await stop(procs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median reported)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the partitions")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="durable-bench-"))
    tmp.chmod(0o755)  # Postgres runs as a user of its own when the bench runs as root
    try:
        asyncio.run(main(tmp, args.seconds, args.rounds, args.workers))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the servers' data
