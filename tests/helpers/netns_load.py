"""The independent client of the partition tests, run as a process on the client host:

    python -m tests.helpers.netns_load OUT.json SECONDS OBJECTS [PREFIX]

(settings from the usual DURABLE_* environment). One loop per counter (``PREFIX-<i>``, default
``part``) increments it through the Python client for SECONDS, recording every call: its start
and end (wall clock, so the test can line them up with its cuts), and its value when
acknowledged or its error type when not. Then it reads every counter once more (retrying) and
writes the record to OUT.json. A call that failed is "outcome unknown"; the loop backs off a
little and goes on. With DURABLE_LOAD_HTTP set (a router's base URL), the same over HTTP:
``POST /counter/<name>/increment`` (the counter example's routes), an error being any status
but 200.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import httpx
from durable.client import Client, Env
from durable.core.config import load_config
from durable.core.settings import Settings
from nats.aio.client import Client as NatsClient

from tests.helpers.settings import ROOT

CONFIG_FILE = ROOT / "durable.toml"  # the shipped Counter


async def main(out: str, seconds: float, objects: int, prefix: str = "part") -> None:
    settings = Settings()
    config = load_config(CONFIG_FILE)
    base = os.environ.get("DURABLE_LOAD_HTTP")
    if base:
        await over_http(base, out, seconds, [f"{prefix}-{i}" for i in range(objects)],
                        Env(Client(NatsClient(), settings, config), config))
        return
    client = await Client.connect(settings, config, name="durable-partition-load",
                                  ping_interval=2, max_outstanding_pings=2, reconnect_time_wait=0.5)
    env = Env(client, config)
    stubs = [env.COUNTERS.get_by_name(f"{prefix}-{i}") for i in range(objects)]
    record: dict[str, dict[str, Any]] = {s.id.hex: {"acks": [], "errors": [], "attempted": 0} for s in stubs}
    end = time.time() + seconds

    async def loop(i: int) -> None:
        stub = stubs[i]
        rec = record[stub.id.hex]
        while time.time() < end:
            rec["attempted"] += 1
            t0 = time.time()
            try:
                value = await stub.increment()
            except Exception as exc:  # noqa: BLE001 - outcome unknown: recorded, and the load goes on
                rec["errors"].append([type(exc).__name__, t0, time.time(), str(exc)[:200]])
                await asyncio.sleep(0.05)
                continue
            rec["acks"].append([time.time(), int(value)])
            await asyncio.sleep(0.02)  # a steady pace: ~40 calls/s per object at most

    await asyncio.gather(*(loop(i) for i in range(objects)))
    finals: dict[str, int | None] = {}
    for stub in stubs:
        for _ in range(20):
            try:
                finals[stub.id.hex] = int(await stub.get())
                break
            except Exception:  # noqa: BLE001 - settling after the faults: try again
                await asyncio.sleep(0.5)
        else:
            finals[stub.id.hex] = None
    with open(out, "w") as f:
        json.dump({"objects": record, "final": finals}, f)
    await client.close()


async def over_http(base: str, out: str, seconds: float, names: list[str], env: Env) -> None:
    """The load through a router (``env`` only computes the objects' ids)."""
    ids = {n: env.COUNTERS.id_from_name(n).hex for n in names}
    record: dict[str, dict[str, Any]] = {oid: {"acks": [], "errors": [], "attempted": 0} for oid in ids.values()}
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(15.0, connect=2.0)) as http:
        for _ in range(300):  # the router starts meanwhile
            try:
                if (await http.get(f"/counter/{names[0]}")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        end = time.time() + seconds

        async def loop(name: str) -> None:
            rec = record[ids[name]]
            while time.time() < end:
                rec["attempted"] += 1
                t0 = time.time()
                try:
                    resp = await http.post(f"/counter/{name}/increment")
                    if resp.status_code != 200:
                        raise RuntimeError(f"HTTP{resp.status_code}")
                    value = int(resp.json()["value"])
                except Exception as exc:  # noqa: BLE001 - outcome unknown: recorded, and the load goes on
                    kind = str(exc) if str(exc).startswith("HTTP") else type(exc).__name__
                    rec["errors"].append([kind, t0, time.time(), str(exc)[:200]])
                    await asyncio.sleep(0.05)
                    continue
                rec["acks"].append([time.time(), value])
                await asyncio.sleep(0.02)

        await asyncio.gather(*(loop(n) for n in names))
        finals: dict[str, int | None] = {}
        for name in names:
            finals[ids[name]] = None
            for _ in range(20):
                try:
                    resp = await http.get(f"/counter/{name}")
                    if resp.status_code == 200:
                        finals[ids[name]] = int(resp.json()["value"])
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
    with open(out, "w") as f:
        json.dump({"objects": record, "final": finals}, f)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5]))
