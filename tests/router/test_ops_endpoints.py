"""The router's and gateway's own endpoints: /livez, /readyz, /metrics, answered ahead of the
app's routing code."""

from __future__ import annotations

import asyncio
import json

import httpx
from durable.core.config import AppConfig
from durable.core.http import Request, Response
from durable.core.settings import Settings
from durable.objects import Worker
from durable.router.app import create_app
from durable.testing.app import serve_asgi
from websockets.asyncio.client import connect

from tests.helpers import routes
from tests.helpers.gateway import inproc_gateway
from tests.helpers.ops import samples, value
from tests.helpers.waiting import assert_eventually


async def test_probes_are_answered_by_the_router_not_the_app(worker: Worker, settings: Settings,
                                                             config: AppConfig) -> None:
    seen: list[str] = []

    async def fetch(request: Request, env: object) -> Response:
        seen.append(request.path)
        return Response("app", 200)

    app = create_app(settings, config, user_fetch=fetch, websockets=False)
    async with serve_asgi(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        live, ready = await http.get("/livez"), await http.get("/readyz")
        assert (live.status_code, live.text) == (200, "ok\n")
        assert (ready.status_code, ready.text) == (200, "ok\n")
        assert (await http.get("/anything")).text == "app"
        assert seen == ["/anything"]  # the probes never reached the app
        app.state.ops.draining = True  # what a SIGTERM does first (cli._serve_router)
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and "stopping" in ready.text
        assert (await http.get("/livez")).status_code == 200


async def test_router_metrics_count_requests_by_method_and_status(worker: Worker, settings: Settings,
                                                                  config: AppConfig) -> None:
    app = create_app(settings, config, user_fetch=routes.fetch, websockets=False)
    async with serve_asgi(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(5):
            assert (await http.post("/counter/router-metered/increment")).status_code == 200
        for _ in range(3):
            assert (await http.get("/no/such/route")).status_code == 404
        await http.get("/livez")  # the router's own answers are not counted as traffic
        metrics = await http.get("/metrics")
    assert metrics.status_code == 200
    parsed = samples(metrics.text)
    assert value(parsed, "durable_http_requests_total", method="POST", status="2xx") == 5
    assert value(parsed, "durable_http_requests_total", method="GET", status="4xx") == 3
    assert value(parsed, "durable_http_request_seconds_count") == 8


async def test_gateway_metrics_count_open_sockets_and_frames(worker: Worker, settings: Settings,
                                                             config: AppConfig) -> None:
    async with inproc_gateway(settings, config) as (url, gateway):
        http_url = url.replace("ws://", "http://")

        async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            async with httpx.AsyncClient() as http:
                return samples((await http.get(f"{http_url}/metrics")).text)

        assert value(await scrape(), "durable_websockets_open") == 0
        async with connect(f"{url}/sock/metered") as ws:
            await ws.send(json.dumps({"op": "echo", "v": 1}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"echo": 1}

            async def counted() -> bool:
                parsed = await scrape()
                return value(parsed, "durable_websockets_open") == 1 and \
                    value(parsed, "durable_websocket_frames_total", direction="in") == 1

            await assert_eventually(counted, 10, "one socket open, one frame in")
            assert value(await scrape(), "durable_websocket_deliveries_total") >= 1

        async def closed() -> bool:
            return value(await scrape(), "durable_websockets_open") == 0

        await assert_eventually(closed, 10, "the socket is counted out once closed")
    assert gateway.frames_in == 1


async def test_a_gateway_alone_answers_its_probes(worker: Worker, settings: Settings, config: AppConfig) -> None:
    app = create_app(settings, config, user_fetch=routes.fetch, http=False)
    async with serve_asgi(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.get("/livez")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        assert "durable_websockets_open 0.0" in (await http.get("/metrics")).text
