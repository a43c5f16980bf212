"""A worker's health port: /livez, /readyz through start, stop and a Postgres it cannot reach,
and /metrics after traffic, parsed with the Prometheus text parser."""

from __future__ import annotations

import asyncio
import signal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from durable.client import Env
from durable.core.config import AppConfig
from durable.core.errors import ConfigError, UnknownMethod
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.logs import records
from tests.helpers.ops import TcpProxy, free_port, get, samples, value
from tests.helpers.settings import PARTITIONS
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory, WorkerProcess


async def test_readiness_turns_true_once_started_and_false_when_a_stop_begins(
        settings: Settings, config: AppConfig) -> None:
    worker = Worker(settings.model_copy(update={"health_port": free_port()}), config)
    before = await worker.readiness()
    assert not before.ready
    assert "not connected to NATS" in before.reasons and "migrations not applied yet" in before.reasons
    await worker.start()
    try:
        base = f"http://127.0.0.1:{worker.settings.health_port}"
        assert (await get(f"{base}/livez")).status_code == 200
        await worker.wait_ready()

        async def ready() -> bool:
            return (await get(f"{base}/readyz")).status_code == 200

        await assert_eventually(ready, 10, "/readyz answers 200")
        worker.begin_stop()
        answer = await get(f"{base}/readyz")
        assert answer.status_code == 503 and "stopping" in answer.text
        assert (await get(f"{base}/livez")).status_code == 200  # alive while it drains
    finally:
        await worker.stop(grace=2)
    with pytest.raises(httpx.ConnectError):  # the port closes with the worker
        await get(f"http://127.0.0.1:{worker.settings.health_port}/livez")


async def test_unknown_paths_and_methods_are_refused(start_worker: WorkerFactory) -> None:
    worker = await start_worker(health_port=free_port())
    base = f"http://127.0.0.1:{worker.settings.health_port}"
    assert (await get(f"{base}/nope")).status_code == 404
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.settings.health_port)
    writer.write(b"POST /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 405")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.settings.health_port)
    writer.write(b"garbage\r\n\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 400")
    writer.close()
    assert (await get(f"{base}/livez")).status_code == 200  # junk did not hurt it


async def test_readiness_follows_postgres_going_away_and_coming_back(
        start_worker: WorkerFactory, settings: Settings) -> None:
    """The worker reaches Postgres through a proxy of the test's own; cutting the proxy is
    Postgres unreachable for that worker alone (the session's server runs on)."""
    url = urlsplit(settings.database_url)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 5432)
    await proxy.start()
    try:
        via_proxy = urlunsplit(url._replace(netloc=url.netloc.replace(f":{url.port}", f":{proxy.port}")))
        worker = await start_worker(health_port=free_port(), database_url=via_proxy)
        base = f"http://127.0.0.1:{worker.settings.health_port}"

        async def status() -> int:
            return (await get(f"{base}/readyz", timeout=10)).status_code

        await assert_eventually(lambda: _is(status, 200), 10, "ready through the proxy")
        proxy.block()
        await assert_eventually(lambda: _is(status, 503), 15, "not ready with Postgres unreachable")
        answer = await get(f"{base}/readyz", timeout=10)
        assert "Postgres does not answer" in answer.text, answer.text
        assert (await get(f"{base}/livez")).status_code == 200  # alive: it waits for the database
        proxy.unblock()
        await assert_eventually(lambda: _is(status, 200), 30, "ready again once Postgres answers")
    finally:
        await proxy.stop()


async def _is(status: object, want: int) -> bool:
    assert callable(status)
    return bool(await status() == want)


