"""Memory at scale: bytes per live idle object, and 1,000,000 distinct objects through one worker
with its resident memory bounded by eviction.

    .venv/bin/python bench/bench_scale.py [--objects 1000000] [--live 50000] [--idle-timeout 10]

Starts its own nats-server and PostgreSQL (embedded) and one `durable worker` process (the
shipped Counter of durable.toml), then:

(1) bytes per live idle object: the worker's resident memory (VmRSS) before and after touching
    ``--live`` distinct counters once each with eviction out of reach (idle timeout 600 s), over
    the count of live objects the worker reports on /metrics;
(2) the curve: a fresh worker with ``--idle-timeout`` touches ``--objects`` distinct counters
    (one increment each, 64 in flight); every few seconds it prints objects touched, live
    objects, resident memory. Bounded means the resident memory levels off once eviction keeps
    pace (live objects ~ rate x idle timeout), rather than growing with the objects touched.
Afterwards it checks that every increment is stored (one row per counter, value 1).
Bytes per idle WebSocket are measured by bench/bench_ws.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
#: `durable worker` refuses the development id secret: the bench's processes share this one
os.environ.setdefault("DURABLE_ID_SECRET", "durable-bench-id-secret")
sys.path.insert(0, str(ROOT))

from durable.client import Client, Env  # noqa: E402
from durable.core.config import load_config  # noqa: E402
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from durable.core.settings import Settings  # noqa: E402

PARTITIONS = 256
HEALTH_PORT = 19391
INFLIGHT = 64


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _get(path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}{path}", timeout=5) as response:
        return response.status, response.read().decode()


async def live_objects() -> int:
    """The worker's live instances, from its /metrics."""
    _, text = await asyncio.to_thread(_get, "/metrics")
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("durable_live_objects")))


async def start_worker(ns: EmbeddedNats, pg: EmbeddedPostgres, idle_timeout: float) -> asyncio.subprocess.Process:
    env = {**os.environ, "DURABLE_NATS_URL": ns.url, "DURABLE_DATABASE_URL": pg.url,
           "DURABLE_PARTITIONS": str(PARTITIONS), "DURABLE_CONFIG_FILE": str(ROOT / "durable.toml"),
           "DURABLE_IDLE_TIMEOUT": str(idle_timeout), "DURABLE_HEALTH_PORT": str(HEALTH_PORT),
           "DURABLE_HEALTH_HOST": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "durable.cli", "worker", env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while line := await proc.stdout.readline():
            if b"started" in line:
                break
    for _ in range(200):  # /readyz: every partition owned and served
        try:
            if (await asyncio.to_thread(_get, "/readyz"))[0] == 200:
                return proc
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("worker not ready")


async def stop_worker(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


async def touch(env: Env, prefix: str, count: int, progress: list[int]) -> None:
    """One increment on each of ``count`` distinct counters, INFLIGHT at a time."""
    counters = env.COUNTERS
    next_index = 0

    async def runner() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            await counters.get_by_name(f"{prefix}{i}").increment()
            progress[0] += 1

    await asyncio.gather(*(runner() for _ in range(INFLIGHT)))


async def main(args: argparse.Namespace, tmp: Path) -> None:
    async with EmbeddedNats(tmp / "nats", partitions=PARTITIONS) as ns, EmbeddedPostgres(tmp / "pg") as pg:
        settings = Settings(nats_url=ns.url, database_url=pg.url, partitions=PARTITIONS,
                            config_file=ROOT / "durable.toml", request_timeout=30, retry_deadline=30)
        client = await Client.connect(settings, load_config(settings.config_file))
        env = Env(client, client.config)  # type: ignore[arg-type]
        try:
            # (1) bytes per live idle object
            worker = await start_worker(ns, pg, 600)
            await touch(env, "warm", 2000, [0])  # code paths, pools and caches warmed
            await asyncio.sleep(1)
            before_live, before = await live_objects(), rss_bytes(worker.pid)
            await touch(env, "live", args.live, [0])
            await asyncio.sleep(2)
            after_live, after = await live_objects(), rss_bytes(worker.pid)
            per_object = (after - before) / max(1, after_live - before_live)
            await stop_worker(worker)
            print(f"(1) {after_live - before_live:,} live idle Counters: worker RSS {before / 2**20:.1f} -> "
                  f"{after / 2**20:.1f} MiB: {per_object:,.0f} bytes per live idle object", flush=True)

            # (2) one million distinct objects through one worker, eviction after --idle-timeout
            worker = await start_worker(ns, pg, args.idle_timeout)
            progress = [0]
            started = time.monotonic()
            load = asyncio.create_task(touch(env, "m", args.objects, progress))
            print(f"\n(2) {args.objects:,} distinct Counters, one increment each, {INFLIGHT} in flight, "
                  f"DURABLE_IDLE_TIMEOUT={args.idle_timeout:g}s")
            print(f"{'s':>6} {'touched':>10} {'per s':>8} {'live':>8} {'RSS MiB':>8}")
            peak = 0
            last_touched, last_t = 0, started
            while not load.done():
                await asyncio.sleep(args.every)
                now = time.monotonic()
                rss = rss_bytes(worker.pid)
                peak = max(peak, rss)
                rate = (progress[0] - last_touched) / (now - last_t)
                last_touched, last_t = progress[0], now
                print(f"{now - started:6.0f} {progress[0]:>10,} {rate:>8,.0f} {await live_objects():>8,} "
                      f"{rss / 2**20:>8.1f}", flush=True)
            await load
            elapsed = time.monotonic() - started
            await asyncio.sleep(args.idle_timeout + 6)  # the last ones evicted too
            idle_rss, idle_live = rss_bytes(worker.pid), await live_objects()
            await stop_worker(worker)
            conn = await asyncpg.connect(pg.url)
            try:
                rows = await conn.fetchval("SELECT count(*) FROM do_storage WHERE namespace = 'Counter'")
            finally:
                await conn.close()
            print(f"{args.objects:,} objects in {elapsed:.0f}s ({args.objects / elapsed:,.0f}/s); peak RSS "
                  f"{peak / 2**20:.1f} MiB; {args.idle_timeout + 6:g}s after the last: {idle_live:,} live, RSS "
                  f"{idle_rss / 2**20:.1f} MiB; {rows:,} Counter rows stored (expected "
                  f"{args.objects + args.live + 2000:,})")
        finally:
            await client.close()
    print(f"(cpu: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--live", type=int, default=50_000, help="(1) live idle objects measured")
    parser.add_argument("--idle-timeout", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=5.0, help="(2) seconds between samples")
    tmp = Path(tempfile.mkdtemp(prefix="durable-scale-"))
    try:
        asyncio.run(main(parser.parse_args(), tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
