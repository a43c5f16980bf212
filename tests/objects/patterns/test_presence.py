"""Presence: socket members through a real gateway (tabs, vanished clients), heartbeat members
expired by the alarm, updates, and refused input that changes nothing."""

from __future__ import annotations

import json
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


async def test_socket_members_join_and_leave_once_per_member(worker: Worker, env: Env, gw: str) -> None:
    async with connect(f"{gw}/presence/topic?id=ann&meta=%7B%22x%22%3A1%7D") as ann:
        first = await recv_json(ann)
        assert first["type"] == "members" and [m["id"] for m in first["members"]] == ["ann"]
        assert first["members"][0]["meta"] == {"x": 1}
        async with connect(f"{gw}/presence/topic?id=bo") as bo:
            assert [m["id"] for m in (await recv_json(bo))["members"]] == ["ann", "bo"]
            assert await recv_json(ann) == {"type": "join", "id": "bo", "meta": {}}
            async with connect(f"{gw}/presence/topic?id=bo") as bo_tab:  # a second tab: no second join
                await recv_json(bo_tab)
            # the tab closed, bo is still here: no leave; the next event ann sees is bo's real leave
        assert await recv_json(ann) == {"type": "leave", "id": "bo"}
        assert [m["id"] for m in await env.PRESENCE.get_by_name("topic").members()] == ["ann"]


async def test_a_client_that_vanishes_leaves(worker: Worker, env: Env, gw: str) -> None:
    async with connect(f"{gw}/presence/vanish?id=watcher") as watcher:
        await recv_json(watcher)
        ghost = await connect(f"{gw}/presence/vanish?id=ghost")
        await recv_json(ghost)
        assert (await recv_json(watcher))["type"] == "join"
        ghost.transport.abort()  # no close frame: the connection is just gone
        assert await recv_json(watcher, timeout=15) == {"type": "leave", "id": "ghost"}


async def test_heartbeat_members_expire_by_the_alarm(worker: Worker, env: Env, gw: str) -> None:
    room = env.PRESENCE.get_by_name("beats")
    async with connect(f"{gw}/presence/beats?watch=1") as watch:
        assert (await recv_json(watch))["members"] == []
        assert await room.heartbeat("svc", {"v": 1}, 1_000) == "joined"
        assert await recv_json(watch) == {"type": "join", "id": "svc", "meta": {"v": 1}}
        assert await room.heartbeat("svc", {"v": 1}, 1_000) == "renewed"
        assert await room.heartbeat("svc", {"v": 2}, 1_000) == "updated"
        assert await recv_json(watch) == {"type": "update", "id": "svc", "meta": {"v": 2}}
        # it stops beating: the alarm removes it, nobody polls
        assert await recv_json(watch, timeout=10) == {"type": "leave", "id": "svc", "reason": "expired"}
    assert await room.members() == []


async def test_a_member_updates_its_metadata_and_bad_frames_are_refused(worker: Worker, env: Env, gw: str) -> None:
    async with connect(f"{gw}/presence/upd?id=a") as a, connect(f"{gw}/presence/upd?id=b") as b:
        await recv_json(a)
        await recv_json(b)
        await recv_json(a)  # b joined
        await a.send(json.dumps({"type": "update", "meta": {"status": "away"}}))
        assert await recv_json(b) == {"type": "update", "id": "a", "meta": {"status": "away"}}
        assert await recv_json(a) == {"type": "update", "id": "a", "meta": {"status": "away"}}
        members = {m["id"]: m for m in await env.PRESENCE.get_by_name("upd").members()}
        assert members["a"]["meta"] == {"status": "away"}


async def test_bad_input_is_refused_and_changes_nothing(worker: Worker, env: Env, gw: str) -> None:
    room = env.PRESENCE.get_by_name("strict")
    for args in (("", {}, 5000), ("a", "meta", 5000), ("a", {}, 10), ("a", {"big": "x" * 5000}, 5000)):
        with pytest.raises(RemoteError):
            await room.heartbeat(*args)
    assert await room.members() == []
    async with connect(f"{gw}/presence/strict?id=a") as a:
        await recv_json(a)
        for bad in ("not json", json.dumps({"type": "update", "meta": "away"}), json.dumps({"type": "shout"})):
            await a.send(bad)
            assert (await recv_json(a))["type"] == "error"
        assert [m["id"] for m in await room.members()] == ["a"]

    async def nobody() -> bool:  # the socket closed: a left
        return await room.members() == []

    await assert_eventually(nobody, timeout=5)


@pytest.mark.fault
async def test_presence_survives_the_owner_killed(
        settings: Settings, config: AppConfig, start_worker: WorkerFactory, env: Env, tmp_path: Path) -> None:
    doomed = WorkerProcess(settings, tmp_path / "doomed.log")
    await doomed.start()
    try:
        room = env.PRESENCE.get_by_name("crash")
        async with gateway(settings, config) as gw, connect(f"{gw}/presence/crash?id=ann") as ann:
            await recv_json(ann)
            bo = await connect(f"{gw}/presence/crash?id=bo")
            await recv_json(bo)
            assert (await recv_json(ann))["id"] == "bo"
            assert await room.heartbeat("svc", {}, 3_000) == "joined"
            assert (await recv_json(ann))["id"] == "svc"
            doomed.kill()
            await start_worker()  # takes the partitions once the dead worker's lease runs out
            # the sockets stayed open at the gateway; the heartbeat member is still stored
            assert sorted(m["id"] for m in await room.members()) == ["ann", "bo", "svc"]
            await bo.close()
            assert await recv_json(ann, timeout=15) == {"type": "leave", "id": "bo"}
            # nobody beats for svc any more: the alarm, now on the new worker, removes it
            assert await recv_json(ann, timeout=30) == {"type": "leave", "id": "svc", "reason": "expired"}
            assert [m["id"] for m in await room.members()] == ["ann"]
    finally:
        doomed.close()
