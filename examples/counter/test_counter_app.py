"""The counter app, tested the way an app of yours would be: the `durable_app` fixture of the
pytest plugin the package ships runs this folder's durable.toml on real NATS and Postgres."""

from __future__ import annotations

import asyncio
import json

from durable.testing import DurableApp


async def test_increments_over_http_are_counted(durable_app: DurableApp) -> None:
    for expected in (1, 2, 3):
        response = await durable_app.fetch("/counter/demo/increment", method="POST")
        assert response.status == 200
        assert json.loads(response.body) == {"value": expected}
    assert json.loads((await durable_app.fetch("/counter/demo")).body) == {"value": 3}
    assert json.loads((await durable_app.fetch("/counter/other")).body) == {"value": 0}


async def test_concurrent_increments_lose_nothing_and_survive_eviction(durable_app: DurableApp, env) -> None:
    counter = env.COUNTERS.get_by_name("busy")
    await asyncio.gather(*(counter.increment(2) for _ in range(50)))
    assert await durable_app.evict(counter)
    assert await counter.get() == 100  # a new instance, read from Postgres


async def test_bad_input_is_a_clear_error(durable_app: DurableApp) -> None:
    response = await durable_app.fetch("/counter/demo/increment?by=many", method="POST")
    assert response.status == 400
    assert "by must be an integer" in json.loads(response.body)["error"]
    assert (await durable_app.fetch("/counter/demo/increment")).status == 405
    assert (await durable_app.fetch("/elsewhere")).status == 404
