"""RateLimiter: a sliding window that allows at most LIMIT requests in any 60 s, on a clock its
tests move (``now_ms`` in a subclass) instead of sleeping."""

from __future__ import annotations

import time
from typing import Any

import pytest
from durable.client import Env
from durable.core.errors import ObjectReset
from durable.core.http import Request
from durable.core.wire import partition_of
from durable.objects import Worker
from durable.objects.patterns import RateLimiter

from tests.helpers.workers import WorkerFactory


class ClockedLimiter(RateLimiter):
    """RateLimiter on a clock that stands still until the test moves it (class-level: it survives
    eviction). It starts at real time and only goes forward, so the alarms it sets (cleaning up,
    as in production) are never in the real past."""

    clock_ms = 0

    def now_ms(self) -> int:
        return ClockedLimiter.clock_ms


@pytest.fixture
async def limiter_worker(start_worker: WorkerFactory) -> Worker:
    ClockedLimiter.clock_ms = int(time.time() * 1000)
    return await start_worker(classes={"RateLimiter": ClockedLimiter})


@pytest.fixture
def limiter_env(limiter_worker: Worker, env: Env) -> Env:
    return env


def _advance_to(ms_before_a_minute: int) -> None:
    """Move the clock on to ``ms_before_a_minute`` before a wall-clock minute ends."""
    now = ClockedLimiter.clock_ms
    ClockedLimiter.clock_ms += 60_000 - now % 60_000 - ms_before_a_minute + 60_000


async def _evict(worker: Worker, stub: Any) -> None:
    """As an idle timeout does, once its writes are durable: the next call builds a new instance."""
    object_id = stub.id.hex
    state = worker.parts[partition_of(object_id, worker.settings.partitions)]
    inst = state.instances[object_id]
    await inst.storage.sync()
    inst.fail(ObjectReset("evicted by the test"))


async def test_a_burst_across_a_minute_boundary_is_refused(limiter_env: Env, limiter_worker: Worker) -> None:
    """A fixed window let 100 requests just before a minute ends and 100 just after through (200 in
    4.2 s); the sliding window counts the last 60 s, wherever the minute boundary falls."""
    limiter = limiter_env.RATE_LIMITER.get_by_name("203.0.113.50")
    _advance_to(2_100)
    first = [await limiter.check() for _ in range(100)]
    assert all(v["allowed"] for v in first) and first[-1]["remaining"] == 0
    ClockedLimiter.clock_ms += 4_200  # across the boundary
    await _evict(limiter_worker, limiter)  # and the object was evicted meanwhile: the log is in storage
    second = [await limiter.check() for _ in range(100)]
    assert not any(v["allowed"] for v in second)
    # another client is not affected
    assert (await limiter_env.RATE_LIMITER.get_by_name("203.0.113.51").check())["allowed"]


async def test_retry_after_is_honest(limiter_env: Env) -> None:
    limiter = limiter_env.RATE_LIMITER.get_by_name("203.0.113.60")
    check = Request("http://internal/check")
    for i in range(100):
        ClockedLimiter.clock_ms += 300  # at 0.3 s, 0.6 s, ... 30 s
        assert (await limiter.fetch(check)).status == 200, i
    ClockedLimiter.clock_ms += 10_000
    refused = await limiter.fetch(check)
    assert refused.status == 429 and refused.headers.get("x-ratelimit-remaining") == "0"
    retry_after = int(refused.headers.get("retry-after") or 0)
    # now 40 s: the first request (0.3 s) ages out at 60.3 s, in 20.3 s -> 21 s
    assert retry_after == 21, refused.headers
    ClockedLimiter.clock_ms += (retry_after - 1) * 1000
    assert (await limiter.fetch(check)).status == 429  # a second early: still refused
    ClockedLimiter.clock_ms += 1000
    # 61 s: the requests of 0.3, 0.6 and 0.9 s aged out; three more pass, then 1.2 s + 60 s is next
    assert [(await limiter.fetch(check)).status for _ in range(3)] == [200] * 3
    again = await limiter.fetch(check)
    assert again.status == 429 and again.headers.get("retry-after") == "1"


async def test_the_window_slides_one_request_at_a_time(limiter_env: Env) -> None:
    limiter = limiter_env.RATE_LIMITER.get_by_name("203.0.113.70")
    for _ in range(50):
        assert (await limiter.check())["allowed"]
    ClockedLimiter.clock_ms += 30_000
    for _ in range(50):
        assert (await limiter.check())["allowed"]
    assert not (await limiter.check())["allowed"]
    ClockedLimiter.clock_ms += 30_001  # the first 50 aged out, the last 50 not
    verdicts = [await limiter.check() for _ in range(51)]
    assert [v["allowed"] for v in verdicts] == [True] * 50 + [False]
