"""WebSocket broadcast through the gateway, as ratios to a bare `websockets` server of the same run.

    .venv/bin/python bench/bench_ws.py [--sockets 1000] [--quick] [--client-procs 2]

Starts its own nats-server and PostgreSQL (embedded) and a `durable worker` process bound to
bench/durable.bench-ws.toml (class bench/ws_objects.py:BenchRoom: it accepts every socket and
broadcasts each frame it gets, unchanged, to all its sockets). Gateways are `durable gateway`
processes (DURABLE_ROUTES=bench.ws_objects:fetch), one per port. The baseline is
bench/ws_bare_server.py: a bare `websockets` server broadcasting each frame to every client with
the library's broadcast(), no NATS in between, in its own process.

Three shapes, each one room (one object) with N sockets (--sockets, default 1,000): the bare
server; one gateway; the N sockets alternating between two gateway processes (the object sends
one NATS message per gateway per broadcast). The load is bench/ws_clients.py (the `websockets`
asyncio client; no compression unless --deflate) in processes apart from the servers: --client-procs per shape
(default 2), the sockets split evenly between them, so that the clients neither share an event
loop with a server nor all sit in one loop. Socket 0 of the first client process sends, and is
a room member too. Measured:

- broadcast latency: the sender sends a frame carrying its sequence number and send time; the
  room sends it to every socket; latency = the last of the N arrivals minus the send
  (time.monotonic(): CLOCK_MONOTONIC, one clock for every process of the machine). Sequential:
  the next frame is sent once every socket has the previous one. p50 / p99 over --rounds
  broadcasts (after --warmup), and the p50 until the *first* socket has it (the path cost
  without the fan-out).
- throughput: --burst frames sent back to back (each one broadcast to the N sockets), timed from
  the first send to the last of the burst x N deliveries: deliveries/s, median of the bursts;
  and the CPU time the server side (bare server; gateways + worker + nats-server) spent per
  delivery, from /proc/<pid>/stat, which depends less on what else the machine runs.
- memory per idle connection: VmRSS of the server process(es) (/proc/<pid>/status) right before
  and 1 s after the N sockets open, divided by N; a few sockets are opened and closed first, so
  lazy imports and first-connection costs are not counted.

The shapes take turns (--cycles; each turn a slice of the latency rounds and one burst), so a
machine shared with other work disturbs them alike. "vs bare" is durable / bare (latency, CPU
and memory: how many times higher; deliveries/s: the fraction of the bare rate); both
two-gateway figures compare with the one bare server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: `durable worker`/`gateway` refuse the development id secret: the bench's processes share this one
os.environ.setdefault("DURABLE_ID_SECRET", "durable-bench-id-secret")
sys.path.insert(0, str(ROOT))

from durable.client import Client, Env  # noqa: E402
from durable.core.config import load_config  # noqa: E402
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres, free_port  # noqa: E402
from durable.core.settings import Settings  # noqa: E402

from bench.bench_http import WORKERD_DIR, install_workerd  # noqa: E402

PARTITIONS = 256
CONFIG_FILE = ROOT / "bench" / "durable.bench-ws.toml"
ROUTES = "bench.ws_objects:fetch"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def log_text(path: Path) -> str:
    """A log file's text so far ("" before it exists)."""
    return path.read_text(errors="replace") if path.exists() else ""


