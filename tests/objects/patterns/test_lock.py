"""Lock: fencing tokens, a fair queue, expiry by alarm; a holder that is killed loses the lock at
its TTL, and a holder that was paused past it cannot write when it wakes up (real processes,
real NATS and Postgres)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from durable.client import Env
from durable.client.lock import acquire_lock
from durable.core.errors import RemoteError
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.settings import worker_env
from tests.helpers.waiting import assert_eventually


async def test_tokens_grow_and_the_lock_goes_to_one_holder_at_a_time(worker: Worker, env: Env) -> None:
    lock = env.LOCKS.get_by_name("contended")
    a = await lock.acquire("a", 30_000)
    b = await lock.acquire("b", 30_000)
    assert a["acquired"] and a["token"] == 1 and not b["acquired"]
    assert (await lock.acquire("a", 30_000))["token"] == 1  # asking again while holding: the same grant
    assert await lock.release("b", 1) is False  # not b's to release
    assert await lock.release("a", 2) is False  # nor a wrong token's
    assert await lock.release("a", 1) is True
    b = await lock.acquire("b", 30_000)
    assert b["acquired"] and b["token"] == 2
    assert await lock.release("b", 2)
    again = await lock.acquire("a", 30_000)
    assert again["token"] == 3  # strictly increasing over the lock's whole life


async def test_concurrent_contenders_get_distinct_growing_tokens(worker: Worker, env: Env) -> None:
    lock = env.LOCKS.get_by_name("race")
    grants: list[int] = []

    async def contender(name: str) -> None:
        grant = await acquire_lock(lock, name, 30_000, timeout=20)
        assert grant is not None, f"{name} never got the lock"
        assert (await lock.status())["holder"]["owner"] == name  # nobody else holds it meanwhile
        grants.append(grant["token"])
        assert await lock.release(name, grant["token"])

    await asyncio.gather(*(contender(f"c{i}") for i in range(6)))
    assert grants == sorted(grants) and len(set(grants)) == 6


async def test_waiters_are_served_in_the_order_they_asked(worker: Worker, env: Env) -> None:
    lock = env.LOCKS.get_by_name("fair")
    holder = await lock.acquire("h", 30_000)
    first = await lock.acquire("w1", 30_000, 10_000)
    second = await lock.acquire("w2", 30_000, 10_000)
    assert (first["position"], second["position"]) == (1, 2)
    assert await lock.release("h", holder["token"])
    assert not (await lock.acquire("w2", 30_000, 10_000))["acquired"]  # w1 is ahead
    assert not (await lock.acquire("late", 30_000))["acquired"]  # and nobody jumps the queue
    assert (await lock.acquire("w1", 30_000, 10_000))["acquired"]
    assert (await lock.status())["waiters"] == ["w2"]


async def test_a_waiter_that_stops_asking_leaves_the_queue(worker: Worker, env: Env) -> None:
    lock = env.LOCKS.get_by_name("gone-waiter")
    holder = await lock.acquire("h", 30_000)
    await lock.acquire("vanished", 30_000, 60_000)
    await lock.release("h", holder["token"])
    # the vanished waiter holds the head for at most WAITER_STALE_MS; then the next caller gets it
    grant = await acquire_lock(lock, "patient", 30_000, timeout=10)
    assert grant is not None and grant["token"] == 2


async def test_an_expired_hold_is_freed_by_the_alarm(worker: Worker, env: Env, database_url: str) -> None:
    lock = env.LOCKS.get_by_name("expiring")
    grant = await lock.acquire("short", 300)
    conn = await asyncpg.connect(database_url)
    try:
        async def holder_row_gone() -> bool:  # nobody calls the lock: only its alarm can do this
            n = await conn.fetchval("SELECT count(*) FROM do_storage WHERE object_id = $1 AND key = $2",
                                    lock.id.hex, b"holder")
            return n == 0

        await assert_eventually(holder_row_gone, timeout=10, message="the alarm freeing the lock")
    finally:
        await conn.close()
    assert (await lock.renew("short", grant["token"], 1000)) == {"renewed": False}
    assert (await lock.acquire("next", 1000))["token"] == grant["token"] + 1


async def test_renew_keeps_a_live_hold(worker: Worker, env: Env) -> None:
    lock = env.LOCKS.get_by_name("renewed")
    grant = await lock.acquire("r", 600)
    for _ in range(3):
        await asyncio.sleep(0.3)  # longer in total than the TTL: only renewals keep it
        assert (await lock.renew("r", grant["token"], 600))["renewed"]
    assert (await lock.status())["holder"]["token"] == grant["token"]


@pytest.mark.parametrize("args", [("", 1000), ("a", 10), ("a", "1000"), (5, 1000), ("a", 1000, -1), ("x" * 300, 1000)])
async def test_bad_arguments_are_refused_and_change_nothing(worker: Worker, env: Env, args: tuple[Any, ...]) -> None:
    lock = env.LOCKS.get_by_name("bad-args")
    with pytest.raises(RemoteError):
        await lock.acquire(*args)
    with pytest.raises(RemoteError):
        await lock.guarded_write("a", 0, "k", 1)
    assert await lock.status() == {"holder": None, "waiters": [], "last_token": 0}


async def test_another_object_refuses_a_stale_token_with_check_fence(worker: Worker, env: Env) -> None:
    lock, resource = env.LOCKS.get_by_name("fence"), env.FENCED.get_by_name("fenced-resource")
    old = await lock.acquire("old", 300)
    await resource.write(old["token"], "k", "old")
    new = await acquire_lock(lock, "new", 30_000, timeout=10)  # the old hold expires meanwhile
    assert new is not None
    await resource.write(new["token"], "k", "new")
    with pytest.raises(RemoteError, match="older than"):
        await resource.write(old["token"], "k", "late")  # the former holder, waking up
    assert await resource.get("k") == "new"


# ----- real holder processes: killed, and paused past the TTL ------------------------------------

_HOLDER = textwrap.dedent("""
    import asyncio, json, sys
    import durable

    async def main() -> None:
        env = await durable.connect()
        lock = env.LOCKS.get_by_name(sys.argv[1])
        grant = await lock.acquire("holder-process", int(sys.argv[2]))
        print(json.dumps(grant), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # until told
        print(json.dumps(await lock.guarded_write("holder-process", grant["token"], "k", "from the old holder")),
              flush=True)
        await env.close()

    asyncio.run(main())
""")


@pytest.fixture
async def holder_process(settings: Settings) -> AsyncIterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(lock_name: str, ttl_ms: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, lock_name, str(ttl_ms)], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=worker_env(settings))
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the holder process died before it took the lock"
        return proc, json.loads(line)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


@pytest.mark.fault
async def test_a_killed_holder_loses_the_lock_at_its_ttl(worker: Worker, env: Env, holder_process: Any) -> None:
    proc, grant = await asyncio.to_thread(holder_process, "killed-holder", 1500)
    assert grant["acquired"]
    proc.kill()  # SIGKILL: it never releases
    lock = env.LOCKS.get_by_name("killed-holder")
    taken = await acquire_lock(lock, "survivor", 30_000, timeout=15)
    assert taken is not None and taken["token"] == grant["token"] + 1


@pytest.mark.fault
async def test_a_paused_holder_cannot_write_after_its_ttl(worker: Worker, env: Env, holder_process: Any) -> None:
    proc, old = await asyncio.to_thread(holder_process, "paused-holder", 1000)
    proc.send_signal(signal.SIGSTOP)  # a GC pause, a frozen VM: it still believes it holds the lock
    lock = env.LOCKS.get_by_name("paused-holder")
    new = await acquire_lock(lock, "successor", 30_000, timeout=15)
    assert new is not None and new["token"] > old["token"]
    assert (await lock.guarded_write("successor", new["token"], "k", "from the new holder"))["written"]
    proc.send_signal(signal.SIGCONT)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    late = json.loads(await asyncio.to_thread(proc.stdout.readline))
    assert late["written"] is False and "does not hold the lock" in late["reason"]
    assert await lock.read("k") == "from the new holder"
    assert await asyncio.to_thread(proc.wait, 20) == 0
