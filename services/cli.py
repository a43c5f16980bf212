"""The ``durable`` command: ``dev`` (everything on embedded servers), ``worker``, ``router``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from typing import Any

import asyncpg
import uvicorn
from pydantic import ValidationError

from .core import telemetry
from .core.config import AppConfig, load_config
from .core.embedded import EmbeddedNats, EmbeddedPostgres
from .core.errors import ConfigError
from .core.settings import DEV_CHILD_ENV, Settings, refuse_dev_secret

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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def server_config(app: Any, host: str, port: int, trusted_proxies: list[str] | None = None) -> uvicorn.Config:
    """uvicorn for the router and gateway: WebSocket frames up to 1 MiB (larger: close 1009), and
    pings every 5 s, so a client that vanished without a close frame is noticed (1006) in ~10 s.

    X-Forwarded-For/-Proto are believed only from ``trusted_proxies`` (by default the app's
    ``DURABLE_TRUSTED_PROXIES``, which :func:`create_app` records), never from loopback alone
    as uvicorn's own default would."""
    from .objects.websockets import MAX_MESSAGE_BYTES  # noqa: PLC0415

    if trusted_proxies is None:
        trusted_proxies = list(getattr(getattr(app, "state", None), "trusted_proxies", None) or [])

    # websockets-sansio: the implementation whose close reporting the gateway relies on;
    # no permessage-deflate: it doubles memory per socket (29 -> 64 KiB) and costs CPU per frame
    return uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", ws="websockets-sansio",
                          ws_max_size=MAX_MESSAGE_BYTES, ws_ping_interval=5.0, ws_ping_timeout=5.0,
                          ws_per_message_deflate=False, proxy_headers=bool(trusted_proxies),
                          forwarded_allow_ips=list(trusted_proxies) or [])


async def _serve_router(settings: Settings, config: AppConfig, stop: asyncio.Event, http: bool = True) -> None:
    from .router.app import create_app  # noqa: PLC0415 - the worker process does not need it

    port = settings.http_port if http else settings.gateway_port
    server = _Server(server_config(create_app(settings, config, http=http), settings.http_host, port))
    task = asyncio.create_task(server.serve())
    await stop.wait()
    server.should_exit = True
    await task


async def _spawn_worker(settings: Settings) -> asyncio.subprocess.Process:
    env = {**os.environ, "DURABLE_NATS_URL": settings.nats_url, "DURABLE_DATABASE_URL": settings.database_url,
           "DURABLE_CONFIG_FILE": str(settings.config_file.resolve()), "DURABLE_WORKER_NAME": "",
           DEV_CHILD_ENV: "1"}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "durable.cli", "worker", env=env,
                                                start_new_session=True)


async def _stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _wait_balanced(worker: object, workers: int, timeout: float = 30.0) -> None:
    """Until this worker sees all the others and holds just its share."""
    from .objects.host import Worker  # noqa: PLC0415

    assert isinstance(worker, Worker)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if len(worker.ownership.live) >= workers and set(worker.parts) == worker.ownership.desired():
            return
        await asyncio.sleep(0.1)


async def _dev(reset: bool, workers: int) -> None:
    settings, config = _load({})
    config.load_classes()  # an unimportable class stops start-up here, with its binding named
    data = settings.data_dir
    if reset and data.exists():
        shutil.rmtree(data)
        print(f"reset: removed {data}", file=sys.stderr)
    stop = _stop_event()
    async with contextlib.AsyncExitStack() as stack:
        overrides: dict[str, object] = {}
        if not settings.nats_url:
            nats = await stack.enter_async_context(
                EmbeddedNats(data / "nats", port=settings.nats_port, partitions=settings.partitions))
            overrides["nats_url"] = nats.url
            print(f"nats-server     {nats.url}  (JetStream, data in {data / 'nats'}, pid {nats.pid})")
        if not settings.database_url:
            pg = await stack.enter_async_context(EmbeddedPostgres(data / "postgres", port=settings.postgres_port))
            overrides["database_url"] = pg.url
            print(f"postgres        {pg.url}  (data in {data / 'postgres'}, pid {pg.pid})")
        settings = settings.model_copy(update=overrides)
        from .objects.host import Worker  # noqa: PLC0415

        worker = Worker(settings, config)
        await worker.start()
        stack.push_async_callback(worker.stop)
        await worker.wait_ready(30)
        print(f"worker          {worker.worker_id}  (classes: {', '.join(sorted(worker.classes))})")
        for _ in range(workers - 1):
            proc = await _spawn_worker(settings)
            stack.push_async_callback(_stop_process, proc)
            print(f"worker          pid {proc.pid}  (a separate process)")
        if workers > 1:
            await _wait_balanced(worker, workers)
        print(f"partitions      {settings.partitions}, this process owns {len(worker.parts)}")
        print(f"router          http://{settings.http_host}:{settings.http_port}")
        print(f"ready. try:  curl -X POST http://127.0.0.1:{settings.http_port}/counter/demo/increment"
              "   (Ctrl-C stops)", flush=True)
        await _serve_router(settings, config, stop)
        print("stopping...", file=sys.stderr)
    print("stopped.", file=sys.stderr)


async def _worker() -> None:
    settings, config = _load({})
    if not settings.nats_url or not settings.database_url:
        raise ConfigError("durable worker needs DURABLE_NATS_URL and DURABLE_DATABASE_URL")
    refuse_dev_secret(settings, "worker")
    from .objects.host import Worker  # noqa: PLC0415

    stop = _stop_event()
    worker = Worker(settings, config)
    await worker.start()
    print(f"worker {worker.worker_id} started", flush=True)
    await stop.wait()
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


async def _status(as_json: bool) -> None:
    from . import status  # noqa: PLC0415

    settings, _ = _load({})
    # with nothing configured, look at what `durable dev` runs
    overrides: dict[str, object] = {}
    if not settings.nats_url:
        overrides["nats_url"] = f"nats://127.0.0.1:{settings.nats_port}"
    if not settings.database_url:
        overrides["database_url"] = f"postgresql://postgres@127.0.0.1:{settings.postgres_port}/postgres"
    settings = settings.model_copy(update=overrides)
    try:
        result = await status.collect(settings)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"cannot reach Postgres at {settings.database_url}: {exc}") from None
    print(json.dumps(result, indent=2) if as_json else status.render(result))


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
    id_cmd = sub.add_parser("id", help="print the id of a named object, e.g. `durable id Counter demo`")
    id_cmd.add_argument("target", help="binding (COUNTERS) or class (Counter)")
    id_cmd.add_argument("name")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    telemetry.configure_from_env(f"durable-{args.command}")
    try:
        if args.command == "dev":
            asyncio.run(_dev(args.reset, args.workers))
        elif args.command == "worker":
            asyncio.run(_worker())
        elif args.command == "status":
            asyncio.run(_status(args.json))
        elif args.command == "id":
            _print_id(args.target, args.name)
        elif args.command == "gateway":
            asyncio.run(_gateway())
        else:
            asyncio.run(_router())
    except ConfigError as exc:
        print(f"durable: configuration error:\n{exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
