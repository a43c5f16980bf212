"""Events through the transactional outbox, as ratios to the same increments without events.

    .venv/bin/python bench/bench_events.py [--seconds 3] [--rounds 3]

Starts its own nats-server and PostgreSQL (embedded) and a `durable worker` process with two
classes (bench/event_objects.py): ``PlainCounter.increment`` (a read and a put) and
``EmittingCounter.increment`` (the same, plus ``ctx.emit("incremented", {...})``). Nobody
subscribes to the events: this is the cost of an event nobody listens to yet (the stream keeps it).

For each load (one hot object; 1,000 objects), at 64 increments in flight, each round measures
plain increments, then emitting increments, then waits until the outbox is empty (every event
acknowledged by the stream). Figures (median of the rounds):

- ``increments/s``: replies per second (each reply waited for its commit);
- ``events/s through``: events of the emitting run divided by the time from its start until the
  last of them was in the stream (the publisher's lag included);
- ratios to the plain increments of the same round.
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
CONFIG = ROOT / "bench" / "durable.bench-events.toml"
#: `durable worker` refuses the development id secret: the bench's processes share this one
os.environ.setdefault("DURABLE_ID_SECRET", "durable-bench-id-secret")
sys.path.insert(0, str(ROOT))

from durable.client import Client, Env  # noqa: E402
from durable.core.config import load_config  # noqa: E402
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from durable.core.settings import Settings  # noqa: E402

from bench.bench_counter import run_for  # noqa: E402

PARTITIONS = 256
INFLIGHT = 64


async def drained(conn: asyncpg.Connection, timeout: float = 300) -> float:
    """Wait until the outbox is empty; returns when (perf_counter) it was seen empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM do_outbox)"):
            return time.perf_counter()
        await asyncio.sleep(0.005)
    raise TimeoutError("the outbox did not drain")


async def wait_line(proc: asyncio.subprocess.Process, text: str, timeout: float = 30) -> None:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while line := await proc.stdout.readline():
            if text in line.decode(errors="replace"):
                return
    raise RuntimeError(f"process exited before printing {text!r}")


async def main(tmp: Path, seconds: float, rounds: int) -> None:
    async with EmbeddedNats(tmp / "nats", partitions=PARTITIONS) as ns, EmbeddedPostgres(tmp / "pg") as pg:
        settings = Settings(nats_url=ns.url, database_url=pg.url, partitions=PARTITIONS, config_file=CONFIG,
                            idle_timeout=600)
        env_vars = {**os.environ, "DURABLE_NATS_URL": ns.url, "DURABLE_DATABASE_URL": pg.url,
                    "DURABLE_PARTITIONS": str(PARTITIONS), "DURABLE_CONFIG_FILE": str(CONFIG),
                    "DURABLE_IDLE_TIMEOUT": "600", "PYTHONPATH": str(ROOT)}
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "durable.cli", "worker", env=env_vars, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            await wait_line(worker, "started")
            client = await Client.connect(settings, load_config(CONFIG))
            env = Env(client, client.config)  # type: ignore[arg-type]
            conn = await asyncpg.connect(pg.url)
            nc = await nats.connect(ns.url)
            loads = {
                "1 hot object": ([env.PLAIN.get_by_name("hot")], [env.EMITTING.get_by_name("hot")]),
                "1,000 objects": ([env.PLAIN.get_by_name(f"c{i}") for i in range(1000)],
                                  [env.EMITTING.get_by_name(f"c{i}") for i in range(1000)]),
            }
            emitted = 0
            results: list[tuple[str, float, float, float, float, float]] = []
            for label, (plain, emitting) in loads.items():
                def increment(stubs: list[object]) -> Callable[[int], Awaitable[object]]:
                    return lambda i: stubs[i % len(stubs)].increment()  # type: ignore[attr-defined,no-any-return]

                # warm-up: every object live in the worker, both paths exercised
                emitted += (await run_for(increment(emitting), INFLIGHT, 0.5))[0]
                await run_for(increment(plain), INFLIGHT, 0.5)
                await drained(conn)
                plain_rates, emit_rates, through_rates = [], [], []
                for _ in range(rounds):
                    n, took = await run_for(increment(plain), INFLIGHT, seconds)
                    plain_rates.append(n / took)
                    started = time.perf_counter()
                    n, took = await run_for(increment(emitting), INFLIGHT, seconds)
                    emitted += n
                    emit_rates.append(n / took)
                    through_rates.append(n / (await drained(conn) - started))
                p, e, t = (statistics.median(x) for x in (plain_rates, emit_rates, through_rates))
                results.append((label, p, e, e / p, t, t / p))

            info = await nc.jetstream().stream_info(settings.events_stream)
            print(f"\n{'load (64 in flight)':<16} {'plain inc/s':>12} {'emit inc/s':>11} {'ratio':>7} "
                  f"{'events/s through':>17} {'ratio':>7}")
            for label, p, e, er, t, tr in results:
                print(f"{label:<16} {p:>12,.0f} {e:>11,.0f} {er * 100:6.1f}% {t:>17,.0f} {tr * 100:6.1f}%")
            print(f"\n(sanity: {emitted:,} events emitted, {info.state.messages:,} in the stream; 1 worker "
                  f"process; cpu: {os.cpu_count()} cores; median of {rounds} rounds of {seconds:g}s; "
                  "ratios against the plain increments of the same load)")
            await client.close()
            await nc.close()
            await conn.close()
        finally:
            if worker.returncode is None:
                worker.terminate()
            await asyncio.wait_for(worker.wait(), 15)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median reported)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="durable-bench-events-"))
    tmp.chmod(0o755)  # Postgres runs as a user of its own when the bench runs as root
    try:
        asyncio.run(main(tmp, args.seconds, args.rounds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
