"""Workers for tests: the type of the ``start_worker`` fixture (in-process workers), and
`durable worker` processes for tests that kill or pause them."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from durable.core.settings import Settings
from durable.objects import Worker

from .settings import ROOT, worker_env

WorkerFactory = Callable[..., Awaitable[Worker]]


class WorkerProcess:
    """A `durable worker` in its own process, for tests that kill or pause it."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return worker_env(self.settings)

    async def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "durable.cli", "worker"], env=self.env(),
                                     stdout=log, stderr=log, cwd=ROOT)
        log.close()
        await wait_until_partitions_owned(self.settings, timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(15)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


async def wait_until_partitions_owned(settings: Settings, timeout: float) -> None:
    """Until every partition has an owner holding its advisory lock (as seen in pg_locks)."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(settings.database_url)
    try:
        while time.monotonic() < deadline:
            try:
                held = await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid = $1 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    settings.deployment_key,
                )
            except asyncpg.UndefinedTableError:
                held = 0
            if held >= settings.partitions:
                await asyncio.sleep(0.2)  # subscriptions follow the lock within one flush
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise TimeoutError(f"partitions not owned within {timeout}s")
