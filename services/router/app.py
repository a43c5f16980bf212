"""The router service: an ASGI app that hands every HTTP request to the user's ``fetch(request, env)``.

The client's address is passed on as ``CF-Connecting-IP`` (replacing whatever the client sent,
so it cannot be spoofed), as Cloudflare does for Workers: the socket's peer, or, when that peer
is one of ``DURABLE_TRUSTED_PROXIES``, the right-most untrusted address of ``X-Forwarded-For``.

``/livez``, ``/readyz`` and ``/metrics`` are answered by the router itself, ahead of the app's
routing code (one dict lookup per request decides): see :class:`Ops`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

from opentelemetry.trace import SpanKind
from prometheus_client.core import Metric
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from ..client import Client, Env
from ..client.client import LocalDispatch
from ..core import telemetry
from ..core.config import AppConfig, import_function
from ..core.errors import DurableError, RequestTimeout
from ..core.http import Request, Response
from ..core.metrics import CONTENT_TYPE, RouterMetrics, counter, gauge, register_callback, render
from ..core.settings import Settings
from ..core.wire import IDEMPOTENCY_HEADER
from ..gateway import Gateway, client_headers

log = logging.getLogger("durable.router")

MAX_BODY_BYTES = 1024 * 1024
UserFetch = Callable[[Request, Env], Awaitable[Response]]


class Ops:
    """The router's (and gateway's) own endpoints: liveness, readiness and metrics.

    Ready: the app started (its NATS connection made), NATS connected now, and no stop begun.
    The router does not use Postgres (the workers do), so readiness does not look at it.
    """

    PATHS = ("/livez", "/readyz", "/metrics")

    def __init__(self) -> None:
        self.metrics = RouterMetrics()
        self.client: Client | None = None
        self.gateway: Gateway | None = None
        #: set by a SIGTERM (see cli._serve_router): /readyz answers 503 before the server stops
        self.draining = False
        register_callback(self.metrics.registry, self._collect)

    def _collect(self) -> Iterator[Metric]:
        gw = self.gateway
        if gw is None:
            return
        yield gauge("durable_websockets_open", "WebSockets open on this gateway", float(len(gw.conns)))
        yield counter("durable_websocket_frames", "Frames from clients to objects", gw.frames_in,
                      {"direction": "in"})
        yield counter("durable_websocket_deliveries", "Frames delivered from objects to clients", gw.frames_out)
        yield counter("durable_websocket_auto_responses", "Frames answered by an object's auto-response "
                      "without waking it", gw.auto_responses)

    def readiness(self) -> list[str]:
        reasons = []
        if self.draining:
            reasons.append("stopping (draining)")
        if self.client is None:
            reasons.append("starting: not connected to NATS yet")
        elif not self.client.nc.is_connected:
            reasons.append("not connected to NATS")
        return reasons

    def answer(self, path: str) -> StarletteResponse:
        if path == "/livez":
            return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})
        if path == "/readyz":
            reasons = self.readiness()
            body = "ok\n" if not reasons else "not ready: " + "; ".join(reasons) + "\n"
            return PlainTextResponse(body, 503 if reasons else 200, headers={"Cache-Control": "no-store"})
        return StarletteResponse(render(self.metrics.registry), 200, media_type=CONTENT_TYPE)


def error_response(exc: DurableError, keyed: bool) -> JSONResponse:
    """An object's error as HTTP. A timeout's outcome is unknown: 504, not retryable unless the
    request carried an Idempotency-Key (then repeating it cannot apply it twice). Refusals that
    provably did not run are 503 (retry elsewhere or later); errors of the caller keep their 4xx."""
    status = 504 if isinstance(exc, RequestTimeout) else \
        503 if exc.retryable or exc.overloaded else (exc.status if exc.status < 500 else 500)
    error = exc.to_wire()
    if isinstance(exc, RequestTimeout):
        error["retryable"] = keyed
    return JSONResponse({"error": error}, status)


def create_app(settings: Settings, config: AppConfig, user_fetch: UserFetch | None = None,
               client: Client | None = None, http: bool = True, websockets: bool = True,
               local: LocalDispatch | None = None) -> Starlette:
    """The router: HTTP requests (``http``) and WebSocket upgrades (``websockets``, the gateway)
    both go to ``user_fetch`` (by default the app's routing function: see :func:`load_routes`).
    ``durable gateway`` serves only the WebSockets. ``local``: a worker in this process that
    takes the requests for the partitions it serves without NATS (``durable dev``)."""
    state: dict[str, Any] = {}
    fetch_fn: UserFetch = user_fetch or load_routes(settings, config)
    ops = Ops()
    ops_paths = dict.fromkeys(Ops.PATHS)
    metrics = ops.metrics

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own = client is None
        c = await _client(settings, config, client, local)
        state["env"] = Env(c, config)
        gateway = Gateway(settings, c, state["env"], fetch_fn) if websockets else None
        app.state.gateway = gateway
        if gateway is not None:
            await gateway.start()
        ops.client, ops.gateway = c, gateway
        try:
            yield
        finally:
            ops.client = None
            if gateway is not None:
                await gateway.stop()
            if own:
                await c.close()

    async def handle(request: StarletteRequest) -> StarletteResponse:
        path = request.scope["path"]
        if path in ops_paths:
            return ops.answer(path)
        started = time.perf_counter()
        response = await _handle(request)
        metrics.request(request.method, response.status_code, time.perf_counter() - started)
        return response

    async def _handle(request: StarletteRequest) -> StarletteResponse:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"request body over {MAX_BODY_BYTES} bytes"}, 413)
        headers = client_headers(request.headers, request.client, settings.trusted_proxies)
        req = Request(str(request.url), request.method, headers, body)
        try:
            with telemetry.tracer.start_as_current_span(
                f"{request.method} {request.url.path}", context=telemetry.extract(request.headers),
                kind=SpanKind.SERVER,
            ):
                response = await fetch_fn(req, state["env"])
        except DurableError as exc:
            return error_response(exc, IDEMPOTENCY_HEADER.lower() in request.headers)
        return StarletteResponse(response.body, response.status, dict(response.headers.items()))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    app_routes: list[BaseRoute] = []
    if http:
        app_routes.append(Route("/{path:path}", handle, methods=methods))
    else:  # a gateway alone still answers its probes and scrapes

        async def handle_ops(request: StarletteRequest) -> StarletteResponse:
            return ops.answer(request.scope["path"])

        app_routes.extend(Route(path, handle_ops, methods=["GET", "HEAD"]) for path in Ops.PATHS)
    middleware = [Middleware(_GatewaySockets)] if websockets else []
    app = Starlette(routes=app_routes, lifespan=lifespan, middleware=middleware)
    app.state.trusted_proxies = list(settings.trusted_proxies)  # for uvicorn: see cli.server_config
    app.state.ops = ops
    return app


class _GatewaySockets:
    """Every WebSocket upgrade goes to the gateway, ahead of Starlette's routing and exception
    layers (which add nothing to a socket the gateway serves whole): the gateway gets the
    server's own ``send``, so that it can write frames to the socket directly (gateway/direct.py),
    and an idle socket holds a shorter chain of coroutines."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        await scope["app"].state.gateway.serve(WebSocket(scope, receive, send))


async def _client(settings: Settings, config: AppConfig, client: Client | None,
                  local: LocalDispatch | None) -> Client:
    """The client given, or a connection of the router's own; with ``local`` as its in-process worker."""
    c = client or await Client.connect(settings, config)
    if local is not None:
        c.local = local
    return c


def load_routes(settings: Settings, config: AppConfig) -> UserFetch:
    """The app's routing function: ``DURABLE_ROUTES`` if set, else ``routes`` in durable.toml
    (imported from the app's folder); an app without one answers every request 404, saying so."""
    if settings.routes:
        config.make_importable()
        return import_function(settings.routes, "DURABLE_ROUTES")
    if config.routes:
        config.make_importable()
        return import_function(config.routes, f"{config.path}: routes")
    return _no_routes(config)


def _no_routes(config: AppConfig) -> UserFetch:
    hint = (f"this app has no routing function: add routes = \"module:function\" to {config.path} "
            "(an async def fetch(request, env) -> Response), or call its objects over NATS")

    async def fetch(request: Request, env: Env) -> Response:
        return Response(hint, 404, {"content-type": "text/plain; charset=utf-8"})

    return fetch
