"""The router over real HTTP: uvicorn serving the ASGI app, user routes calling objects. The API's
rate limit is a sliding window (100 requests in any 60 s), so a count may start at any time."""

from collections.abc import AsyncIterator

import httpx
import pytest
from durable.client import Client
from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.objects import Worker
from durable.router.app import create_app
from durable.testing.app import serve_asgi


@pytest.fixture
async def http(worker: Worker, settings: Settings, config: AppConfig,
               client: Client) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_asgi(create_app(settings, config, client=client)) as port, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http_client:
        yield http_client


async def test_a_counter_increments_over_http(http: httpx.AsyncClient) -> None:
    r = await http.post("/counter/web/increment")
    assert r.status_code == 200 and r.json() == {"value": 1}
    assert r.headers["content-type"] == "application/json"
    assert (await http.post("/counter/web/increment?by=5")).json() == {"value": 6}
    assert (await http.get("/counter/web")).json() == {"value": 6}
    assert (await http.get("/counter/other")).json() == {"value": 0}


async def test_counter_http_errors_are_clear(http: httpx.AsyncClient) -> None:
    r = await http.post("/counter/web/increment?by=lots")
    assert r.status_code == 400 and "by must be an integer" in r.json()["error"]
    assert (await http.get("/counter/web/increment")).status_code == 405
    assert (await http.post("/counter/web")).status_code == 405
    assert (await http.get("/counter/web/nope")).status_code == 404


async def test_unrouted_paths_answer_404(http: httpx.AsyncClient) -> None:
    r = await http.get("/nothing/here")
    assert r.status_code == 404 and r.text == "Not found"


async def test_api_is_rate_limited_to_100_requests_a_minute_per_client(http: httpx.AsyncClient) -> None:
    statuses = [(await http.get(f"/api/item/{i}")).status_code for i in range(100)]
    assert statuses == [200] * 100
    over = await http.get("/api/item/100")
    assert over.status_code == 429 and over.text == "Rate limited"
    assert int(over.headers["retry-after"]) >= 1
    # a client cannot pick another identity by sending the header itself
    spoofed = await http.get("/api/x", headers={"CF-Connecting-IP": "203.0.113.9"})
    assert spoofed.status_code == 429


async def test_the_rate_limiter_counts_per_client_ip(worker: Worker, client: Client, config: AppConfig) -> None:
    from durable.client import Env
    from durable.core.http import Request

    env = Env(client, config)
    limiter = env.RATE_LIMITER.get_by_name("198.51.100.7")
    verdicts = [await limiter.check() for _ in range(101)]
    assert [v["allowed"] for v in verdicts] == [True] * 100 + [False]
    assert verdicts[99]["remaining"] == 0
    other = env.RATE_LIMITER.get_by_name("198.51.100.8")
    assert (await other.fetch(Request("http://internal/check"))).status == 200
    assert (await limiter.fetch(Request("http://internal/check"))).status == 429


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_timeout_is_504_and_retryable_only_with_an_idempotency_key(
        worker: Worker, settings: Settings, config: AppConfig, keyed: bool) -> None:
    """The outcome of a request that timed out is unknown (it may have run): 504, and the error
    says it is not safe to repeat, unlike a refusal that provably did not run (503); with an
    Idempotency-Key it is (the object runs the key's call once), after the client's own retries."""
    from durable.client import Env
    from durable.core.http import Request, Response

    async def slow_route(request: Request, env: Env) -> Response:
        stub = env.PROBES.get_by_name(f"slow-{keyed}")
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            stub = stub.with_idempotency_key(key)
        value = await stub.slow_increment("k", 3000)
        return Response.json_response({"value": value})

    quick = settings.model_copy(update={"request_timeout": 0.5, "retry_deadline": 1.0})
    async with await Client.connect(quick, config) as client, \
            serve_asgi(create_app(quick, config, client=client, user_fetch=slow_route)) as port, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http_client:
        answer = await http_client.post("/anything", headers={"Idempotency-Key": "k1"} if keyed else {})
    assert answer.status_code == 504
    error = answer.json()["error"]
    assert (error["code"], error["retryable"]) == ("timeout", keyed)
