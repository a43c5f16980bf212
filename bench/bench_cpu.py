"""CPU time per request of each process (client, worker, echo, nats-server, Postgres), from /proc.

    .venv/bin/python bench/bench_cpu.py [--inflight 64] [--seconds 3]

Where the time of a request goes: the bare echo, an RPC without writes, durable increments over
1,000 objects and on one hot object. A figure is CPU microseconds per request of one process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats

ROOT = Path(__file__).resolve().parents[1]
#: `durable worker`/`gateway` refuse the development id secret: the bench's processes share this one
os.environ.setdefault("DURABLE_ID_SECRET", "durable-bench-id-secret")
sys.path.insert(0, str(ROOT))

from durable.client import Client, Env  # noqa: E402
from durable.core.config import load_config  # noqa: E402
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from durable.core.settings import Settings  # noqa: E402


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"postgres" in (entry / "cmdline").read_bytes():
                    total += cpu_seconds(int(entry.name))
            except OSError:
                pass
    return total


async def main(tmp: Path, inflight: int, seconds: float) -> None:
    async with EmbeddedNats(tmp / "nats") as ns, EmbeddedPostgres(tmp / "pg") as pg:
        env = {**os.environ, "DURABLE_NATS_URL": ns.url, "DURABLE_DATABASE_URL": pg.url,
               "DURABLE_CONFIG_FILE": str(ROOT / "durable.toml"), "PYTHONPATH": str(ROOT)}
        worker = await asyncio.create_subprocess_exec(sys.executable, "-m", "durable.cli", "worker", env=env,
                                                      stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        echo = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "bench" / "echo_server.py"), ns.url,
                                                    stdout=asyncio.subprocess.PIPE)
        assert worker.stdout is not None and echo.stdout is not None
        await worker.stdout.readline()
        await echo.stdout.readline()
        settings = Settings(nats_url=ns.url, database_url=pg.url, config_file=ROOT / "durable.toml")
        client = await Client.connect(settings, load_config(settings.config_file))
        counters = Env(client, client.config).COUNTERS  # type: ignore[arg-type]
        nc = await nats.connect(ns.url)
        many = [counters.get_by_name(f"c{i}") for i in range(1000)]
        for stub in many:
            await stub.get()
        ops: dict[str, Callable[[int], Awaitable[object]]] = {
            "bare echo": lambda i: nc.request("bench.echo", b"\x81\xa4args\x91\x01", timeout=5),
            "rpc read": lambda i: many[0].get(),
            "write 1000": lambda i: many[i % 1000].increment(),
            "write hot": lambda i: many[0].increment(),
        }
        print(f"{'':12} {'req/s':>8}  CPU us per request: {'client':>7} {'worker':>7} {'echo':>6} "
              f"{'nats':>6} {'pg':>6}")
        for label, op in ops.items():
            count = 0
            stop_at = time.monotonic() + seconds

            async def run(i: int, op: Callable[[int], Awaitable[object]] = op, stop_at: float = stop_at) -> None:
                nonlocal count
                while time.monotonic() < stop_at:
                    await op(i)
                    i += inflight
                    count += 1

            def sample() -> list[float]:
                return [time.process_time(), cpu_seconds(worker.pid), cpu_seconds(echo.pid),
                        cpu_seconds(ns.pid or 0), postgres_cpu_seconds()]

            before = sample()
            await asyncio.gather(*(run(i) for i in range(inflight)))
            per = [(a - b) / count * 1e6 for a, b in zip(sample(), before, strict=True)]
            print(f"{label:12} {count / seconds:8.0f}  {'':20} {per[0]:7.0f} {per[1]:7.0f} {per[2]:6.0f} "
                  f"{per[3]:6.0f} {per[4]:6.0f}")
        worker.terminate()
        echo.terminate()
        await asyncio.wait_for(worker.wait(), 10)
        await asyncio.wait_for(echo.wait(), 10)
        await client.close()
        await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="durable-cpu-"))
    tmp.chmod(0o755)  # Postgres runs as a user of its own when the bench runs as root
    try:
        asyncio.run(main(tmp, args.inflight, args.seconds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the servers' data
