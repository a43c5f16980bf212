"""The independent client of the partition tests, run as a process on the client host:

    python -m tests.helpers.netns_load OUT.json SECONDS OBJECTS [PREFIX]

(settings from the usual DURABLE_* environment). One loop per counter (``PREFIX-<i>``, default
``part``) increments it through the Python client for SECONDS, recording every call: its start
and end (wall clock, so the test can line them up with its cuts), and its value when
acknowledged or its error type when not. Then it reads every counter once more (retrying) and
writes the record to OUT.json. A call that failed is "outcome unknown"; the loop backs off a
little and goes on.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from durable.client import Client, Env
from durable.core.config import load_config
from durable.core.settings import Settings

from tests.helpers.settings import ROOT

CONFIG_FILE = ROOT / "durable.toml"  # the shipped Counter


async def main(out: str, seconds: float, objects: int, prefix: str = "part") -> None:
    settings = Settings()
    config = load_config(CONFIG_FILE)
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


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5]))