async def test_metrics_after_traffic_count_what_was_sent(start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(health_port=free_port())
    counter = env.COUNTERS.get_by_name("metered")
    for _ in range(7):
        await counter.increment()
    for _ in range(2):
        with pytest.raises(UnknownMethod):
            await counter.no_such_method()
    answer = await get(f"http://127.0.0.1:{worker.settings.health_port}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    parsed = samples(answer.text)
    assert value(parsed, "durable_requests_total", namespace="Counter", method="rpc.increment", outcome="ok") == 7
    # a method the class lacks adds no series of its own: it is counted under "other"
    assert value(parsed, "durable_requests_total", namespace="other", method="other", outcome="error") == 2
    assert not any("no_such_method" in str(labels) for _, labels in parsed)
    assert value(parsed, "durable_request_seconds_count", namespace="Counter") == 7
    assert value(parsed, "durable_request_handler_seconds_count", namespace="Counter") == 7
    assert value(parsed, "durable_request_queue_seconds_count", namespace="Counter") == 7
    assert value(parsed, "durable_request_flush_wait_seconds_count", namespace="Counter") == 7
    assert value(parsed, "durable_flush_batch_objects_count") >= 1
    assert value(parsed, "durable_flush_seconds_count") == value(parsed, "durable_flush_batch_objects_count")
    assert value(parsed, "durable_flush_rows_total") >= 1
    assert value(parsed, "durable_flushes_total") >= 1
    assert value(parsed, "durable_live_objects", namespace="Counter") == 1
    assert value(parsed, "durable_partitions_owned") == PARTITIONS
    assert value(parsed, "durable_partitions_acquired_total") == PARTITIONS
    assert value(parsed, "durable_epochs_fenced_total") == 0
    assert value(parsed, "durable_alarms_pending") == 0
    conn = await asyncpg.connect(worker.settings.database_url)
    try:
        stored = await conn.fetchval("SELECT sum(octet_length(key) + octet_length(value)) FROM do_storage "
                                     "WHERE namespace = 'Counter'")
    finally:
        await conn.close()
    assert value(parsed, "durable_storage_bytes", namespace="Counter") == stored > 0
    # object ids never become labels
    assert not any(counter.id.hex in str(labels) for _, labels in parsed)


async def test_alarm_metrics_count_runs_and_lateness(start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(health_port=free_port())
    alarmer = env.ALARMERS.get_by_name("metered-alarm")
    await alarmer.arm(0)

    async def ran() -> bool:
        return bool(await alarmer.runs())

    await assert_eventually(ran, 10, "the alarm ran")
    parsed = samples((await get(f"http://127.0.0.1:{worker.settings.health_port}/metrics")).text)
    assert value(parsed, "durable_alarms_fired_total") == 1
    assert value(parsed, "durable_alarm_lateness_seconds_count") == 1
    assert value(parsed, "durable_alarms_failed_total") == 0


async def test_evictions_are_counted(start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(health_port=free_port(), idle_timeout=0.2)
    await env.COUNTERS.get_by_name("evicted").increment()

    async def evicted() -> bool:
        text = (await get(f"http://127.0.0.1:{worker.settings.health_port}/metrics")).text
        return value(samples(text), "durable_evictions_total") >= 1

    await assert_eventually(evicted, 10, "the idle counter was evicted and counted")


@pytest.mark.slow
async def test_sigterm_turns_readiness_false_before_the_worker_exits(
        worker_process: type[WorkerProcess], settings: Settings) -> None:
    port = free_port()
    wp = worker_process()
    base_env = wp.env
    wp.env = lambda: {**base_env(), "DURABLE_HEALTH_PORT": str(port), "DURABLE_SHUTDOWN_DELAY": "2"}  # type: ignore[method-assign]
    await wp.start()
    base = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        return (await get(f"{base}/readyz")).status_code == 200

    await assert_eventually(ready, 20, "the worker process is ready")
    assert wp.proc is not None
    wp.proc.send_signal(signal.SIGTERM)
    seen_503_alive = False
    while wp.proc.poll() is None:
        try:
            answer = await get(f"{base}/readyz", timeout=2)
        except httpx.TransportError:
            break  # the port closed: the worker is on its way out
        if answer.status_code == 503 and wp.proc.poll() is None:
            assert "stopping" in answer.text
            seen_503_alive = True
        await asyncio.sleep(0.05)
    assert seen_503_alive, "readiness never turned false while the worker was still running"
    assert await asyncio.to_thread(wp.proc.wait, 30) == 0
    # its log is JSON lines (stderr is a file); the significant events carry their context
    logged = records(wp.log_path.read_text(errors="replace"))
    assert logged, wp.log_path.read_text(errors="replace")[-2000:]
    acquired = [r for r in logged if r["msg"].startswith("acquired")]
    assert acquired and all("partitions" in r and "epochs" in r and r["worker"] for r in acquired)
    assert any(r["msg"].startswith("worker stopping") for r in logged)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in logged)


async def test_a_health_port_in_use_is_a_clear_configuration_error(settings: Settings, config: AppConfig) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        worker = Worker(settings.model_copy(update={"health_port": port, "health_host": "127.0.0.1"}), config)
        with pytest.raises(ConfigError, match=f"DURABLE_HEALTH_PORT.*|health port 127.0.0.1:{port}"):
            await worker.start()
        assert not hasattr(worker, "nc")  # refused before connecting to anything
    finally:
        blocker.close()
