"""The lock app over HTTP, as an app of yours would test it (the package's pytest plugin)."""

from __future__ import annotations

import json
from typing import Any

from durable.testing import DurableApp


async def _post(app: DurableApp, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await app.fetch(path, method="POST", body=json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
    return response.status, json.loads(response.body)


async def test_acquire_write_release_over_http(durable_app: DurableApp) -> None:
    status, grant = await _post(durable_app, "/lock/job/acquire", {"owner": "a", "ttl_ms": 30_000})
    assert status == 200 and grant["acquired"] and grant["token"] == 1
    status, busy = await _post(durable_app, "/lock/job/acquire", {"owner": "b", "ttl_ms": 30_000})
    assert status == 200 and not busy["acquired"]
    status, written = await _post(durable_app, "/lock/job/write", {"owner": "a", "token": 1, "key": "k", "value": 5})
    assert status == 200 and written["written"]
    status, refused = await _post(durable_app, "/lock/job/write", {"owner": "b", "token": 1, "key": "k", "value": 6})
    assert status == 409 and not refused["written"]
    status, released = await _post(durable_app, "/lock/job/release", {"owner": "a", "token": 1})
    assert status == 200 and released == {"released": True}
    status, grant = await _post(durable_app, "/lock/job/acquire", {"owner": "b", "ttl_ms": 30_000})
    assert grant["acquired"] and grant["token"] == 2
    shown = json.loads((await durable_app.fetch("/lock/job")).body)
    assert shown["holder"]["owner"] == "b" and shown["last_token"] == 2


async def test_bad_input_is_a_clear_error_and_changes_nothing(durable_app: DurableApp) -> None:
    for body in ({"owner": "", "ttl_ms": 1000}, {"owner": "a", "ttl_ms": "soon"}, {"owner": "a", "ttl_ms": 5},
                 {"owner": "a", "ttl_ms": 1000, "extra": 1}, [1, 2]):
        status, answer = await _post(durable_app, "/lock/bad/acquire", body)  # type: ignore[arg-type]
        assert status == 400 and answer["error"], body
    response = await durable_app.fetch("/lock/bad/acquire", method="POST", body=b"{not json")
    assert response.status == 400
    assert json.loads((await durable_app.fetch("/lock/bad")).body)["last_token"] == 0
    assert (await durable_app.fetch("/lock/bad/acquire")).status == 405
    assert (await durable_app.fetch("/lock/bad/steal", method="POST", body=b"{}")).status == 404
