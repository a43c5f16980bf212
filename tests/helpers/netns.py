"""A multi-host network on one machine, for the partition tests: each "host" is a Linux network
namespace this test creates, joined to each of its peers by a veth pair of its own (one pair per
link), so any single link can be cut and healed while every other link keeps working.

- Addresses are private to the namespaces: link number ``k`` is 10.77.k.0/30, its two ends .1
  and .2. A host reaches a peer at the peer's address *on their shared link*
  (:meth:`Host.addr_of`), so no routing or forwarding is needed and a cut link really isolates
  that pair only. Servers listen on fixed ports (4222, 5432): each namespace has its own.
- A cut sets both ends of the link down (``ip link set ... down``). The kernel here has neither
  netem nor tc actions nor nftables/iptables, so a drop rule is not available; with the link
  down, established TCP connections see a black hole (their segments go nowhere; the peer
  never answers, no RST), and new connections fail with "network unreachable", as they would
  across a real partition with a router that knows the link is gone.
- Processes run inside a host through a ``preexec_fn`` that enters its namespace (``setns``),
  so Postgres' own user-namespace start-up (see durable.core.embedded) still works; each is
  kept by PID and gets SIGKILL when the test process dies (parent-death signal).
- The test process itself stays in the root namespace: it reaches Postgres through its Unix
  socket (file system paths are not namespaced), and NATS only through processes on hosts.
- Everything is removed at the end (:meth:`Net.close`: processes, then namespaces, which takes
  their veths with them), also when the test fails; :func:`remove_stale` removes namespaces
  left by a test process that no longer exists (``durable-<pid>-<net>-<host>``).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from durable.core.embedded import SERVER_PINGS, EmbeddedPostgres, _set_pdeathsig, nats_server_binary
from durable.core.wire import server_mapping

NS_PREFIX = "durable-"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
NATS_PORT = 4222
ROUTE_PORT = 6222
PG_PORT = 5432


def require() -> None:
    """Skip the calling test (module) when the harness cannot run here, naming why, unless
    ``DURABLE_REQUIRE_NETNS=1`` (.ci/run sets it: CI has root and iproute2), which fails instead."""
    reason = available()
    if reason is None:
        return
    if os.environ.get("DURABLE_REQUIRE_NETNS") == "1":
        pytest.fail(f"the partition harness cannot run here: {reason} (DURABLE_REQUIRE_NETNS=1)")
    pytest.skip(f"the partition harness cannot run here: {reason}")


def available() -> str | None:
    """Why the harness cannot run here, or None if it can (root, ``ip netns`` works)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    name = f"{NS_PREFIX}{os.getpid()}-probe"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def remove_stale() -> list[str]:
    """Delete the ``durable-<pid>-...`` namespaces whose creating process is gone (a test run
    that was killed); returns their names. Namespaces of live processes are left alone."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    removed = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-.+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            for pid in _pids_in(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def _pids_in(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def _enter(ns_path: str, then: Callable[[], None] | None, parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: enter the network namespace at ``ns_path``, die with ``parent``, then
    run ``then`` (Postgres' user-namespace set-up must come after: setns needs our root)."""
    def preexec() -> None:
        fd = os.open(ns_path, os.O_RDONLY)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
        finally:
            os.close(fd)
        _set_pdeathsig(signal.SIGKILL, parent)
        if then is not None:
            then()

    return preexec


@dataclass
class Link:
    """A veth pair between two hosts: ``a`` has 10.77.k.1, ``b`` has 10.77.k.2."""

    index: int
    a: Host
    b: Host
    up: bool = True

    def addr(self, host: Host) -> str:
        return f"10.77.{self.index}.{1 if host is self.a else 2}"

    def dev(self, host: Host) -> str:
        return f"l{self.index}-{(self.b if host is self.a else self.a).name}"[:15]

    def cut(self) -> None:
        """Both ends down: nothing crosses this link (other links are untouched)."""
        for h in (self.a, self.b):
            _ip("-n", h.ns, "link", "set", self.dev(h), "down")
        self.up = False

    def heal(self) -> None:
        for h in (self.a, self.b):
            _ip("-n", h.ns, "link", "set", self.dev(h), "up")
        self.up = True


