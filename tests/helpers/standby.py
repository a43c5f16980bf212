"""A Postgres primary with a synchronous streaming-replication standby, on loopback, for the
test that loses the primary.

Both are :class:`durable.core.embedded.EmbeddedPostgres` servers with data directories of their
own: the primary is initdb'd and started; the standby is a ``pg_basebackup`` of it (``-R``
writes ``standby.signal`` and ``primary_conninfo``), started as a hot standby; then the primary
is made to wait for it on every commit (``synchronous_standby_names``, with the
``synchronous_commit=on`` every embedded server runs with), so a commit acknowledged to a
worker has been flushed to the standby's WAL. The setting is made with ALTER SYSTEM on the
primary *after* the base backup, so the standby does not inherit it: promoted, it must not wait
for a standby of its own that does not exist.

:meth:`ReplicatedPostgres.kill_primary` kills the primary's postmaster and every process of it
(a lost machine, not a crashed postmaster whose backends linger), and
:meth:`promote` is ``SELECT pg_promote()`` on the standby (``pg_ctl promote`` refuses to run as
root). Both servers are stopped by PID at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import asyncpg
from durable.core.embedded import EmbeddedPostgres, _spawn_attempts, free_port

#: matches every standby: the pair has one, and its name does not matter
SYNC_STANDBYS = "*"


def _children(parent: int) -> set[int]:
    """The processes whose parent is ``parent`` (from /proc/<pid>/stat)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:  # field 4: the parent's pid
            found.add(int(entry.name))
    return found


def _signal_server(postmaster: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a postmaster and every process of it (backends, walsender/walreceiver,
    startup...). Postgres puts each child in a process group of its own (setsid), so a signal to
    the postmaster's group reaches the postmaster only. The postmaster is stopped first, so it
    forks no backend while its children are looked for (one forked meanwhile would go on
    serving: a primary half alive)."""
    os.kill(postmaster, signal.SIGSTOP)
    signalled: set[int] = set()
    while fresh := _children(postmaster) - signalled:
        for pid in fresh:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        signalled |= fresh
    os.kill(postmaster, sig)


class ReplicatedPostgres:
    """A primary and its synchronous standby, each an :class:`EmbeddedPostgres`."""

    def __init__(self, base_dir: Path) -> None:
        base_dir.mkdir(parents=True, exist_ok=True)
        base_dir.chmod(0o755)  # as dedicated_postgres: the servers may run as another user
        self.base_dir = base_dir
        self.primary = EmbeddedPostgres(base_dir / "primary")
        self.standby = EmbeddedPostgres(base_dir / "standby")

    def url(self, database: str = "postgres") -> str:
        """The libpq multi-host URL naming both servers, primary first: a connection goes to
        whichever of them accepts writes (``target_session_attrs=read-write``)."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def server_url(self, server: EmbeddedPostgres, database: str) -> str:
        """A URL naming ``server`` alone (to look at one of the two whatever the other does)."""
        return f"postgresql://postgres@127.0.0.1:{server.port}/{database}"

    async def start(self, timeout: float = 60.0) -> None:
        await self.primary.start(timeout)
        await asyncio.to_thread(self._base_backup)
        await self.standby.start(timeout)
        conn = await asyncpg.connect(self.primary.url)
        try:
            await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{SYNC_STANDBYS}'")
            await conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + timeout
            while await conn.fetchval("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") < 1:
                assert time.monotonic() < deadline, "the standby never became synchronous"
                await asyncio.sleep(0.05)
            # the reload reached this session as well: its commits wait for the standby
            assert await conn.fetchval("SHOW synchronous_standby_names") == SYNC_STANDBYS
        finally:
            await conn.close()

    def _base_backup(self) -> None:
        """``pg_basebackup`` of the running primary into the standby's data directory, run as
        the user Postgres runs as (under root: in a user namespace, see embedded.py)."""
        # retried as embedded.py retries its own programs: the child's set-up before exec fails
        # once in a while on a busy machine (CI lost this fixture to it once)
        for attempt in _spawn_attempts():
            with attempt:
                result = subprocess.run(
                    [self.primary._bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary.port),
                     "-U", "postgres", "-D", str(self.standby.data_dir), "-X", "stream", "-R", "--checkpoint=fast",
                     "--no-sync"],
                    capture_output=True, stdin=subprocess.DEVNULL, timeout=120,
                    **self.primary._run_as(signal.SIGKILL),  # type: ignore[call-overload]
                )
        if result.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed (exit {result.returncode}):\n"
                               f"{(result.stderr or result.stdout).decode(errors='replace')[-2000:]}")
        assert (self.standby.data_dir / "standby.signal").exists()

    async def in_recovery(self, server: EmbeddedPostgres) -> bool:
        conn = await asyncpg.connect(server.url, timeout=5)
        try:
            return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
        finally:
            await conn.close()

    async def kill_primary(self) -> None:
        """kill -9 of the primary's postmaster and all its processes at once: a lost machine, not a
        crashed postmaster whose backends linger until they notice."""
        proc, self.primary.process = self.primary.process, None
        assert proc is not None and proc.poll() is None, "the primary is not running"
        _signal_server(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)

    def freeze_primary(self) -> None:
        """SIGSTOP every process of the primary: connections to it are still accepted by the
        kernel but nothing answers, as with a hung machine or a network partition (a client
        waits for its timeout, where a killed one is refused at once). :meth:`kill_primary`
        ends it."""
        assert self.primary.process is not None and self.primary.process.poll() is None
        _signal_server(self.primary.process.pid, signal.SIGSTOP)

    async def cut_standby(self, timeout: float = 30.0) -> None:
        """Cut the standby off from the primary (its walreceiver is pointed at a port nobody
        listens on, and reconnects there): it falls behind from now on, and with synchronous
        replication every commit on the primary waits. (A SIGSTOP'd standby would not do: the
        WAL sent meanwhile waits in its socket buffer and is read on SIGCONT.) Returns once the
        primary has no standby connected."""
        standby = await asyncpg.connect(self.standby.url, timeout=5)
        try:
            await standby.execute(f"ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={free_port()} "
                                  "user=postgres connect_timeout=1'")
            await standby.execute("SELECT pg_reload_conf()")  # restarts the walreceiver
        finally:
            await standby.close()
        primary = await asyncpg.connect(self.primary.url, timeout=5)
        try:
            deadline = time.monotonic() + timeout
            while await primary.fetchval("SELECT count(*) FROM pg_stat_replication"):
                assert time.monotonic() < deadline, "the standby is still connected"
                await asyncio.sleep(0.02)
        finally:
            await primary.close()

    async def promote(self, timeout: int = 60) -> None:
        """Promote the standby; returns once it accepts writes."""
        conn = await asyncpg.connect(self.standby.url, timeout=5)
        try:
            assert await conn.fetchval("SELECT pg_promote(true, $1)", timeout), "promotion did not complete"
        finally:
            await conn.close()

    async def stop(self) -> None:
        if self.primary.process is not None:  # a frozen primary must hear the shutdown
            _signal_server(self.primary.process.pid, signal.SIGCONT)
        await asyncio.gather(self.primary.stop(), self.standby.stop())

    async def __aenter__(self) -> ReplicatedPostgres:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
