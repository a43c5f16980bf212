"""The ``durable`` command: ``dev`` (everything on embedded servers), ``worker``, ``router``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import uvicorn
from pydantic import ValidationError

from .core import logs, telemetry
from .core.config import AppConfig, load_config
from .core.embedded import DEV_MARKER, EmbeddedNats, EmbeddedPostgres, die_with_parent, stop_leftovers
from .core.errors import ConfigError, Unavailable
from .core.settings import DEV_CHILD_ENV, Settings, refuse_dev_secret
from .operate import commands as operate

log = logging.getLogger("durable")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the CLI decides when everything stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _load(settings_overrides: dict[str, object]) -> tuple[Settings, AppConfig]:
    try:
        settings = Settings(**settings_overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(f"bad DURABLE_* settings:\n{exc}") from None
    config = load_config(settings.config_file)
    return settings, config


def _stop_event() -> asyncio.Event:
    """Set by Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal was closed): each is a stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    return stop


def server_config(app: Any, host: str, port: int, trusted_proxies: list[str] | None = None) -> uvicorn.Config:
    """uvicorn for the router and gateway: WebSocket frames up to 1 MiB (larger: close 1009), and
    pings every 5 s, so a client that vanished without a close frame is noticed (1006) in ~10 s.

    X-Forwarded-For/-Proto are believed only from ``trusted_proxies`` (by default the app's
    ``DURABLE_TRUSTED_PROXIES``, which :func:`create_app` records), never from loopback alone
    as uvicorn's own default would."""
    from .core.wire import MAX_MESSAGE_BYTES  # noqa: PLC0415

    if trusted_proxies is None:
        trusted_proxies = list(getattr(getattr(app, "state", None), "trusted_proxies", None) or [])

    # websockets-sansio: the implementation whose close reporting the gateway relies on;
    # no permessage-deflate: it doubles memory per socket (29 -> 64 KiB) and costs CPU per frame
    # log_config=None: uvicorn's records go to the root logger, in the process's format (core/logs.py)
    return uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="on",
                          ws="websockets-sansio",
                          ws_max_size=MAX_MESSAGE_BYTES, ws_ping_interval=5.0, ws_ping_timeout=5.0,
                          ws_per_message_deflate=False, proxy_headers=bool(trusted_proxies),
                          forwarded_allow_ips=list(trusted_proxies) or [])


async def _serve_router(settings: Settings, config: AppConfig, stop: asyncio.Event, http: bool = True) -> None:
    from .router.app import create_app  # noqa: PLC0415 - the worker process does not need it

    port = settings.http_port if http else settings.gateway_port
    app = create_app(settings, config, http=http)
    server = _Server(server_config(app, settings.http_host, port))
    task = asyncio.create_task(server.serve())
    await stop.wait()
    # readiness first (load balancers stop sending), then the drain: uvicorn finishes what it has
    app.state.ops.draining = True
    log.info("stopping: /readyz answers 503; draining in %g s", settings.shutdown_delay)
    await _shutdown_delay(settings, task)
    server.should_exit = True
    await task


async def _shutdown_delay(settings: Settings, task: asyncio.Future[Any] | None = None) -> None:
    """Wait DURABLE_SHUTDOWN_DELAY seconds with /readyz false before draining (a second signal
    does not cut it short: the orchestrator's grace period bounds it)."""
    if settings.shutdown_delay <= 0:
        return
    if task is None:
        await asyncio.sleep(settings.shutdown_delay)
    else:
        await asyncio.wait({task}, timeout=settings.shutdown_delay)


