"""StreamChannel through a real gateway: ordered fan-out, resume with gaps, one publisher with
take-over, slow viewers skipped ahead without stalling the others, bad input that changes
nothing, and a worker killed mid-stream losing nothing it acknowledged."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from durable.client import Env
from durable.core.config import AppConfig
from durable.core.settings import Settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers.gateway import gateway, recv_json
from tests.helpers.workers import WorkerFactory, WorkerProcess


async def next_of(ws: ClientConnection, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next frame of type ``kind`` (others skipped)."""
    while True:
        frame = await recv_json(ws, timeout)
        if frame["type"] == kind:
            return frame


async def publish(ws: ClientConnection, data: Any) -> int:
    await ws.send(json.dumps({"type": "publish", "data": data}))
    return (await next_of(ws, "published"))["offset"]


def http_base(gw: str) -> str:
    return "http" + gw[2:]


async def test_messages_reach_every_viewer_in_order_with_the_viewer_count(gw: str) -> None:
    async with connect(f"{gw}/stream/order?role=publisher&id=p") as pub:
        assert (await next_of(pub, "welcome"))["viewers"] == 0
        async with connect(f"{gw}/stream/order?role=viewer&id=a") as a, \
                connect(f"{gw}/stream/order?role=viewer&id=b") as b:
            await next_of(a, "welcome")
            await next_of(b, "welcome")
            assert (await next_of(pub, "viewers"))["count"] == 1
            assert (await next_of(pub, "viewers"))["count"] == 2
            offsets = [await publish(pub, {"n": n}) for n in range(20)]
            assert offsets == list(range(1, 21))
            for viewer in (a, b):
                got = [await next_of(viewer, "message") for _ in range(20)]
                assert [m["offset"] for m in got] == offsets
                assert [m["data"]["n"] for m in got] == list(range(20))
                assert {m["viewers"] for m in got} == {2}
        assert (await next_of(pub, "viewers"))["count"] in (0, 1)


async def test_a_viewer_resumes_from_an_offset_and_is_told_what_is_gone(gw: str) -> None:
    async with connect(f"{gw}/short-stream/resume?role=publisher&id=p") as pub:  # keeps 5 messages
        await next_of(pub, "welcome")
        for n in range(1, 9):
            await publish(pub, n)
        async with connect(f"{gw}/short-stream/resume?role=viewer&id=v&since=5") as recent:
            welcome = await next_of(recent, "welcome")
            assert (welcome["head"], welcome["oldest"]) == (8, 4)
            assert [(await next_of(recent, "message"))["data"] for _ in range(3)] == [6, 7, 8]
        async with connect(f"{gw}/short-stream/resume?role=viewer&id=v&since=1") as old:
            assert await next_of(old, "gap") == {"type": "gap", "first": 2, "last": 3}
            assert [(await next_of(old, "message"))["data"] for _ in range(5)] == [4, 5, 6, 7, 8]
        async with connect(f"{gw}/short-stream/resume?role=viewer&id=v") as live:  # no since: from now on
            await next_of(live, "welcome")
            await publish(pub, 9)
            assert (await next_of(live, "message"))["offset"] == 9
    async with httpx.AsyncClient(base_url=http_base(gw)) as http:
        kept = (await http.get("/short-stream/resume/messages?since=0")).json()
        assert [m["offset"] for m in kept] == [5, 6, 7, 8, 9]


async def test_one_publisher_and_a_take_over(gw: str) -> None:
    async with connect(f"{gw}/stream/studio?role=viewer&id=fan") as fan:
        await next_of(fan, "welcome")
        old = await connect(f"{gw}/stream/studio?role=publisher&id=old")
        assert (await next_of(old, "welcome"))["epoch"] == 1
        assert (await next_of(fan, "publisher"))["id"] == "old"
        await publish(old, "from old")
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{gw}/stream/studio?role=publisher&id=new")
        assert refused.value.response.status_code == 409
        assert (await next_of(fan, "message"))["data"] == "from old"
        async with connect(f"{gw}/stream/studio?role=publisher&id=new&takeover=1") as new:
            assert (await next_of(new, "welcome"))["epoch"] == 2
            assert await next_of(fan, "publisher") == {"type": "publisher", "id": "new", "epoch": 2}
            replaced = await next_of(old, "replaced")
            assert (replaced["by"], replaced["epoch"]) == ("new", 2)
            with pytest.raises(ConnectionClosed) as closed:
                await old.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            assert await publish(new, "from new") == 2
            assert (await next_of(fan, "message"))["data"] == "from new"
        assert (await next_of(fan, "publisher"))["id"] is None  # the publisher left
    async with httpx.AsyncClient(base_url=http_base(gw)) as http:
        stats = (await http.get("/stream/studio")).json()
        assert (stats["head"], stats["epoch"], stats["publisher"]) == (2, 2, None)


