"""Safe defaults (issue 9, item 7): the development id secret is refused outside `durable dev`;
the client's address is the socket's peer unless trusted proxies are configured; the
RateLimiter allows at most LIMIT requests in any window, with a clock its tests move."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from durable.client import Client, Env
from durable.core.config import AppConfig
from durable.core.errors import ConfigError, ObjectReset
from durable.core.http import Request, Response
from durable.core.settings import DEV_CHILD_ENV, DEV_ID_SECRET, Settings, client_address, refuse_dev_secret
from durable.core.subjects import partition_of
from durable.objects import Worker
from durable.objects.patterns import RateLimiter
from durable.router.app import create_app
from durable.testing.app import serve_asgi
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.helpers.settings import ROOT, TEST_CONFIG
from tests.helpers.workers import WorkerFactory

# ----- the development id secret ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["worker", "router", "gateway"])
def test_processes_refuse_the_development_id_secret(command: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env.update({"DURABLE_NATS_URL": "nats://127.0.0.1:1", "DURABLE_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
                "DURABLE_CONFIG_FILE": str(TEST_CONFIG), "PYTHONPATH": str(ROOT)})
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "durable.cli", command], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"durable {command} refuses to run with the development id secret" in proc.stderr
    assert "DURABLE_ID_SECRET" in proc.stderr
    message = proc.stderr.split("configuration error:\n", 1)[1].strip()
    assert "\n" not in message  # one paragraph
    assert time.monotonic() - started < 30  # refused before anything is contacted


def test_the_development_secret_is_refused_unless_dev_started_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DURABLE_ID_SECRET", raising=False)
    monkeypatch.delenv(DEV_CHILD_ENV, raising=False)
    assert Settings().id_secret == DEV_ID_SECRET  # what `durable dev` (and `durable id` there) uses
    with pytest.raises(ConfigError, match="DURABLE_ID_SECRET"):
        refuse_dev_secret(Settings(), "worker")
    refuse_dev_secret(Settings(id_secret="a-real-secret"), "worker")  # fine
    monkeypatch.setenv(DEV_CHILD_ENV, "1")  # a worker `durable dev --workers N` started
    refuse_dev_secret(Settings(), "worker")


# ----- trusted proxies -------------------------------------------------------------------------


def test_client_address_believes_forwarded_for_only_from_trusted_proxies() -> None:
    assert client_address("127.0.0.1", ["203.0.113.9"], []) == "127.0.0.1"
    assert client_address("192.0.2.1", ["203.0.113.9"], ["10.0.0.0/8"]) == "192.0.2.1"
    assert client_address("10.1.2.3", ["203.0.113.9"], ["10.0.0.0/8"]) == "203.0.113.9"
    # the right-most untrusted hop: what is left of it was written by the client
    assert client_address("10.1.2.3", ["198.51.100.1, 203.0.113.9, 10.9.9.9"], ["10.0.0.0/8"]) == "203.0.113.9"
    assert client_address("10.1.2.3", ["198.51.100.1", "203.0.113.9"], ["10.0.0.0/8"]) == "203.0.113.9"
    assert client_address("10.1.2.3", [], ["10.0.0.0/8"]) == "10.1.2.3"
    assert client_address("::ffff:10.1.2.3", ["2001:db8::1"], ["10.0.0.0/8"]) == "2001:db8::1"
    assert client_address(None, ["203.0.113.9"], ["10.0.0.0/8"]) == "unknown"


def test_trusted_proxies_setting_is_a_comma_separated_list_of_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().trusted_proxies == []
    monkeypatch.setenv("DURABLE_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1,,2001:db8::/32")
    assert Settings().trusted_proxies == ["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"]
    monkeypatch.setenv("DURABLE_TRUSTED_PROXIES", "10.0.0.0/8,my-proxy")
    with pytest.raises(ValidationError, match="'my-proxy' is not an IP address or CIDR"):
        Settings()


async def _echo_address(request: Request, env: Env) -> Response:
    """The address the routing code is given (a WebSocket upgrade is refused, with it as body)."""
    return Response(request.headers.get("cf-connecting-ip") or "", 403)


@asynccontextmanager
async def serve(settings: Settings, config: AppConfig, client: Client,
                user_fetch: Any = _echo_address) -> AsyncIterator[str]:
    """The router app under uvicorn as `durable router` configures it (cli.server_config)."""
    app = create_app(settings, config, user_fetch=user_fetch, client=client)
    async with serve_asgi(app) as port:
        yield f"127.0.0.1:{port}"


async def _addresses(base: str, forwarded: list[str]) -> tuple[list[str], list[str]]:
    """The address seen for each X-Forwarded-For value, over HTTP and over a WebSocket upgrade."""
    http_seen, ws_seen = [], []
    async with httpx.AsyncClient(base_url=f"http://{base}") as http:
        for xff in forwarded:
            r = await http.get("/who", headers={"X-Forwarded-For": xff, "CF-Connecting-IP": "192.0.2.66"})
            http_seen.append(r.text)
    for xff in forwarded:
        with pytest.raises(InvalidStatus) as err:
            async with connect(f"ws://{base}/who", additional_headers={"X-Forwarded-For": xff}):
                pass
        assert err.value.response.status_code == 403
        ws_seen.append(err.value.response.body.decode())
    return http_seen, ws_seen


async def test_forwarded_for_is_ignored_without_trusted_proxies(settings: Settings, config: AppConfig,
                                                               client: Client) -> None:
    assert settings.trusted_proxies == []
    async with serve(settings, config, client) as base:
        http_seen, ws_seen = await _addresses(base, ["203.0.113.1", "203.0.113.2", "198.51.100.7, 127.0.0.1"])
    assert http_seen == ["127.0.0.1"] * 3
    assert ws_seen == ["127.0.0.1"] * 3


async def test_forwarded_for_names_the_client_behind_a_trusted_proxy(settings: Settings, config: AppConfig,
                                                                     client: Client) -> None:
    trusting = settings.model_copy(update={"trusted_proxies": ["127.0.0.0/8"]})
    async with serve(trusting, config, client) as base:
        http_seen, ws_seen = await _addresses(
            base, ["203.0.113.1", "203.0.113.2", "198.51.100.7, 203.0.113.3", "203.0.113.4, 127.0.0.5"])
    assert http_seen == ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"]
    assert ws_seen == http_seen
    # a proxy that is not the peer is not trusted for it
    other = settings.model_copy(update={"trusted_proxies": ["10.0.0.0/8"]})
    async with serve(other, config, client) as base:
        http_seen, _ = await _addresses(base, ["203.0.113.1"])
    assert http_seen == ["127.0.0.1"]


async def test_api_rate_limit_cannot_be_dodged_with_forwarded_for(worker: Worker, settings: Settings,
                                                                   config: AppConfig, client: Client) -> None:
    """The issue's reproduction: 150 requests from one client, each naming another address."""
    async with serve(settings, config, client, user_fetch=None) as base, \
            httpx.AsyncClient(base_url=f"http://{base}") as http:
        statuses = [(await http.get(f"/api/item/{i}", headers={"X-Forwarded-For": f"203.0.113.{i % 250}"})
                     ).status_code for i in range(150)]
    assert statuses == [200] * 100 + [429] * 50


