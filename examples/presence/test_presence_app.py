"""The presence app: a socket member and a heartbeat member of one topic (the package's pytest plugin)."""

from __future__ import annotations

import json

import httpx
from durable.testing import DurableApp
from websockets.asyncio.client import connect


async def test_socket_and_heartbeat_members_of_a_topic(durable_app: DurableApp) -> None:
    async with durable_app.serve() as base:
        ws_base = base.replace("http", "ws", 1)
        async with connect(f"{ws_base}/presence/team?id=ann") as ann:
            assert [m["id"] for m in json.loads(await ann.recv())["members"]] == ["ann"]
            async with httpx.AsyncClient(base_url=base) as http:
                beat = await http.post("/presence/team/heartbeat", json={"id": "bot", "meta": {"kind": "svc"},
                                                                          "ttl_ms": 30_000})
                assert beat.json() == {"presence": "joined"}
                assert json.loads(await ann.recv()) == {"type": "join", "id": "bot", "meta": {"kind": "svc"}}
                assert sorted(m["id"] for m in (await http.get("/presence/team")).json()) == ["ann", "bot"]
                bad = await http.post("/presence/team/heartbeat", json={"id": "bot", "ttl_ms": "soon"})
                assert bad.status_code == 400 and "ttl_ms" in bad.json()["error"]
                assert (await http.post("/presence/team/leave", json={"id": "bot"})).json() == {"left": True}
            assert json.loads(await ann.recv()) == {"type": "leave", "id": "bot"}
