"""Defects of issue 9 (item 8), each with the test that would have caught it: the ChatRoom takes
the original specification's ``?userId=``; a second ``txn.rollback()`` does nothing; a lone
surrogate gets an error, not a closed socket; the client's first connect to NATS is bounded."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from durable.client import Client, Env
from durable.core.embedded import EmbeddedNats, free_port
from durable.core.errors import Unavailable
from durable.core.settings import Settings
from durable.objects import Worker
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.helpers.gateway import recv_json
from tests.helpers.waiting import assert_eventually

# ----- ChatRoom: ?userId= as the original specification's clients send it --------------------


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


# ----- transactions: rollback() twice --------------------------------------------------------


async def test_a_second_rollback_does_nothing(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("double-rollback")
    await probe.storage("put", "keep", 1)
    results = await probe.txn_ops([["put", ["a", 1], {}], ["rollback", [], {}], ["rollback", [], {}]])
    assert results == [None, None, None]
    assert await probe.storage("list") == {"keep": 1}


# ----- lone surrogates -------------------------------------------------------------------------

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


async def test_a_lone_surrogate_fails_the_frame_not_the_socket(gw: str, env: Env) -> None:
    """Any object: a value or key refused by storage (StorageError), a text frame or close reason
    refused by send()/close(): the handler fails, its socket stays open and the object is fine."""
    async with connect(f"{gw}/sock/surrogate") as ws:
        async def echo() -> None:
            await ws.send(json.dumps({"op": "echo", "v": "still here"}))
            assert await recv_json(ws) == {"echo": "still here"}

        for bad in ({"op": "put_then_send", "key": "k", "v": "\ud800"},
                    {"op": "put_then_send", "key": "\udfff", "v": 1},
                    {"op": "close", "code": 1000, "reason": "\ud800"}):
            await ws.send(json.dumps(bad))
            await echo()
        await ws.send(json.dumps({"op": "send_error", "v": "bad \ud800"}))
        reply = await recv_json(ws)
        assert "WebSocket send() cannot send this text frame" in reply["error"] and "lone surrogate" in reply["error"]
        await ws.send(json.dumps({"op": "put_then_send", "key": "k", "v": "fine"}))
        assert await recv_json(ws) == {"sent": "k"}
    sock = env.SOCKS.get_by_name("surrogate")

    async def closed_cleanly() -> bool:
        return [c["code"] for c in await sock.closes()] == [1000]

    await assert_eventually(closed_cleanly, timeout=5)


# ----- the client's first connect ------------------------------------------------------------


async def test_a_first_connect_to_nats_that_is_down_fails_fast_and_clearly(
        caplog: pytest.LogCaptureFixture) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.DEBUG), pytest.raises(Unavailable) as err:
        # bounded: before the fix it retried for ever (the outer 30 s only guards against a hang)
        await asyncio.wait_for(Client.connect(Settings(nats_url=url, nats_connect_timeout=2)), 30)
    message = err.value.message
    assert url in message and "DURABLE_NATS_URL" in message and "ConnectionRefusedError" in message, message
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


async def test_reconnecting_after_a_first_connect_is_never_given_up(tmp_path: Path) -> None:
    port = free_port()
    async with EmbeddedNats(tmp_path / "nats", port=port, partitions=1) as first:
        client = await Client.connect(Settings(nats_url=first.url, nats_connect_timeout=1))
    try:
        await asyncio.sleep(3)  # down for longer than the first connect may take
        assert not client.nc.is_closed
        async with EmbeddedNats(tmp_path / "nats", port=port, partitions=1):
            async def reconnected() -> bool:
                return bool(client.nc.is_connected)

            await assert_eventually(reconnected, timeout=15)
            sub = await client.nc.subscribe("ping")
            await client.nc.publish("ping", b"pong")
            assert (await sub.next_msg(timeout=5)).data == b"pong"
    finally:
        await client.close()


def test_a_worker_whose_nats_is_down_exits_with_one_line_naming_it(tmp_path) -> None:
    """`durable worker` bounds its first connect like any client, and says so without a traceback."""
    import os
    import subprocess
    import sys

    from durable.core.embedded import free_port

    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "DURABLE_NATS_URL": url, "DURABLE_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
           "DURABLE_ID_SECRET": "a-production-secret-for-this-test", "DURABLE_NATS_CONNECT_TIMEOUT": "1",
           "DURABLE_CONFIG_FILE": str(Path(__file__).resolve().parents[1] / "durable.toml")}
    result = subprocess.run([sys.executable, "-m", "durable.cli", "worker"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and url in lines[0] and "DURABLE_NATS_URL" in lines[0], result.stderr