# ----- RateLimiter: a sliding window, on a clock the test moves -------------------------------


class ClockedLimiter(RateLimiter):
    """RateLimiter on a clock that stands still until the test moves it (class-level: it survives
    eviction). It starts at real time and only goes forward, so the alarms it sets (cleaning up,
    as in production) are never in the real past."""

    clock_ms = 0

    def now_ms(self) -> int:
        return ClockedLimiter.clock_ms


@pytest.fixture
async def limiter_worker(start_worker: WorkerFactory) -> Worker:
    ClockedLimiter.clock_ms = int(time.time() * 1000)
    return await start_worker(classes={"RateLimiter": ClockedLimiter})


@pytest.fixture
def limiter_env(limiter_worker: Worker, env: Env) -> Env:
    return env


def _advance_to(ms_before_a_minute: int) -> None:
    """Move the clock on to ``ms_before_a_minute`` before a wall-clock minute ends."""
    now = ClockedLimiter.clock_ms
    ClockedLimiter.clock_ms += 60_000 - now % 60_000 - ms_before_a_minute + 60_000


async def _evict(worker: Worker, stub: Any) -> None:
    """As an idle timeout does, once its writes are durable: the next call builds a new instance."""
    object_id = stub.id.hex
    state = worker.parts[partition_of(object_id, worker.settings.partitions)]
    inst = state.instances[object_id]
    await inst.storage.sync()
    inst.fail(ObjectReset("evicted by the test"))


