"""Auction: validated, idempotent bids; anti-sniping; a close by alarm exactly once that no bid
slips past; watchers over WebSockets through a real gateway."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from durable.client import Env
from durable.core.config import AppConfig
from durable.core.errors import RemoteError
from durable.core.settings import Settings
from durable.objects import Worker
from websockets.asyncio.client import connect

from tests.helpers.gateway import gateway, recv_json
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory, WorkerProcess


async def test_bids_are_validated_and_a_retried_bid_counts_once(worker: Worker, env: Env) -> None:
    auction = env.AUCTIONS.get_by_name("vase")
    await auction.open("vase", 100, 10, 60_000)
    with pytest.raises(RemoteError, match="at least 100"):
        await auction.bid("ann", 99, "a1")
    first = await auction.bid("ann", 100, "a2")
    assert first["accepted"] and first["price"] == 100
    assert await auction.bid("ann", 100, "a2") == first  # the retry answers the first outcome
    with pytest.raises(RemoteError, match="at least 110"):
        await auction.bid("bo", 109, "b1")
    await auction.bid("bo", 110, "b2")
    state = await auction.status()
    assert (state["price"], state["leader"], state["bids"]) == (110, "bo", 2)
    assert (await auction.open("vase", 1, 1, 1000))["price"] == 110  # opening again changes nothing
    with pytest.raises(RemoteError, match="already sells"):
        await auction.open("car", 1, 1, 1000)


@pytest.mark.parametrize("args", [("a", 0, "x"), ("a", "10", "x"), ("", 10, "x"), ("a", 10, ""), ("a", 10**13, "x")])
async def test_bad_bids_are_refused_and_change_nothing(worker: Worker, env: Env, args: tuple[object, ...]) -> None:
    auction = env.AUCTIONS.get_by_name("strict")
    await auction.open("strict", 10, 1, 60_000)
    with pytest.raises(RemoteError):
        await auction.bid(*args)
    assert (await auction.status())["bids"] == 0


async def test_a_late_bid_extends_the_end(worker: Worker, env: Env) -> None:
    auction = env.AUCTIONS.get_by_name("snipe")
    opened = await auction.open("snipe", 10, 1, 1_500, snipe_window_ms=1_200, extend_ms=2_000)
    await asyncio.sleep(0.5)  # into the last 1.2 s
    bid = await auction.bid("sniper", 10, "s1")
    assert bid["ends_at_ms"] > opened["ends_at_ms"] and bid["ends_at_ms"] >= bid["at_ms"] + 2_000


async def test_the_alarm_closes_once_and_no_bid_slips_past_the_close(worker: Worker, env: Env) -> None:
    auction = env.AUCTIONS.get_by_name("race")
    opened = await auction.open("race", 1, 1, 1_000, snipe_window_ms=0)
    accepted: list[dict[str, object]] = []
    refused = 0

    async def bidder(name: str) -> None:
        nonlocal refused
        n = 0
        while time.time() * 1000 < opened["ends_at_ms"] + 500:  # bid on, through the end
            n += 1
            price = int((await auction.status())["price"] or 0) + 1
            try:
                accepted.append(await auction.bid(name, price, f"{name}-{n}"))
            except RemoteError as exc:
                assert "ended" in str(exc) or "at least" in str(exc), exc
                refused += 1

    await asyncio.gather(*(bidder(f"p{i}") for i in range(4)))

    async def closed() -> bool:
        return bool((await auction.status())["closed"])

    await assert_eventually(closed, timeout=10, message="the closing alarm")
    state = await auction.status()
    top = max(accepted, key=lambda b: int(b["price"]))  # type: ignore[arg-type]
    assert state["winner"] == {"bidder": state["leader"], "price": top["price"]}
    assert all(int(b["at_ms"]) < opened["ends_at_ms"] for b in accepted)  # type: ignore[arg-type]
    assert refused > 0
    with pytest.raises(RemoteError, match="ended"):
        await auction.bid("late", 10**6, "late-1")


async def test_watchers_see_bids_and_one_close(worker: Worker, env: Env, gw: str) -> None:
    auction = env.AUCTIONS.get_by_name("watched")
    await auction.open("watched", 5, 1, 1_500, snipe_window_ms=0)
    async with connect(f"{gw}/auction/watched") as ws:
        first = await recv_json(ws)
        assert first["type"] == "state" and first["auction"]["item"] == "watched"
        await auction.bid("ann", 5, "w1")
        assert await recv_json(ws) == {"type": "bid", "bidder": "ann", "price": 5,
                                       "ends_at_ms": first["auction"]["ends_at_ms"]}
        closing = await recv_json(ws, timeout=10)
        assert closing == {"type": "closed", "winner": {"bidder": "ann", "price": 5}}
        with pytest.raises(TimeoutError):  # the one deliberate wait: no second close
            await asyncio.wait_for(ws.recv(), 1.5)
        await ws.send("hello")
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "error"


@pytest.mark.fault
async def test_a_worker_killed_mid_auction_keeps_every_accepted_bid_and_closes_once(
        settings: Settings, config: AppConfig, start_worker: WorkerFactory, env: Env, tmp_path: Path) -> None:
    doomed = WorkerProcess(settings, tmp_path / "doomed.log")
    await doomed.start()
    try:
        auction = env.AUCTIONS.get_by_name("crash")
        opened = await auction.open("crash", 10, 5, 6_000, snipe_window_ms=0)
        async with gateway(settings, config) as gw, connect(f"{gw}/auction/crash") as watcher:
            assert (await recv_json(watcher))["type"] == "state"
            accepted = [await auction.bid(f"b{n}", 10 + 5 * n, f"bid-{n}") for n in range(5)]
            doomed.kill()
            await start_worker()  # takes the partitions once the dead worker's lease runs out
            assert await auction.bid("b4", 30, "bid-4") == accepted[-1]  # a retried bid: the same outcome
            state = await auction.status()
            assert (state["price"], state["leader"], state["bids"]) == (30, "b4", 5)
            frames = []
            while not frames or frames[-1]["type"] != "closed":
                frames.append(await recv_json(watcher, timeout=30))
            assert frames[-1] == {"type": "closed", "winner": {"bidder": "b4", "price": 30}}
            assert [f["price"] for f in frames if f["type"] == "bid"] == [10, 15, 20, 25, 30]
            with pytest.raises(TimeoutError):  # closed once, by the new worker's alarm
                await asyncio.wait_for(watcher.recv(), 1.5)
        assert (await auction.status())["closed"] and time.time() * 1000 >= opened["ends_at_ms"]
    finally:
        doomed.close()
