"""The chat app through real WebSockets: `durable_app.serve()` runs the router and its gateway."""

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


async def test_two_users_talk_and_the_page_is_served(durable_app: DurableApp) -> None:
    async with durable_app.serve() as base:
        async with httpx.AsyncClient(base_url=base) as http:
            page = await http.get("/")
            assert page.status_code == 200 and "/static/chat.js" in page.text
            assert (await http.get("/static/chat.js")).status_code == 200
            assert (await http.get("/static/../chat_app.py")).status_code == 404
        ws_base = base.replace("http", "ws", 1)
        async with connect(f"{ws_base}/room/lobby?userId=ada&name=Ada") as ada:
            assert (await _next(ada, "welcome"))["you"]["name"] == "Ada"
            async with connect(f"{ws_base}/room/lobby?userId=bob&name=Bob") as bob:
                await _next(bob, "welcome")
                assert (await _next(ada, "join"))["userId"] == "bob"
                await bob.send(json.dumps({"type": "message", "content": "hello"}))
                got = await _next(ada, "message")
                assert (got["name"], got["content"], got["seq"]) == ("Bob", "hello", 1)
                await bob.send("not json")
                assert "JSON" in (await _next(bob, "error"))["error"]
        async with httpx.AsyncClient(base_url=base) as http:
            history = (await http.get("/room/lobby/messages")).json()
            assert [m["content"] for m in history] == ["hello"]


async def test_a_join_without_a_name_is_refused(durable_app: DurableApp) -> None:
    response = await durable_app.fetch("/room/lobby")
    assert response.status == 426  # a plain GET: connect with a WebSocket