async def test_a_burst_across_a_minute_boundary_is_refused(limiter_env: Env, limiter_worker: Worker) -> None:
    """A fixed window let 100 requests just before a minute ends and 100 just after through (200 in
    4.2 s); the sliding window counts the last 60 s, wherever the minute boundary falls."""
    limiter = limiter_env.RATE_LIMITER.get_by_name("203.0.113.50")
    _advance_to(2_100)
    first = [await limiter.check() for _ in range(100)]
    assert all(v["allowed"] for v in first) and first[-1]["remaining"] == 0
    ClockedLimiter.clock_ms += 4_200  # across the boundary
    await _evict(limiter_worker, limiter)  # and the object was evicted meanwhile: the log is in storage
    second = [await limiter.check() for _ in range(100)]
    assert not any(v["allowed"] for v in second)
    # another client is not affected
    assert (await limiter_env.RATE_LIMITER.get_by_name("203.0.113.51").check())["allowed"]


async def test_retry_after_is_honest(limiter_env: Env) -> None:
    limiter = limiter_env.RATE_LIMITER.get_by_name("203.0.113.60")
    check = Request("http://internal/check")
    for i in range(100):
        ClockedLimiter.clock_ms += 300  # at 0.3 s, 0.6 s, ... 30 s
        assert (await limiter.fetch(check)).status == 200, i
    ClockedLimiter.clock_ms += 10_000
    refused = await limiter.fetch(check)
    assert refused.status == 429 and refused.headers.get("x-ratelimit-remaining") == "0"
    retry_after = int(refused.headers.get("retry-after") or 0)
    # now 40 s: the first request (0.3 s) ages out at 60.3 s, in 20.3 s -> 21 s
    assert retry_after == 21, refused.headers
    ClockedLimiter.clock_ms += (retry_after - 1) * 1000
    assert (await limiter.fetch(check)).status == 429  # a second early: still refused
    ClockedLimiter.clock_ms += 1000
    # 61 s: the requests of 0.3, 0.6 and 0.9 s aged out; three more pass, then 1.2 s + 60 s is next
    assert [(await limiter.fetch(check)).status for _ in range(3)] == [200] * 3
    again = await limiter.fetch(check)
    assert again.status == 429 and again.headers.get("retry-after") == "1"


async def test_the_window_slides_one_request_at_a_time(limiter_env: Env) -> None:
    limiter = limiter_env.RATE_LIMITER.get_by_name("203.0.113.70")
    for _ in range(50):
        assert (await limiter.check())["allowed"]
    ClockedLimiter.clock_ms += 30_000
    for _ in range(50):
        assert (await limiter.check())["allowed"]
    assert not (await limiter.check())["allowed"]
    ClockedLimiter.clock_ms += 30_001  # the first 50 aged out, the last 50 not
    verdicts = [await limiter.check() for _ in range(51)]
    assert [v["allowed"] for v in verdicts] == [True] * 50 + [False]