@dataclass
class Host:
    """A network namespace and the processes started in it."""

    net: Net
    name: str
    links: dict[str, Link] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return f"{NS_PREFIX}{os.getpid()}-{self.net.serial}-{self.name}"

    def addr_of(self, peer: Host) -> str:
        """``peer``'s address as this host reaches it (on their link)."""
        return self.links[peer.name].addr(peer)

    def link_to(self, peer: Host) -> Link:
        return self.links[peer.name]

    def preexec(self, then: Callable[[], None] | None = None) -> Callable[[], None]:
        return _enter(f"/run/netns/{self.ns}", then, os.getpid())

    def popen(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in this host (output appended to ``log_path``); kept to be killed at the end."""
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                    cwd=cwd, start_new_session=True, preexec_fn=self.preexec())
        self.procs.append(proc)
        return proc


class Net:
    """Hosts and links; :meth:`close` removes them all (call it from a finalizer)."""

    _made = 0

    def __init__(self) -> None:
        Net._made += 1
        #: told apart from the other networks of this process in the namespaces' names
        self.serial = Net._made
        self.hosts: dict[str, Host] = {}
        self.links: list[Link] = []
        #: short: Postgres' Unix socket path must stay under 107 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="dnet-"))
        self.dir.chmod(0o755)

    def host(self, name: str) -> Host:
        h = Host(self, name)
        _ip("netns", "add", h.ns)
        self.hosts[name] = h
        _ip("-n", h.ns, "link", "set", "lo", "up")
        return h

    def link(self, a: Host, b: Host) -> Link:
        k = len(self.links) + 1
        assert k < 255, "at most 254 links"
        link = Link(k, a, b)
        _ip("link", "add", link.dev(a), "netns", a.ns, "type", "veth", "peer", "name", link.dev(b), "netns", b.ns)
        for h in (a, b):
            _ip("-n", h.ns, "addr", "add", f"{link.addr(h)}/30", "dev", link.dev(h))
            _ip("-n", h.ns, "link", "set", link.dev(h), "up")
        a.links[b.name] = link
        b.links[a.name] = link
        self.links.append(link)
        return link

    def close(self) -> None:
        """Kill every process (SIGCONT first, for paused ones), delete the namespaces."""
        for h in self.hosts.values():
            for p in h.procs:
                if p.poll() is None:
                    try:
                        os.kill(p.pid, signal.SIGCONT)
                        p.kill()
                    except ProcessLookupError:
                        pass
            for p in h.procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            for pid in _pids_in(h.ns):  # anything a process of ours started in there
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
        self.hosts.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


# ----- servers on hosts ------------------------------------------------------------------------

class HostNats:
    """A nats-server on ``host`` (port 4222 of its namespace) with JetStream, the partition
    mapping and the server pings durable dev uses."""

    def __init__(self, host: Host, partitions: int, peers: Sequence[Host] = ()) -> None:
        self.host = host
        self.dir = host.net.dir / f"nats-{host.name}"
        self.partitions = partitions
        #: the other nodes of its cluster (routes to each over their link); none: a single node
        self.peers = list(peers)
        self.proc: subprocess.Popen[bytes] | None = None

    def _cluster_block(self) -> str:
        if not self.peers:
            return ""
        routes = ", ".join(f"nats-route://{self.host.addr_of(p)}:{ROUTE_PORT}" for p in self.peers)
        # no_advertise: each address is one link's; a client told another node's address
        # could not reach it (clients are given the nodes they can reach)
        return (f"cluster {{\n  name: durable-net\n  listen: 0.0.0.0:{ROUTE_PORT}\n  no_advertise: true\n"
                f"  routes: [{routes}]\n}}\n")

    def url_from(self, client: Host) -> str:
        return f"nats://{client.addr_of(self.host)}:{NATS_PORT}"

    async def start(self, timeout: float = 20.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nats-server.conf"
        conf.write_text(
            f"server_name: {self.host.name}\nlisten: 0.0.0.0:{NATS_PORT}\nmax_payload: 1MB\n{SERVER_PINGS}"
            f'jetstream {{\n  store_dir: "{self.dir / "js"}"\n  sync_interval: always\n}}\n'
            f"mappings = {{\n  {server_mapping(self.partitions)}\n}}\n{self._cluster_block()}")
        log = self.dir / "nats.log"
        self.proc = self.host.popen([nats_server_binary(), "-c", str(conf)], log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Server is ready" in log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {log.read_text(errors='replace')[-2000:]}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"nats-server on {self.host.name} not ready in {timeout}s")


class HostPostgres(EmbeddedPostgres):
    """The embedded Postgres, run on ``host``: listening on all of the host's addresses (port
    5432) with trust for 10.77.0.0/16, plus a Unix socket the test process (in the root
    namespace) uses for set-up and checks."""

    def __init__(self, host: Host) -> None:
        super().__init__(host.net.dir / "pg", port=PG_PORT)
        self.host = host

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.data_dir}&port={self.port}"

    def url_from(self, client: Host, database: str) -> str:
        return f"postgresql://postgres@{client.addr_of(self.host)}:{PG_PORT}/{database}"

    def local_url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.data_dir}&port={self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self._prepare)
        hba = self.data_dir / "pg_hba.conf"
        if "10.77.0.0/16" not in hba.read_text():
            with open(hba, "a") as f:
                f.write("host all all 10.77.0.0/16 trust\n")
        run_as: dict[str, Any] = self._run_as(None)
        run_as["preexec_fn"] = self.host.preexec(run_as.get("preexec_fn"))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self._bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                 "-c", "listen_addresses=*", "-c", f"unix_socket_directories={self.data_dir}",
                 "-c", "max_connections=200",
                 # these tests cut links, never crash Postgres: fsync would only slow a shared machine
                 "-c", "fsync=off"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, **run_as)
        self.host.procs.append(self.process)
        await self._wait_ready(timeout)

    async def create_database(self, name: str) -> str:
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        return name
