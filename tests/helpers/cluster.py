"""A NATS cluster on loopback for the cluster fault tests: nodes to stop, kill (-9), pause and
restart on their old ports, with routes between all of them and JetStream on each. Built on the
embedded nats-server that ``durable dev`` runs (:class:`durable.core.embedded.EmbeddedNats`)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from durable.core.embedded import SERVER_PINGS, EmbeddedNats, free_port
from durable.core.wire import server_mapping


class ClusterNode(EmbeddedNats):
    """One nats-server of an :class:`EmbeddedNatsCluster`: fixed client, route and monitoring
    ports (so a restart comes back where its peers and clients look for it), its own
    JetStream store and ``server_name``, routes to every peer."""

    process: subprocess.Popen[bytes] | None

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