async def test_a_slow_viewer_is_skipped_ahead_and_stalls_nobody(gw: str) -> None:
    async with connect(f"{gw}/stream/pace?role=publisher&id=p") as pub, \
            connect(f"{gw}/stream/pace?role=viewer&id=slow&window=5") as slow, \
            connect(f"{gw}/stream/pace?role=viewer&id=fast&window=5") as fast:
        await next_of(slow, "welcome")
        await next_of(fast, "welcome")
        for n in range(1, 21):
            await publish(pub, n)
            got = await next_of(fast, "message")  # the fast viewer acks everything it gets
            assert got["offset"] == n
            await fast.send(json.dumps({"type": "ack", "offset": n}))
        # the slow one never acked: it got its window (1..5), then was told it lags, then nothing
        frames = [await recv_json(slow) for _ in range(6)]
        assert [f["offset"] for f in frames[:5]] == [1, 2, 3, 4, 5]
        assert frames[5]["type"] == "lagging" and frames[5]["acked"] == 0 and frames[5]["head"] == 6
        with pytest.raises(asyncio.TimeoutError):
            await recv_json(slow, timeout=0.5)
        # it catches up on what it has and acks: it is skipped to the head and gets new messages
        await slow.send(json.dumps({"type": "ack", "offset": 5}))
        assert await next_of(slow, "skip") == {"type": "skip", "first": 6, "last": 20, "head": 20}
        await publish(pub, 21)
        assert (await next_of(slow, "message"))["offset"] == 21
        assert (await next_of(fast, "message"))["offset"] == 21


async def test_bad_input_gets_a_clear_error_and_changes_nothing(gw: str) -> None:
    for query, words in (("role=boss&id=x", "role"), ("role=viewer", "id"), ("role=viewer&id=v&since=-1", "since"),
                         ("role=viewer&id=v&window=lots", "window"), (f"role=viewer&id={'x' * 300}", "id")):
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{gw}/stream/strict?{query}")
        assert refused.value.response.status_code == 400, query
        assert words in refused.value.response.body.decode(), query
    async with connect(f"{gw}/stream/strict?role=publisher&id=p") as pub, \
            connect(f"{gw}/stream/strict?role=viewer&id=v") as viewer:
        await next_of(pub, "welcome")
        await next_of(viewer, "welcome")
        for frame in ("not json", json.dumps([1]), json.dumps({"type": "publish"}), json.dumps({"type": "shout"}),
                      json.dumps({"type": "publish", "data": "x" * 70_000}),
                      json.dumps({"type": "publish", "data": "\ud800"}), json.dumps({"type": "ack", "offset": 1}),
                      "[" * 50_000):  # nested too deep for the JSON parser
            await pub.send(frame)
            assert (await next_of(pub, "error"))["error"], frame
        for frame in (json.dumps({"type": "publish", "data": 1}), json.dumps({"type": "ack", "offset": "1"}),
                      json.dumps({"type": "ack", "offset": True})):
            await viewer.send(frame)
            assert (await next_of(viewer, "error"))["error"], frame
        assert await publish(pub, "still fine") == 1  # nothing above took an offset
        assert (await next_of(viewer, "message"))["data"] == "still fine"
    async with httpx.AsyncClient(base_url=http_base(gw)) as http:
        assert (await http.get("/stream/strict")).json()["head"] == 1
        assert (await http.post("/stream/strict", content=b"{}")).status_code == 405
        assert (await http.get("/stream/strict/messages?limit=0")).status_code == 400


@pytest.mark.fault
async def test_a_worker_killed_mid_stream_loses_no_published_message(
        settings: Settings, config: AppConfig, start_worker: WorkerFactory, env: Env, tmp_path: Path) -> None:
    doomed = WorkerProcess(settings, tmp_path / "doomed.log")
    await doomed.start()
    try:
        async with gateway(settings, config) as gw:
            async with connect(f"{gw}/stream/crash?role=publisher&id=p") as pub, \
                    connect(f"{gw}/stream/crash?role=viewer&id=v&window=0") as viewer:
                await next_of(pub, "welcome")
                await next_of(viewer, "welcome")
                acknowledged = [await publish(pub, n) for n in range(1, 31)]
                doomed.kill()
                await start_worker()  # takes the partitions once the dead worker's lease runs out
                # the sockets stayed open at the gateway: the stream goes on where it was
                assert await publish(pub, 31) == 31
                seen = [(await next_of(viewer, "message", timeout=30))["offset"] for _ in range(31)]
                assert seen == acknowledged + [31]
            async with connect(f"{gw}/stream/crash?role=viewer&id=late&since=0&window=0") as late:
                replay = [(await next_of(late, "message"))["data"] for _ in range(31)]
                assert replay == list(range(1, 32))
    finally:
        doomed.close()


async def test_a_viewer_further_behind_than_its_window_is_skipped_not_told_of_a_loss(gw: str) -> None:
    async with connect(f"{gw}/stream/behind?role=publisher&id=p") as pub:
        await next_of(pub, "welcome")
        for n in range(1, 11):
            await publish(pub, n)
        async with connect(f"{gw}/stream/behind?role=viewer&id=v&since=0&window=3") as viewer:
            await next_of(viewer, "welcome")
            frame = await recv_json(viewer)
            assert frame == {"type": "skip", "first": 1, "last": 7, "head": 10}  # kept, not lost
            assert [(await next_of(viewer, "message"))["offset"] for _ in range(3)] == [8, 9, 10]


async def test_the_history_is_paged_to_fit_one_nats_message(gw: str) -> None:
    big = "x" * 60_000
    async with connect(f"{gw}/stream/big?role=publisher&id=p") as pub:
        await next_of(pub, "welcome")
        for _ in range(20):
            await publish(pub, big)
    async with httpx.AsyncClient(base_url=http_base(gw)) as http:
        offsets: list[int] = []
        since = 0
        while True:
            page = await http.get(f"/stream/big/messages?since={since}")
            assert page.status_code == 200, page.text
            got = [m["offset"] for m in page.json()]
            if not got:
                break
            offsets += got
            since = got[-1]
    assert offsets == list(range(1, 21))
