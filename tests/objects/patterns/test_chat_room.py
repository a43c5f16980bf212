"""The ChatRoom pattern end to end: real gateway, real worker, the Python chat client."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx
import pytest
from durable.client.chat import ChatClient
from durable.core.settings import Settings
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.helpers.gateway import recv_json
from tests.helpers.waiting import assert_eventually


def http_url(gw: str) -> str:
    return "http" + gw[2:]


async def test_two_people_chat_and_see_each_other(gw: str) -> None:
    async with ChatClient(gw, "lobby", "u1", "Ada") as ada:
        welcome = await ada.next_event("welcome")
        assert [u["name"] for u in welcome["users"]] == ["Ada"] and welcome["seq"] == 0
        async with ChatClient(gw, "lobby", "u2", "Bob") as bob:
            assert [u["name"] for u in (await bob.next_event("welcome"))["users"]] == ["Ada", "Bob"]
            assert (await ada.next_event("join"))["name"] == "Bob"
            await ada.send("hello Bob")
            for c in (ada, bob):
                m = await c.next_event("message")
                assert (m["seq"], m["name"], m["content"]) == (1, "Ada", "hello Bob")
            await bob.typing()
            assert (await ada.next_event("typing"))["name"] == "Bob"
            async with httpx.AsyncClient(base_url=http_url(gw)) as http:
                users = (await http.get("/room/lobby/users")).json()
                assert [u["name"] for u in users] == ["Ada", "Bob"]
                messages = (await http.get("/room/lobby/messages")).json()
                assert [m["content"] for m in messages] == ["hello Bob"]
        leave = await ada.next_event("leave")
        assert leave["name"] == "Bob"
        assert list(ada.users) == ["u1"]


async def test_a_reconnecting_client_gets_exactly_what_it_missed(gw: str) -> None:
    async with ChatClient(gw, "resume", "u1", "Ada") as ada, \
            ChatClient(gw, "resume", "u2", "Bob", backoff_base=0.5) as bob:
        await ada.send("one")
        assert (await bob.next_event("message"))["content"] == "one"
        dropped = bob._ws
        assert dropped is not None
        dropped.transport.abort()  # the connection drops without a close frame
        await assert_eventually(lambda: bob._ws is not dropped, timeout=5, message="Bob's client notices the drop")
        for text in ("two", "three", "four"):
            await ada.send(text)
        got = [(await bob.next_event("message", timeout=15))["content"] for _ in range(3)]
        assert got == ["two", "three", "four"]
        assert bob.connects == 2 and bob.last_seq == 4
        await ada.send("five")
        assert (await bob.next_event("message"))["content"] == "five"


async def test_presence_follows_a_client_that_vanishes(gw: str) -> None:
    async with ChatClient(gw, "presence", "u1", "Ada") as ada:
        bob = ChatClient(gw, "presence", "u2", "Bob")
        bob.start()
        await bob.wait_open()
        await ada.next_event("join")
        bob._closed = True  # no reconnect
        assert bob._ws is not None
        bob._ws.transport.abort()
        assert (await ada.next_event("leave"))["userId"] == "u2"
        await bob.close()
        async with httpx.AsyncClient(base_url=http_url(gw)) as http:
            assert [u["name"] for u in (await http.get("/room/presence/users")).json()] == ["Ada"]


async def test_the_room_keeps_the_last_100_messages(gw: str) -> None:
    async with ChatClient(gw, "history", "u1", "Ada") as ada:
        for i in range(105):
            await ada.send(f"m{i}")
        for _ in range(105):
            await ada.next_event("message")
    async with httpx.AsyncClient(base_url=http_url(gw)) as http:
        messages = (await http.get("/room/history/messages")).json()
    assert [m["seq"] for m in messages] == list(range(6, 106))
    async with ChatClient(gw, "history", "u2", "Late") as late:  # history on join
        await late.next_event("welcome")
        first = await late.next_event("message")
        assert first["seq"] == 6


async def test_an_empty_room_sets_its_clean_up_alarm(gw: str, settings: Settings) -> None:
    async with ChatClient(gw, "empty", "u1", "Ada") as ada:
        await ada.send("hi")
        await ada.next_event("message")

    async def alarm_set() -> bool:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await conn.fetchval("SELECT count(*) FROM do_alarms a JOIN do_storage s USING (object_id) "
                                       "WHERE a.namespace = 'ChatRoom'") > 0
        finally:
            await conn.close()

    await assert_eventually(alarm_set, timeout=5)


async def test_bad_joins_and_frames_get_clear_errors(gw: str) -> None:
    with pytest.raises(InvalidStatus) as err:
        async with connect(f"{gw}/room/bad?user=u1"):
            pass
    assert err.value.response.status_code == 400
    async with connect(f"{gw}/room/bad?user=u1&name=Ada") as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        for frame, expect in (("not json", "JSON"), (json.dumps({"type": "nope"}), "unknown frame type"),
                              (json.dumps({"type": "message", "content": ""}), "non-empty"),
                              (json.dumps({"type": "message", "content": "x" * 2001}), "at most 2000")):
            await ws.send(frame)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["type"] == "error" and expect in reply["error"], reply
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 5) == "pong"  # answered by the gateway


async def test_the_chat_page_and_its_script_are_served(gw: str) -> None:
    async with httpx.AsyncClient(base_url=http_url(gw)) as http:
        page = await http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/static/chat.js" in page.text
        script = await http.get("/static/chat.js")
        assert script.status_code == 200 and "class DurableChat" in script.text
        assert (await http.get("/static/../static.py")).status_code == 404


# ----- ?userId= as the original specification's clients send it; lone surrogates ------------


async def test_the_chat_room_accepts_userId_and_user(gw: str) -> None:
    async with connect(f"{gw}/room/spec?userId=u1&name=Ada") as ada:
        welcome = await recv_json(ada)
        assert welcome["type"] == "welcome" and welcome["you"]["userId"] == "u1"
        async with connect(f"{gw}/room/spec?user=u2&name=Bob") as bob:
            assert [u["userId"] for u in (await recv_json(bob))["users"]] == ["u1", "u2"]
            assert (await recv_json(ada))["type"] == "join"
    with pytest.raises(InvalidStatus) as err:
        async with connect(f"{gw}/room/spec?name=Cy"):
            pass
    assert err.value.response.status_code == 400 and b"missing userId or name" in err.value.response.body


#: a JSON text frame is valid UTF-8, yet decodes to a str holding a lone surrogate
BAD_CHAT_FRAME = '{"type": "message", "content": "\\ud800"}'


async def test_a_lone_surrogate_in_a_chat_message_gets_an_error_frame(gw: str) -> None:
    async with connect(f"{gw}/room/surrogate?userId=u1&name=Ada") as ada, \
            connect(f"{gw}/room/surrogate?userId=u2&name=Bob") as bob:
        assert (await recv_json(ada))["type"] == "welcome"
        assert (await recv_json(ada))["type"] == "join"
        assert (await recv_json(bob))["type"] == "welcome"
        await ada.send(BAD_CHAT_FRAME)
        error = await recv_json(ada)
        assert error["type"] == "error" and "lone surrogate" in error["error"] and "\\ud800" in error["error"]
        # the socket is still open, nothing was stored, the sequence did not move
        await ada.send(json.dumps({"type": "message", "content": "hello"}))
        for ws in (ada, bob):
            m = await recv_json(ws)
            assert (m["type"], m["seq"], m["content"]) == ("message", 1, "hello")
        await ada.send(json.dumps({"type": "message", "content": "caf\u00e9 \U0001f600"}))  # real Unicode is fine
        assert (await recv_json(bob))["content"] == "caf\u00e9 \U0001f600"
    async with connect(f"{gw}/room/surrogate?userId=u3&name=Cy") as cy:
        assert [m["content"] for m in (await recv_json(cy))["history"]] == ["hello", "caf\u00e9 \U0001f600"]
