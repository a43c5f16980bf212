"""Gateways for tests (the router app with WebSockets, under uvicorn in this process, routing
through tests/helpers/routes.py) and the JSON exchanges tests have with sockets through them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.gateway import Gateway
from durable.router.app import create_app
from durable.testing.app import serve_asgi
from websockets.asyncio.client import ClientConnection

from . import routes


@asynccontextmanager
async def inproc_gateway(settings: Settings, config: AppConfig) -> AsyncIterator[tuple[str, Gateway]]:
    """A gateway (the router app with WebSockets) in this process on a free port: (ws:// URL, Gateway)."""
    app = create_app(settings, config, user_fetch=routes.fetch)
    async with serve_asgi(app) as port:
        yield f"ws://127.0.0.1:{port}", app.state.gateway


@asynccontextmanager
async def gateway(settings: Settings, config: AppConfig) -> AsyncIterator[str]:
    """An in-process gateway; yields its ws:// base URL."""
    async with inproc_gateway(settings, config) as (url, _):
        yield url


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    """The next frame, a JSON text."""
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def ask(ws: ClientConnection, cmd: dict[str, Any], timeout: float = 5.0) -> Any:
    """Send ``cmd`` as JSON; the next frame, as JSON."""
    await ws.send(json.dumps(cmd))
    return await recv_json(ws, timeout)
