"""The router service: an ASGI app that hands every HTTP request to the user's ``fetch(request, env)``.

The socket's peer address is passed on as ``CF-Connecting-IP`` (replacing whatever the client
sent, so it cannot be spoofed), as Cloudflare does for Workers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import Route

from ..client import Client, Env
from ..core import telemetry
from ..core.config import AppConfig
from ..core.errors import DurableError
from ..core.http import Request, Response
from ..core.settings import Settings
from . import routes

log = logging.getLogger("durable.router")

MAX_BODY_BYTES = 1024 * 1024
UserFetch = Callable[[Request, Env], Awaitable[Response]]


def create_app(settings: Settings, config: AppConfig, user_fetch: UserFetch = routes.fetch,
               client: Client | None = None) -> Starlette:
    state: dict[str, Env] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own = client is None
        c = client or await Client.connect(settings, config)
        state["env"] = Env(c, config)
        try:
            yield
        finally:
            if own:
                await c.close()

    async def handle(request: StarletteRequest) -> StarletteResponse:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"request body over {MAX_BODY_BYTES} bytes"}, 413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "cf-connecting-ip"]
        headers.append(("cf-connecting-ip", request.client.host if request.client else "unknown"))
        req = Request(str(request.url), request.method, headers, body)
        try:
            with telemetry.tracer.start_as_current_span(
                f"{request.method} {request.url.path}", context=telemetry.extract(request.headers),
                kind=SpanKind.SERVER,
            ):
                response = await user_fetch(req, state["env"])
        except DurableError as exc:
            status = 503 if exc.retryable or exc.overloaded else (exc.status if exc.status < 500 else 500)
            return JSONResponse({"error": exc.to_wire()}, status)
        return StarletteResponse(response.body, response.status, dict(response.headers.items()))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", handle, methods=methods)], lifespan=lifespan)
