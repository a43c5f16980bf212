"""The client's address the router gives the routing code (``CF-Connecting-IP``): the socket's
peer, over HTTP and WebSocket upgrades alike, unless that peer is a trusted proxy; then the
right-most untrusted hop of ``X-Forwarded-For``. The API's rate limit keys on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from durable.client import Client, Env
from durable.core.config import AppConfig
from durable.core.http import Request, Response
from durable.core.settings import Settings
from durable.objects import Worker
from durable.router.app import create_app
from durable.testing.app import serve_asgi
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


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
