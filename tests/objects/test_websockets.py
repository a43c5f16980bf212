"""WebSockets through a real gateway (uvicorn + the router app) to objects on a real worker."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from durable.client import Env
from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.core.wire import GATEWAY_MESSAGE_BUDGET, AutoOp, CloseOp, GatewayOp, SendOp, encode_ops, split_ops
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers.gateway import ask, gateway, recv_json
from tests.helpers.waiting import assert_eventually, assert_stays
from tests.helpers.workers import WorkerFactory


async def test_an_accepted_socket_exchanges_frames_with_its_object(gw: str, env: Env) -> None:
    async with connect(f"{gw}/sock/basic?tags=a,b&user=ada") as ws:
        assert await ask(ws, {"op": "echo", "v": "hi"}) == {"echo": "hi"}
        await ws.send(b"\x00\x01binary")
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01binary"
        me = await ask(ws, {"op": "whoami"})
        assert me["tags"] == ["a", "b"] and me["attachment"] == {"user": "ada"} and me["count"] == 1
    sock = env.SOCKS.get_by_name("basic")

    async def closed() -> bool:
        return len(await sock.closes()) == 1

    await assert_eventually(closed, timeout=5)
    assert (await sock.closes())[0] == {"code": 1000, "reason": "", "clean": True, "tags": ["a", "b"]}
    assert await sock.sockets() == []


async def test_a_refused_upgrade_gets_the_objects_status(gw: str, env: Env) -> None:
    with pytest.raises(InvalidStatus) as err:
        async with connect(f"{gw}/sock/refused?refuse=403"):
            pass
    assert err.value.response.status_code == 403
    assert b"refused by the object: 403" in err.value.response.body
    with pytest.raises(InvalidStatus) as err:
        async with connect(f"{gw}/nowhere"):
            pass
    assert err.value.response.status_code == 404
    # the object still serves others
    async with connect(f"{gw}/sock/refused") as ws:
        assert await ask(ws, {"op": "echo", "v": 1}) == {"echo": 1}


async def test_frames_from_one_client_arrive_in_order(gw: str, env: Env) -> None:
    async with connect(f"{gw}/sock/order") as ws:
        for n in range(1, 1001):
            await ws.send(json.dumps({"op": "seq", "n": n, "ack": n == 1000}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 30)) == {"seq": 1000}
    sock = env.SOCKS.get_by_name("order")
    assert await sock.get("seq") == 1000 and await sock.get("out_of_order") is None


async def test_a_broadcast_reaches_every_socket_with_the_tag(gw: str, env: Env) -> None:
    clients = [await connect(f"{gw}/sock/room?tags={'red' if i % 2 else 'blue'}") for i in range(10)]
    try:
        await ask(clients[0], {"op": "whoami"})
        await clients[0].send(json.dumps({"op": "broadcast", "v": "all"}))
        for c in clients:
            assert json.loads(await asyncio.wait_for(c.recv(), 5)) == {"broadcast": "all"}
        await clients[0].send(json.dumps({"op": "broadcast", "v": "reds", "tag": "red"}))
        for i, c in enumerate(clients):
            if i % 2:
                assert json.loads(await asyncio.wait_for(c.recv(), 5)) == {"broadcast": "reds"}
        assert await env.SOCKS.get_by_name("room").broadcast("from rpc", "blue") == 5
        for i, c in enumerate(clients):
            if not i % 2:
                assert await asyncio.wait_for(c.recv(), 5) == "from rpc"
    finally:
        for c in clients:
            await c.close()


async def test_the_object_closes_a_socket_with_its_code(gw: str, env: Env) -> None:
    async with connect(f"{gw}/sock/closer") as ws:
        await ws.send(json.dumps({"op": "close", "code": 4001, "reason": "bye"}))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 4001 and ws.close_reason == "bye"
    closer = env.SOCKS.get_by_name("closer")

    async def no_close_event() -> bool:  # no event for its own close, even once the client is gone
        return await closer.closes() == []

    await assert_stays(no_close_event, 0.3, message="no websocket_close for the object's own close")
    assert await closer.sockets() == []


async def test_tag_and_attachment_limits(gw: str, env: Env) -> None:
    async with connect(f"{gw}/sock/limits?tags=x,x,y") as ws:
        assert (await ask(ws, {"op": "whoami"}))["tags"] == ["x", "y"]  # duplicates dropped
        big = "a" * 20_000
        assert "cannot be larger than 16384 bytes" in (await ask(ws, {"op": "attach", "v": big}))["error"]
        assert await ask(ws, {"op": "attach", "v": {"ok": 1}}) == {"attached": True}
        assert (await ask(ws, {"op": "whoami"}))["attachment"] == {"ok": 1}
        assert "str or bytes" in (await ask(ws, {"op": "send_error", "kind": "int"}))["error"]
    with pytest.raises(InvalidStatus) as err:
        async with connect(f"{gw}/sock/limits?many_tags=11"):
            pass
    assert err.value.response.status_code == 500
    async with connect(f"{gw}/sock/limits?many_tags=10") as ws:
        assert len((await ask(ws, {"op": "whoami"}))["tags"]) == 10


async def test_auto_response_is_answered_by_the_gateway(gw: str, env: Env) -> None:
    async with connect(f"{gw}/sock/auto") as ws:
        assert await ask(ws, {"op": "auto_ts"}) == {"auto_ts": None}
        assert await ask(ws, {"op": "auto", "req": "ping", "res": "pong"}) == {"auto": True}
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 5) == "pong"
        ts = (await ask(ws, {"op": "auto_ts"}))["auto_ts"]
        assert isinstance(ts, int) and ts > 0
    async with connect(f"{gw}/sock/auto") as ws:  # a new socket gets the object's pair at accept
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 5) == "pong"


async def test_a_handler_error_leaves_the_socket_open(gw: str, env: Env) -> None:
    async with connect(f"{gw}/sock/errors") as ws:
        await ws.send(json.dumps({"op": "fail"}))
        assert await ask(ws, {"op": "echo", "v": "still here"}) == {"echo": "still here"}


async def test_an_oversize_frame_closes_with_1009_and_others_are_served(gw: str, env: Env) -> None:
    async with connect(f"{gw}/sock/big", max_size=None) as ws:
        await ws.send("x" * (1024 * 1024 + 10))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1009
    async with connect(f"{gw}/sock/big") as ws:
        assert await ask(ws, {"op": "echo", "v": 2}) == {"echo": 2}


async def test_sockets_survive_eviction_with_tags_and_attachments(
        start_worker: WorkerFactory, settings: Settings, config: AppConfig, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.3)
    async with gateway(settings, config) as gw:
        async with connect(f"{gw}/sock/hibernate?tags=t1&user=bob") as a, \
                connect(f"{gw}/sock/hibernate?tags=t2&user=eve") as b:
            first = await ask(a, {"op": "whoami"})
            # idle: the instance is evicted, the sockets stay open
            await assert_eventually(lambda: worker.live_objects() == 0, timeout=10, message="eviction")
            me = await ask(b, {"op": "whoami"})
            assert me["instance"] != first["instance"]
            assert me["count"] == 2 and me["tags"] == ["t2"] and me["attachment"] == {"user": "eve"}
            await b.send(json.dumps({"op": "broadcast", "v": "after"}))
            for c in (a, b):
                assert json.loads(await asyncio.wait_for(c.recv(), 5)) == {"broadcast": "after"}


async def test_a_frame_an_object_sends_waits_for_its_writes(gw: str, settings: Settings) -> None:
    """Output gate: when the client has the frame, the write made before it is in Postgres."""
    async with connect(f"{gw}/sock/gate") as ws:
        conn = await asyncpg.connect(settings.database_url)
        try:
            for i in range(20):
                key = f"k{i}"
                assert await ask(ws, {"op": "put_then_send", "key": key, "v": i}) == {"sent": key}
                count = await conn.fetchval("SELECT count(*) FROM do_storage WHERE key = $1", key.encode())
                assert count == 1, f"frame for {key} arrived before its write was durable"
        finally:
            await conn.close()


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


# ----- split_ops: one gateway's operations cut into NATS messages, without a worker -------------


def _send(n_sockets: int, size: int, tag: int = 0) -> SendOp:
    return SendOp([f"{tag:08x}{i:024x}" for i in range(n_sockets)], "x" * size)


def test_split_ops_keeps_the_order_and_fits_every_message_in_the_budget() -> None:
    ops: list[GatewayOp] = []
    for i in range(3000):
        ops.append(_send(1 + i % 40, 37 * (i % 50), tag=i) if i % 7 else CloseOp(f"{i:032x}", 1000, "bye"))
        if i % 11 == 0:
            ops.append(AutoOp([f"{i:032x}"], ("ping", "pong")))
    chunks = split_ops(ops)
    assert len(chunks) > 1
    assert [op for chunk in chunks for op in chunk] == ops  # nothing lost, duplicated or reordered
    for chunk in chunks:
        assert chunk
        assert len(encode_ops(chunk)) <= GATEWAY_MESSAGE_BUDGET


def test_split_ops_keeps_what_fits_in_one_message() -> None:
    ops: list[GatewayOp] = [_send(3, 100, tag=i) for i in range(10)]
    ops.append(CloseOp("s", 1000, ""))
    assert split_ops(ops) == [ops]
    assert split_ops([]) == [[]]


def test_a_single_oversized_operation_gets_a_message_of_its_own() -> None:
    small, big = _send(2, 10), _send(1, GATEWAY_MESSAGE_BUDGET + 1)
    assert split_ops([small, big, small]) == [[small], [big], [small]]
    assert split_ops([big, big]) == [[big], [big]]