async def wait_port(port: int, proc: asyncio.subprocess.Process, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            text = await asyncio.to_thread(log_text, log)
            raise RuntimeError(f"process exited with {proc.returncode}:\n{text[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}; see {log}")


async def wait_text(path: Path, text: str, proc: asyncio.subprocess.Process, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(log_text, path)
        if text in seen:
            return
        if proc.returncode is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{seen[-3000:]}")
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{text!r} not in {path}")


def warnings_in(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line]


class ClientProc:
    """One bench/ws_clients.py process, driven over its stdin/stdout."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with await asyncio.to_thread(open, self.log, "ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "bench" / "ws_clients.py"),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def call(self, cmd: str, timeout: float = 300, **args: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"the client process exited; see {self.log}:\n{self.log.read_text()[-3000:]}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"client process: {reply['error']}")
        return reply

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class Shape:
    """One shape (bare server, one gateway, two gateways): its processes and its figures."""

    label: str
    urls: list[str]
    servers: dict[str, int]  # the processes holding the sockets: name -> pid
    logs: list[Path] = field(default_factory=list)
    room: str | None = None  # the BenchRoom's name (durable shapes)
    clients: list[ClientProc] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # ms, send -> last socket
    first_latencies: list[float] = field(default_factory=list)  # ms, send -> first socket
    lost_broadcasts: int = 0
    rates: list[float] = field(default_factory=list)  # deliveries/s, one per burst
    rss_per_socket: float | None = None  # KiB
    cpu_ticks: dict[str, int] = field(default_factory=dict)  # process -> ticks used during the bursts
    burst_wall: float = 0.0
    burst_deliveries: int = 0
    open_seconds: float = 0.0
    room_sockets: int | None = None  # what the object's get_websockets() counted
    out_of_order: int = 0
    closed_under_us: int = 0
    missing_deliveries: int = 0
    warnings: list[str] = field(default_factory=list)  # from the gateway logs

    @property
    def cpu(self) -> dict[str, float]:
        """% of one core each process used during the bursts."""
        return {k: 100 * t / CLK_TCK / self.burst_wall for k, t in self.cpu_ticks.items()} if self.burst_wall else {}

    @property
    def server_cpu_per_delivery(self) -> float | None:
        """CPU µs the server side (all but the clients) spent per delivery during the bursts."""
        if not self.burst_deliveries:
            return None
        ticks = sum(t for k, t in self.cpu_ticks.items() if not k.startswith("clients"))
        return ticks / CLK_TCK / self.burst_deliveries * 1e6


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.seq = 0
        self.procs: list[asyncio.subprocess.Process] = []
        self.env_vars: dict[str, str] = {}
        self.nats_pid = 0
        self.worker_pid = 0
        self.worker_warnings: list[str] = []

    # ----- processes ---------------------------------------------------------------------

    async def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
        with await asyncio.to_thread(open, log, "ab") as out:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    async def stop(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def start_gateway(self, name: str) -> tuple[int, str, Path]:
        port = free_port()
        log = self.tmp / f"{name}.log"
        env = {**self.env_vars, "DURABLE_GATEWAY_PORT": str(port), "DURABLE_ROUTES": ROUTES}
        proc = await self.spawn([sys.executable, "-m", "durable.cli", "gateway"], log, env)
        await wait_port(port, proc, log)
        return proc.pid, f"ws://127.0.0.1:{port}", log

    async def start_workerd(self) -> tuple[int, str, Path]:
        """Cloudflare's runtime with bench/workerd's Room: hibernatable WebSockets in one object."""
        port = free_port()
        log = self.tmp / "workerd.log"
        storage = self.tmp / "workerd-storage"
        storage.mkdir()
        proc = await self.spawn([str(install_workerd()), "serve", str(WORKERD_DIR / "config.capnp"),
                                 "--directory-path", f"do-storage={storage}",
                                 "--socket-addr", f"http=127.0.0.1:{port}"], log)
        await wait_port(port, proc, log)
        return proc.pid, f"ws://127.0.0.1:{port}", log

    async def start_bare(self) -> tuple[int, str, Path]:
        port = free_port()
        log = self.tmp / "bare.log"
        proc = await self.spawn([sys.executable, str(ROOT / "bench" / "ws_bare_server.py"), str(port)], log)
        await wait_text(log, "ready", proc)
        return proc.pid, f"ws://127.0.0.1:{port}", log

    # ----- the phases of a shape ---------------------------------------------------------

    async def open(self, shape: Shape, rooms: Any) -> None:
        """Memory per idle socket, measured while the shape's N sockets open."""
        n = self.args.sockets
        tag = shape.label.replace(" ", "").replace(",", "-")
        # warm-up: a few sockets to another room, opened and closed (lazy imports, first-connection costs)
        warm = ClientProc(self.tmp / f"clients-{tag}-warm.log")
        await warm.start()
        try:
            await warm.call("open", urls=[u.replace("/room/", "/room/warm-") for u in shape.urls],
                            n=4 * len(shape.urls), sender=False)
            await warm.call("close")
        finally:
            await warm.stop()
        shape.clients = [ClientProc(self.tmp / f"clients-{tag}-{i}.log") for i in range(self.args.client_procs)]
        for c in shape.clients:
            await c.start()
        await asyncio.sleep(1.0)
        before = {name: rss_kib(pid) for name, pid in shape.servers.items()}
        shares = [n // len(shape.clients) + (1 if i < n % len(shape.clients) else 0)
                  for i in range(len(shape.clients))]
        started = time.monotonic()
        await asyncio.gather(*(c.call("open", urls=shape.urls, n=k, sender=i == 0, deflate=self.args.deflate)
                               for i, (c, k) in enumerate(zip(shape.clients, shares, strict=True))))
        shape.open_seconds = time.monotonic() - started
        await asyncio.sleep(1.0)
        after = {name: rss_kib(pid) for name, pid in shape.servers.items()}
        shape.rss_per_socket = sum(after[k] - before[k] for k in shape.servers) / n
        if shape.room is not None:
            shape.room_sockets = await rooms.get_by_name(shape.room).sockets()

    async def latency(self, shape: Shape, count: int, record: bool = True) -> None:
        """``count`` broadcasts, one at a time."""
        clients = shape.clients
        for _ in range(count):
            self.seq += 1
            sent = await clients[0].call("send", first=self.seq, count=1, size=self.args.size)
            got = await asyncio.gather(*(c.call("wait", first=self.seq, last=self.seq, timeout=30)
                                         for c in clients))
            if any(g["got"] < g["need"] for g in got):
                shape.lost_broadcasts += 1
                shape.missing_deliveries += sum(g["need"] - g["got"] for g in got)
            elif record:
                shape.latencies.append((max(g["last"] for g in got) - sent["t0"]) * 1000)
                shape.first_latencies.append((min(g["first"] for g in got) - sent["t0"]) * 1000)

    async def burst(self, shape: Shape) -> None:
        """--burst broadcasts sent back to back; deliveries/s until the last one arrived everywhere."""
        clients = shape.clients
        pids = {**shape.servers, **{f"clients-{i}": c.pid for i, c in enumerate(clients)}}
        if shape.room is not None:
            pids |= {"worker": self.worker_pid, "nats-server": self.nats_pid}
        first, last = self.seq + 1, self.seq + self.args.burst
        self.seq = last
        t_before = {k: cpu_ticks(p) for k, p in pids.items()}
        wall = time.monotonic()
        sent = await clients[0].call("send", first=first, count=self.args.burst, size=self.args.size)
        got = await asyncio.gather(*(c.call("wait", first=first, last=last, timeout=120) for c in clients))
        shape.burst_wall += time.monotonic() - wall
        for k, p in pids.items():
            shape.cpu_ticks[k] = shape.cpu_ticks.get(k, 0) + cpu_ticks(p) - t_before[k]
        missing = sum(g["need"] - g["got"] for g in got)
        shape.missing_deliveries += missing
        shape.burst_deliveries += sum(g["got"] for g in got)
        if missing == 0:
            shape.rates.append(self.args.sockets * self.args.burst / (max(g["last"] for g in got) - sent["t0"]))

    async def close(self, shape: Shape) -> None:
        for c in shape.clients:
            stats = await c.call("stats")
            shape.out_of_order += stats["out_of_order"]
            shape.closed_under_us += stats["closed_under_us"]
        await asyncio.gather(*(c.call("close") for c in shape.clients))
        for c in shape.clients:
            await c.stop()
        for log in shape.logs:
            shape.warnings += warnings_in(log)

    # ----- the run -----------------------------------------------------------------------

    async def run(self) -> list[Shape]:
        args = self.args
        async with EmbeddedNats(self.tmp / "nats", partitions=PARTITIONS) as ns, \
                EmbeddedPostgres(self.tmp / "pg") as pg:
            assert ns.pid is not None
            self.nats_pid = ns.pid
            self.env_vars = {**os.environ, "DURABLE_NATS_URL": ns.url, "DURABLE_DATABASE_URL": pg.url,
                             "DURABLE_PARTITIONS": str(PARTITIONS), "DURABLE_CONFIG_FILE": str(CONFIG_FILE),
                             "DURABLE_IDLE_TIMEOUT": "600", "PYTHONPATH": str(ROOT)}
            worker_log = self.tmp / "worker.log"
            client: Client | None = None
            shapes: list[Shape] = []
            try:
                worker = await self.spawn([sys.executable, "-m", "durable.cli", "worker"], worker_log,
                                          self.env_vars)
                self.worker_pid = worker.pid
                await wait_text(worker_log, "started", worker)
                settings = Settings(nats_url=ns.url, database_url=pg.url, partitions=PARTITIONS,
                                    config_file=CONFIG_FILE)
                client = await Client.connect(settings, load_config(CONFIG_FILE))
                rooms = Env(client, client.config).ROOMS  # type: ignore[attr-defined]
                deadline = time.monotonic() + 60
                while True:  # until the worker owns the partitions
                    try:
                        await rooms.get_by_name("warm").sockets()
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)

                pid, url, log = await self.start_bare()
                shapes.append(Shape("bare websockets", [f"{url}/room/bare"], {"bare server": pid}, [log]))
                if not args.no_workerd:
                    pid, url, log = await self.start_workerd()
                    shapes.append(Shape("workerd", [f"{url}/room/workerd"], {"workerd": pid}, [log]))
                pid, url, log = await self.start_gateway("gateway-1")
                shapes.append(Shape("durable, 1 gateway", [f"{url}/room/one"], {"gateway": pid}, [log], "one"))
                # two gateways: the room's sockets alternate between them; the sender is on the first
                pid_a, url_a, log_a = await self.start_gateway("gateway-2a")
                pid_b, url_b, log_b = await self.start_gateway("gateway-2b")
                shapes.append(Shape("durable, 2 gateways", [f"{url_a}/room/two", f"{url_b}/room/two"],
                                    {"gateway-a": pid_a, "gateway-b": pid_b}, [log_a, log_b], "two"))

                for shape in shapes:
                    await self.open(shape, rooms)
                # the machine may be shared: the shapes take turns, a slice of each measurement at a time
                per_cycle = math.ceil(args.rounds / args.cycles)
                for cycle in range(args.cycles):
                    turn = cycle % len(shapes)
                    for shape in shapes[turn:] + shapes[:turn]:
                        if cycle == 0:
                            await self.latency(shape, args.warmup, record=False)
                        await self.latency(shape, per_cycle)
                        await self.burst(shape)
                for shape in shapes:
                    await self.close(shape)
                self.worker_warnings = warnings_in(worker_log)
            finally:
                for shape in shapes:
                    for c in shape.clients:
                        await c.stop()
                if client is not None:
                    await client.close()
                for p in self.procs:
                    await self.stop(p)
        return shapes


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def report(shapes: list[Shape], args: argparse.Namespace, bench: Bench, seconds: float,
           load: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    by_label = {s.label: s for s in shapes}
    bare, one, two = by_label["bare websockets"], by_label["durable, 1 gateway"], by_label["durable, 2 gateways"]
    peer = by_label.get("workerd")

    def stat(s: Shape | None, what: str) -> float | None:
        if s is None:
            return None
        if what in ("p50", "p99"):
            return percentile(s.latencies, int(what[1:])) if s.latencies else None
        if what == "first":
            return percentile(s.first_latencies, 50) if s.first_latencies else None
        if what == "rate":
            return statistics.median(s.rates) if s.rates else None
        if what == "cpu":
            return s.server_cpu_per_delivery
        return s.rss_per_socket

    rows = [("broadcast latency p50 (ms)", "p50", ".1f"), ("broadcast latency p99 (ms)", "p99", ".1f"),
            ("  first socket reached, p50 (ms)", "first", ".1f"),
            ("deliveries/s (median burst)", "rate", ",.0f"),
            ("  server CPU per delivery (µs)", "cpu", ".1f"), ("memory per idle socket (KiB)", "mem", ".1f")]
    print(f"\n{args.sockets:,} sockets in one room; latency over {args.rounds} sequential broadcasts, "
          f"throughput over {args.cycles} bursts of {args.burst} back-to-back broadcasts; "
          f"{args.size}-character text frames, {'with' if args.deflate else 'no'} permessage-deflate")
    head = f"{'measurement':<32} {'bare ws':>9} {'workerd':>9} {'durable 1gw':>11} {'vs bare':>8} " \
           f"{'vs workerd':>10} {'durable 2gw':>11} {'vs bare':>8}"
    print(head)
    print("-" * len(head))
    for label, what, spec in rows:
        b, w, o, t = stat(bare, what), stat(peer, what), stat(one, what), stat(two, what)
        print(f"{label:<32} {fmt(b, spec):>9} {fmt(w, spec):>9} {fmt(o, spec):>11} {ratio(o, b):>8} "
              f"{ratio(o, w):>10} {fmt(t, spec):>11} {ratio(t, b):>8}")
    print(f"\nCPU during the bursts (% of one core; {os.cpu_count()} cores):")
    for s in shapes:
        print(f"  {s.label:<21} " + ", ".join(f"{k} {v:.0f}%" for k, v in s.cpu.items()))
    print("\nsanity:")
    for s in shapes:
        room = "" if s.room_sockets is None else f" (the object counted {s.room_sockets:,})"
        print(f"  {s.label:<21} opened {args.sockets:,} sockets{room} in {s.open_seconds:.1f}s; "
              f"lost broadcasts {s.lost_broadcasts}, missing deliveries {s.missing_deliveries}, "
              f"out of order {s.out_of_order}, closed under the clients {s.closed_under_us}; "
              f"burst rates/s {', '.join(f'{r:,.0f}' for r in s.rates)}")
        for w in s.warnings[:5]:
            print(f"    log: {w}")
    for w in bench.worker_warnings[:5]:
        print(f"  worker log: {w}")
    print(f"\n{args.client_procs} client process(es) per shape, apart from the servers; the shapes took "
          f"turns in {args.cycles} cycles; load average {load[0][0]:.1f} at the start, "
          f"{load[1][0]:.1f} at the end; total run time {seconds:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=None, help="sockets in the room (default 1000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 sockets, fewer rounds")
    parser.add_argument("--rounds", type=int, default=None, help="sequential broadcasts for the latency")
    parser.add_argument("--warmup", type=int, default=5, help="broadcasts before the latency is recorded")
    parser.add_argument("--burst", type=int, default=None, help="back-to-back broadcasts in a throughput burst")
    parser.add_argument("--cycles", type=int, default=None,
                        help="turns the shapes take (each: a slice of the latency rounds and one burst)")
    parser.add_argument("--size", type=int, default=100, help="characters in each frame")
    parser.add_argument("--client-procs", type=int, default=2, help="processes holding one shape's sockets")
    parser.add_argument("--deflate", action="store_true",
                        help="the clients offer permessage-deflate (as browsers do; both servers accept it)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--no-workerd", action="store_true", help="leave Cloudflare's workerd out")
    args = parser.parse_args()
    args.sockets = args.sockets or (200 if args.quick else 1000)
    args.rounds = args.rounds or (30 if args.quick else 100)
    args.burst = args.burst or (20 if args.quick else 50)
    args.cycles = args.cycles or (2 if args.quick else 4)

    # every process holds a descriptor per socket: raise the limit, the children inherit it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.sockets + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    tmp = Path(tempfile.mkdtemp(prefix="durable-bench-ws-"))
    tmp.chmod(0o755)
    bench = Bench(args, tmp)
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        shapes = asyncio.run(bench.run())
        report(shapes, args, bench, time.monotonic() - started, (load_before, os.getloadavg()))
    finally:
        if args.keep:
            print(f"logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
