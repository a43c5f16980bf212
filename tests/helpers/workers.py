"""Workers for tests: the type of the ``start_worker`` fixture (in-process workers), and
`durable worker` processes for tests that kill or pause them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import nats
from durable.core.settings import Settings
from durable.core.wire import request_subject
from durable.objects import Worker

from .settings import ROOT, worker_env
from .waiting import assert_eventually

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
    """Until every partition has an owner holding its advisory lock (as seen in pg_locks) and
    subscribed to its subject (a request there is answered, if only with an error)."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(settings.database_url)
    try:
        async def locked() -> bool:
            try:
                held = await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid = $1 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    settings.deployment_key,
                )
            except asyncpg.UndefinedTableError:
                held = 0
            return held >= settings.partitions

        await assert_eventually(locked, timeout, "every partition locked by an owner")
    finally:
        await conn.close()
    nc = await nats.connect(settings.nats_url)
    try:
        async def subscribed() -> bool:
            for p in range(settings.partitions):
                try:
                    await nc.request(request_subject(p, "Probe", "0" * 64, "rpc.ping"), b"", timeout=2)
                except nats.errors.NoRespondersError:
                    return False
            return True

        await assert_eventually(subscribed, max(0.0, deadline - time.monotonic()), "every partition subscribed")
    finally:
        await nc.close()
