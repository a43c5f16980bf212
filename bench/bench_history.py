"""The write cost of the change history (infra/migrations/005_history.sql), as a ratio in one run.

    .venv/bin/python bench/bench_history.py [--seconds 2] [--rounds 5]

Starts its own PostgreSQL (embedded), applies the schema, and commits do_flush() calls (what a
worker's group commit sends) back to back on one connection, with the history on and off for
that session (``SET durable.history``, what DURABLE_HISTORY=false does on the worker's pool).
The two are measured in alternating rounds, so machine noise hits both alike; the medians and
their ratio are printed for flush shapes seen in practice: one object writing one key (an
increment at one request in flight), 64 objects one key each (a group commit under load), and
one object writing 64 keys. The end-to-end figure (bench_counter.py) is too noisy on a shared
machine to see a difference of this size; this one isolates it.
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
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from durable.core import db  # noqa: E402
from durable.core.embedded import EmbeddedPostgres  # noqa: E402
from durable.objects.pending import Batch  # noqa: E402
from durable.objects.sql import ObjectStore, Owner, flush_rows  # noqa: E402

PARTITIONS = 16


def batches(objects: int, keys: int, n: int) -> list[tuple[Owner, Batch]]:
    value = b"\xcd" + n.to_bytes(2, "big", signed=False)  # a msgpack uint16, like a counter
    return [(Owner(f"{o:064x}", "Counter", o % PARTITIONS, 1),
             Batch(False, {f"k{k}".encode(): value for k in range(keys)}, False, None, {}, n))
            for o in range(objects)]


async def flushes_per_second(store: ObjectStore, objects: int, keys: int, seconds: float) -> float:
    count = 0
    stop_at = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < stop_at:
        ok = await store.flush(flush_rows(batches(objects, keys, count % 60000)))
        assert len(ok) > 0
        count += 1
    return count / (time.perf_counter() - start)


async def main(tmp: Path, seconds: float, rounds: int) -> None:
    async with EmbeddedPostgres(tmp / "pg") as pg:
        setup = await asyncpg.connect(pg.url)
        await db.apply_schema(setup, PARTITIONS)
        await setup.execute("UPDATE do_partitions SET epoch = 1")
        pools = {}
        for on in (True, False):
            pools[on] = await asyncpg.create_pool(pg.url, min_size=1, max_size=1,
                                                  server_settings=None if on else {"durable.history": "off"})
        print(f"{'flush shape':<34} {'history off':>12} {'history on':>12} {'on / off':>9}")
        for label, objects, keys in (("1 object, 1 key", 1, 1), ("64 objects, 1 key each", 64, 1),
                                     ("1 object, 64 keys", 1, 64)):
            rates: dict[bool, list[float]] = {True: [], False: []}
            ratios: list[float] = []
            for r in range(rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                got = {}
                for on in order:
                    got[on] = await flushes_per_second(ObjectStore(pools[on]), objects, keys, seconds)
                    rates[on].append(got[on])
                ratios.append(got[True] / got[False])
            off, on = statistics.median(rates[False]), statistics.median(rates[True])
            print(f"{label:<34} {off:>10,.0f}/s {on:>10,.0f}/s {statistics.median(ratios) * 100:>8.1f}%")
        rows = await setup.fetchval("SELECT count(*) FROM do_history")
        size = await setup.fetchval("SELECT pg_size_pretty(pg_total_relation_size('do_history'))")
        storage = await setup.fetchval("SELECT pg_size_pretty(pg_total_relation_size('do_storage'))")
        print(f"\n(history rows written: {rows:,}, {size} with indexes; do_storage {storage}; cpu: "
              f"{os.cpu_count()} cores; medians of {rounds} alternating rounds of {seconds:g} s; flushes "
              "per second on one connection, each one do_flush() transaction)")
        for pool in pools.values():
            await pool.close()
        await setup.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per figure (median reported)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="durable-bench-history-"))
    tmp.chmod(0o755)  # Postgres runs as a user of its own when the bench runs as root
    try:
        asyncio.run(main(tmp, args.seconds, args.rounds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
