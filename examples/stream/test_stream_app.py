"""The stream app through real WebSockets (the package's pytest plugin serves it)."""

from __future__ import annotations

import json

import httpx
from durable.testing import DurableApp
from websockets.asyncio.client import connect


async def _next(ws, kind: str) -> dict:
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == kind:
            return frame


async def test_a_publisher_streams_to_a_viewer_who_resumes(durable_app: DurableApp) -> None:
    async with durable_app.serve() as base:
        ws_base = base.replace("http", "ws", 1)
        async with connect(f"{ws_base}/stream/live?role=publisher&id=studio") as studio:
            assert (await _next(studio, "welcome"))["head"] == 0
            async with connect(f"{ws_base}/stream/live?role=viewer&id=v1") as viewer:
                await _next(viewer, "welcome")
                for n in range(3):
                    await studio.send(json.dumps({"type": "publish", "data": {"n": n}}))
                    assert (await _next(studio, "published"))["offset"] == n + 1
                got = [await _next(viewer, "message") for _ in range(3)]
                assert [(m["offset"], m["data"]["n"]) for m in got] == [(1, 0), (2, 1), (3, 2)]
            await studio.send(json.dumps({"type": "publish", "data": "while you were away"}))
            await _next(studio, "published")
            async with connect(f"{ws_base}/stream/live?role=viewer&id=v1&since=3") as back:
                assert (await _next(back, "message"))["data"] == "while you were away"
        async with httpx.AsyncClient(base_url=base) as http:
            stats = (await http.get("/stream/live")).json()
            assert (stats["head"], stats["viewers"], stats["publisher"]) == (4, 0, None)
            assert [m["offset"] for m in (await http.get("/stream/live/messages?since=2")).json()] == [3, 4]
            assert (await http.get("/stream/live/messages?since=x")).status_code == 400


async def test_a_second_publisher_is_refused_without_takeover(durable_app: DurableApp) -> None:
    async with durable_app.serve() as base:
        ws_base = base.replace("http", "ws", 1)
        async with connect(f"{ws_base}/stream/solo?role=publisher&id=a") as first:
            await _next(first, "welcome")
            async with httpx.AsyncClient(base_url=base) as http:
                refused = await http.get("/stream/solo?role=publisher&id=b", headers={
                    "connection": "upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
                    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="})
            assert refused.status_code == 409 and "takeover=1" in refused.json()["error"]
