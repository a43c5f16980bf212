"""The rate-limit app: 100 requests in a minute per client address, then 429; another client is
not affected."""

from __future__ import annotations

from durable import Request
from durable.testing import DurableApp


def _from(address: str, path: str = "/api/items") -> Request:
    return Request(f"http://127.0.0.1{path}", headers={"cf-connecting-ip": address})


async def test_the_hundred_and_first_request_is_refused(durable_app: DurableApp) -> None:
    for _ in range(100):
        response = await durable_app.fetch(_from("10.0.0.1"))
        assert response.status == 200
    refused = await durable_app.fetch(_from("10.0.0.1"))
    assert refused.status == 429
    assert 0 < int(refused.headers.get("retry-after") or "0") <= 60
    assert (await durable_app.fetch(_from("10.0.0.2"))).status == 200, "another client has its own budget"


async def test_only_api_paths_are_served(durable_app: DurableApp) -> None:
    assert (await durable_app.fetch("/elsewhere")).status == 404