async def _spawn_worker(settings: Settings) -> asyncio.subprocess.Process:
    """A `durable worker` child of `durable dev`: SIGKILLed by the kernel if dev dies (whatever
    kills it), and marked with dev's data directory, so a later dev can tell its leftovers."""
    env = {**os.environ, "DURABLE_NATS_URL": settings.nats_url, "DURABLE_DATABASE_URL": settings.database_url,
           "DURABLE_CONFIG_FILE": str(settings.config_file.resolve()), "DURABLE_WORKER_NAME": "",
           "DURABLE_HEALTH_PORT": "0",  # the in-process worker has it; children would collide
           DEV_CHILD_ENV: "1", DEV_MARKER: str(settings.data_dir.resolve())}
    # forked from the event loop's thread, which lives as long as dev (the parent-death signal
    # follows the forking thread)
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "durable.cli", "worker", env=env,
                                                start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL))


async def _stop_process(proc: asyncio.subprocess.Process, timeout: float = 15.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _wait_balanced(worker: object, workers: int, timeout: float = 60.0) -> bool:
    """Until every partition is held (an advisory lock in Postgres, as every owner takes one),
    by ``workers`` workers, this one holding and serving just its share."""
    from .objects.worker import Worker  # noqa: PLC0415

    assert isinstance(worker, Worker)
    settings = worker.settings
    query = ("SELECT count(*) AS locks, count(DISTINCT pid) AS holders FROM pg_locks "
             "WHERE locktype = 'advisory' AND granted AND classid = $1 "
             "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        while loop.time() < end:
            row = await conn.fetchrow(query, settings.deployment_key)
            assert row is not None
            mine = set(worker.parts) == worker.ownership.desired() and \
                all(s.sub is not None for s in worker.parts.values())
            if (row["locks"] >= settings.partitions and row["holders"] >= workers
                    and len(worker.ownership.live) >= workers and mine):
                await worker.nc.flush()
                await asyncio.sleep(0.1)  # the others subscribe right after taking their locks
                return True
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    return False


def _say(text: str, err: bool = False) -> None:
    """Print, ignoring a terminal that went away (SIGHUP: the window was closed)."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _check_ports(settings: Settings) -> None:
    """Every port dev is about to listen on must be free, checked before anything starts: else one
    line naming the port and its setting, and exit 2."""
    wanted: list[tuple[str, int, str]] = [(settings.http_host, settings.http_port, "DURABLE_HTTP_PORT")]
    if not settings.nats_url and settings.nats_port:
        wanted.append(("127.0.0.1", settings.nats_port, "DURABLE_NATS_PORT"))
    if not settings.database_url and settings.postgres_port:
        wanted.append(("127.0.0.1", settings.postgres_port, "DURABLE_POSTGRES_PORT"))
    for host, port, name in wanted:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
                s.listen(1)
            except OSError as exc:
                reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
                _say(f"durable dev: port {port} {reason} ({name}); stop what uses it or set {name} to a free port",
                     err=True)
                raise SystemExit(2) from None


async def _router_answers(host: str, port: int, timeout: float = 30.0) -> bool:
    """Until the router answers HTTP. A TRACE request: the router allows no such method, so it
    answers 405 itself, without running the app's routing code."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
            try:
                writer.write(f"TRACE / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 5)
                if line.startswith(b"HTTP/"):
                    return True
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    return False


class _Watchdog:
    """Restarts what `durable dev` runs when it dies under it: nats-server, Postgres (on the same
    port and data; the workers reconnect and take their partitions again) and worker processes."""

    def __init__(self, settings: Settings, nats: EmbeddedNats | None, pg: EmbeddedPostgres | None,
                 workers: list[asyncio.subprocess.Process]) -> None:
        self.settings = settings
        self.nats = nats
        self.pg = pg
        self.workers = workers
        self.task: asyncio.Task[None] | None = None
        self._respawn_at: dict[int, float] = {}
        self._respawn_delay: dict[int, float] = {}

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="dev-watchdog")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            await asyncio.sleep(0.5)
            try:
                if self.nats is not None and not self.nats.running:
                    code = self.nats.process.returncode if self.nats.process else None
                    log.warning("nats-server exited (%s); restarting it", code)
                    await self.nats.start()
                    log.warning("nats-server restarted (pid %s)", self.nats.pid)
                if self.pg is not None and not self.pg.running:
                    code = self.pg.process.returncode if self.pg.process else None
                    log.warning("postgres exited (%s); restarting it", code)
                    await self.pg.start()
                    log.warning("postgres restarted (pid %s)", self.pg.pid)
                now = asyncio.get_running_loop().time()
                for i, proc in enumerate(self.workers):
                    if proc.returncode is not None and now >= self._respawn_at.get(i, 0.0):
                        log.warning("worker process %d exited (%s); starting another", proc.pid, proc.returncode)
                        self.workers[i] = await _spawn_worker(self.settings)
                        # one that keeps dying (a bad app, say) is started again less and less often
                        delay = self._respawn_delay.get(i, 1.0)
                        self._respawn_at[i] = now + delay
                        self._respawn_delay[i] = min(delay * 2, 60.0)
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - keep watching; try again a little later
                log.warning("restart failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


async def _dev(reset: bool, workers: int) -> None:
    settings, config = _load({})
    config.load_classes()  # an unimportable class stops start-up here, with its binding named
    data = settings.data_dir.resolve()
    settings = settings.model_copy(update={"data_dir": data})
    # leftovers of an earlier dev on this data directory (killed with no chance to clean up) go
    # first: each is recognised by its command line, so nothing else is ever stopped
    for pid, kind in await asyncio.to_thread(stop_leftovers, data):
        _say(f"stopped a leftover {kind} (pid {pid}) of {data}", err=True)
    _check_ports(settings)
    if reset and data.exists():
        shutil.rmtree(data)
        _say(f"reset: removed {data}", err=True)
    stop = _stop_event()
    serving = asyncio.Event()
    main = asyncio.create_task(_dev_run(settings, config, workers, stop, serving))
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({main, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():  # a second Ctrl-C (or SIGTERM, SIGHUP) while stopping: exit at once; what
        loop = asyncio.get_running_loop()  # we started gets its parent-death signal

        def at_once() -> None:
            _say("durable dev: stopped at once", err=True)
            os._exit(130)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, at_once)
    if not main.done() and not serving.is_set():  # stopped during start-up: unwind what has started
        main.cancel()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await main
    _say("stopped.", err=True)


async def _dev_run(settings: Settings, config: AppConfig, workers: int, stop: asyncio.Event,
                   serving: asyncio.Event) -> None:
    data = settings.data_dir

    def go_on() -> None:
        """A stop during start-up: unwind from here (a cancellation alone can be lost in a
        library's wait_for, so every step also looks)."""
        if stop.is_set():
            raise asyncio.CancelledError

    async with contextlib.AsyncExitStack() as stack:
        overrides: dict[str, object] = {}
        nats: EmbeddedNats | None = None
        pg: EmbeddedPostgres | None = None
        if not settings.nats_url:
            nats = await stack.enter_async_context(
                EmbeddedNats(data / "nats", port=settings.nats_port, partitions=settings.partitions))
            overrides["nats_url"] = nats.url
            _say(f"nats-server     {nats.url}  (JetStream, data in {data / 'nats'}, pid {nats.pid})")
            go_on()
        if not settings.database_url:
            pg = await stack.enter_async_context(EmbeddedPostgres(data / "postgres", port=settings.postgres_port))
            overrides["database_url"] = pg.url
            _say(f"postgres        {pg.url}  (data in {data / 'postgres'}, pid {pg.pid})")
            go_on()
        settings = settings.model_copy(update=overrides)
        from .objects.worker import Worker  # noqa: PLC0415

        worker = Worker(settings, config)
        await worker.start()
        stack.push_async_callback(worker.stop)
        go_on()
        await worker.wait_ready(30)
        go_on()
        _say(f"worker          {worker.worker_id}  (classes: {', '.join(sorted(worker.classes))})")
        children: list[asyncio.subprocess.Process] = []

        async def stop_children() -> None:
            await asyncio.gather(*(_stop_process(p) for p in children))

        stack.push_async_callback(stop_children)
        for _ in range(workers - 1):
            proc = await _spawn_worker(settings)
            children.append(proc)
            _say(f"worker          pid {proc.pid}  (a separate process)")
            go_on()
        watchdog = _Watchdog(settings, nats, pg, children)
        watchdog.start()
        stack.push_async_callback(watchdog.stop)  # first thing to stop: nothing restarts while stopping
        from .router.app import create_app  # noqa: PLC0415

        # the requests for this process's own partitions skip NATS (DURABLE_LOCAL_DISPATCH)
        app = create_app(settings, config, local=worker.local if settings.local_dispatch else None)
        server = _Server(server_config(app, settings.http_host, settings.http_port))
        router = asyncio.create_task(server.serve(), name="router")

        async def stop_router() -> None:
            server.should_exit = True
            await asyncio.gather(router, return_exceptions=True)

        stack.push_async_callback(stop_router)
        balanced = await _wait_balanced(worker, workers)
        go_on()
        answers = await _router_answers(settings.http_host, settings.http_port)
        go_on()
        if router.done():
            router.result()  # the router failed to start: raise why
            raise RuntimeError("the router stopped")
        if not balanced:
            _say("warning: not every partition is owned yet (see `durable status`)", err=True)
        if not answers:
            _say(f"warning: the router does not answer on port {settings.http_port} yet", err=True)
        _say(f"partitions      {settings.partitions}, {workers} worker(s), this process owns {len(worker.parts)}")
        _say(f"router          http://{settings.http_host}:{settings.http_port}")
        routes = settings.routes or config.routes or "no routes (404)"
        _say(f"ready.  http://127.0.0.1:{settings.http_port}/ -> {routes}   (Ctrl-C stops)")
        serving.set()  # from here on a stop is orderly: this coroutine unwinds everything itself
        await stop.wait()
        _say("stopping...", err=True)


async def _worker() -> None:
    settings, config = _load({})
    if not settings.nats_url or not settings.database_url:
        raise ConfigError("durable worker needs DURABLE_NATS_URL and DURABLE_DATABASE_URL")
    refuse_dev_secret(settings, "worker")
    from .objects.worker import Worker  # noqa: PLC0415

    stop = _stop_event()
    worker = Worker(settings, config)
    await worker.start()
    print(f"worker {worker.worker_id} started", flush=True)
    await stop.wait()
    worker.begin_stop()  # /readyz answers 503 from here, then the drain
    log.info("stopping: /readyz answers 503; draining in %g s", settings.shutdown_delay,
             extra={"worker": worker.worker_id})
    await _shutdown_delay(settings)
    await worker.stop()


async def _gateway() -> None:
    settings, config = _load({})
    if not settings.nats_url:
        raise ConfigError("durable gateway needs DURABLE_NATS_URL")
    refuse_dev_secret(settings, "gateway")
    print(f"gateway         ws://{settings.http_host}:{settings.gateway_port} (WebSockets only)", flush=True)
    await _serve_router(settings, config, _stop_event(), http=False)


async def _router() -> None:
    settings, config = _load({})
    if not settings.nats_url:
        raise ConfigError("durable router needs DURABLE_NATS_URL")
    refuse_dev_secret(settings, "router")
    await _serve_router(settings, config, _stop_event())


def _print_id(target: str, name: str) -> None:
    """Print the id of a named object: handy for `nats req do.<Class>.<id>.rpc.<method>`."""
    settings, config = _load({})
    for b in config.bindings:
        if target in (b.name, b.class_name):
            from .core.ids import IdFactory, namespace_key  # noqa: PLC0415

            ids = IdFactory(b.class_name, namespace_key(settings.id_secret, b.identity))
            print(ids.from_name(name).hex)
            return
    raise ConfigError(f"{settings.config_file}: no binding or class named {target!r}")


async def _status(as_json: bool, watch: float | None = None) -> None:
    from . import status  # noqa: PLC0415

    settings, config = _load({})
    settings = settings.or_dev_servers()  # with nothing configured, look at what `durable dev` runs
    stop = _stop_event() if watch else None
    while True:
        try:
            result = await status.collect(settings, config)
        except (OSError, asyncpg.PostgresError) as exc:
            raise ConfigError(f"cannot reach Postgres at {settings.database_url}: {exc}") from None
        text = json.dumps(result, indent=2) if as_json else status.render(result)
        if stop is None:
            print(text)
            return
        # --watch: redraw in place (clear the screen, cursor home) until Ctrl-C
        print("\x1b[2J\x1b[H" + text + f"\n\n(every {watch:g} s; Ctrl-C stops)", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), watch)
        if stop.is_set():
            return


T = TypeVar("T")


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on uvloop where it is installed (a runtime dependency on Linux
    and macOS): a faster event loop for the router's HTTP and the worker's NATS traffic. Plain
    asyncio otherwise; the code does not depend on which."""
    try:
        import uvloop  # noqa: PLC0415 - optional: not built for every platform
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _new(pattern: str, folder: str | None) -> None:
    from .scaffold import new_app  # noqa: PLC0415 - only this command needs it

    written = new_app(pattern, Path(folder) if folder else None)
    where = written[0].parent
    print(f"wrote the {pattern} app to {where}/: " + ", ".join(sorted(p.name for p in written if p.parent == where)))
    print(f"next:  cd {where} && durable dev      # and: pytest -q")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="durable", description="Durable Objects on NATS and PostgreSQL")
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="run NATS, Postgres, a worker and the router locally")
    dev.add_argument("--reset", action="store_true", help="wipe the local data (.durable/) first")
    dev.add_argument("--workers", type=int, default=1, metavar="N",
                     help="run N workers (one in this process, N-1 as child processes)")
    sub.add_parser("worker", help="run an object host against DURABLE_NATS_URL / DURABLE_DATABASE_URL")
    sub.add_parser("router", help="run the HTTP router (and WebSocket gateway) against DURABLE_NATS_URL")
    sub.add_parser("gateway", help="run a WebSocket gateway alone against DURABLE_NATS_URL")
    status_cmd = sub.add_parser("status", help="workers, their partitions and epochs, live objects")
    status_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    status_cmd.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                            help="refresh every SECONDS (default 2) until Ctrl-C")
    new_cmd = sub.add_parser("new", help="write a runnable app of a pattern into a new folder, "
                                         "e.g. `durable new counter myapp`")
    new_cmd.add_argument("pattern", help="counter, ratelimit, session, chat, lock, auction, presence, stream, "
                                         "game, collab or orders")
    new_cmd.add_argument("dir", nargs="?", help="the new folder (default: the pattern's name)")
    id_cmd = sub.add_parser("id", help="print the id of a named object, e.g. `durable id Counter demo`")
    id_cmd.add_argument("target", help="binding (COUNTERS) or class (Counter)")
    id_cmd.add_argument("name")
    operate.add_commands(sub)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    log_format = os.environ.get("DURABLE_LOG_FORMAT", "auto").strip().lower()
    log_format = log_format if log_format in ("json", "text") else "auto"
    if args.command in operate.COMMANDS:  # the operator's commands: quiet logs, their own exit codes
        logs.configure(logging.DEBUG if args.verbose else logging.WARNING, log_format)
        return operate.run(args, _run)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO, log_format)
    try:
        telemetry.configure_from_env(f"durable-{args.command}")
        if args.command == "dev":
            _run(_dev(args.reset, args.workers))
        elif args.command == "worker":
            _run(_worker())
        elif args.command == "status":
            _run(_status(args.json, args.watch))
        elif args.command == "id":
            _print_id(args.target, args.name)
        elif args.command == "new":
            _new(args.pattern, args.dir)
        elif args.command == "gateway":
            _run(_gateway())
        else:
            _run(_router())
    except ConfigError as exc:
        print(f"durable: configuration error:\n{exc.message}", file=sys.stderr)
        return 2
    except Unavailable as exc:  # a server that is not there: say which, no traceback
        print(f"durable: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
