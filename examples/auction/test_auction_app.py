"""The auction app over HTTP (the package's pytest plugin)."""

from __future__ import annotations

import json
from typing import Any

from durable.testing import DurableApp


async def _post(app: DurableApp, path: str, body: Any) -> tuple[int, Any]:
    response = await app.fetch(path, method="POST", body=json.dumps(body).encode())
    return response.status, json.loads(response.body)


async def test_open_bid_and_read_over_http(durable_app: DurableApp) -> None:
    status, state = await _post(durable_app, "/auction/lamp/open",
                                {"item": "lamp", "start_price": 100, "increment": 10, "duration_ms": 60_000})
    assert status == 200 and state["item"] == "lamp"
    status, low = await _post(durable_app, "/auction/lamp/bid", {"bidder": "ann", "amount": 50, "bid_id": "b1"})
    assert status == 409 and "at least 100" in low["error"]
    status, ok = await _post(durable_app, "/auction/lamp/bid", {"bidder": "ann", "amount": 100, "bid_id": "b2"})
    assert status == 200 and ok["accepted"]
    status, low = await _post(durable_app, "/auction/lamp/bid", {"bidder": "bo", "amount": 105, "bid_id": "b3"})
    assert status == 409 and "at least 110" in low["error"]
    shown = json.loads((await durable_app.fetch("/auction/lamp")).body)
    assert shown["price"] == 100 and shown["leader"] == "ann" and shown["bids"] == 1


async def test_bad_input_is_a_clear_error(durable_app: DurableApp) -> None:
    for body in ({"item": "x", "start_price": -1, "increment": 1, "duration_ms": 1000}, [1],
                 {"item": "x", "start_price": 1, "increment": 1, "duration_ms": 1000, "extra": True}):
        status, answer = await _post(durable_app, "/auction/bad/open", body)
        assert status == 400 and answer["error"]
    assert (await durable_app.fetch("/auction/bad")).status == 404  # nothing was opened
    status, _ = await _post(durable_app, "/auction/bad/bid", {"bidder": "a", "amount": 5, "bid_id": "x"})
    assert status == 409
    assert (await durable_app.fetch("/auction/bad/steal", method="POST", body=b"{}")).status == 404
