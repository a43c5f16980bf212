"""Gates, resets and eviction, as DESIGN.md states them."""

import asyncio

import pytest
from durable.client import Env
from durable.core.errors import DurableError, RemoteError
from durable.objects import Worker

from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory


async def test_a_read_modify_write_is_atomic_across_a_storage_read(start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("rmw")
    await probe.storage("put", "k", 0)
    await assert_eventually(lambda: _no_live(worker), message="eviction")
    # the first call misses the cache and awaits Postgres; the others must wait at the input gate
    results = await asyncio.gather(*(probe.slow_increment("k") for _ in range(40)))
    assert sorted(results) == list(range(1, 41))
    assert await probe.storage("get", "k") == 40


async def _no_live(worker: Worker) -> bool:
    return worker.live_objects() == 0


async def test_block_concurrency_while_in_the_constructor_runs_before_the_first_event(worker: Worker,
                                                                                       env: Env) -> None:
    obj = env.LIFECYCLES.get_by_name("boot")
    state = await obj.state()
    assert state["loaded"]["boots"] == 1


async def test_an_ordinary_handler_error_fails_only_that_call(worker: Worker, env: Env) -> None:
    obj = env.LIFECYCLES.get_by_name("plain-error")
    await obj.remember("kept")
    with pytest.raises(RemoteError) as info:
        await obj.raise_plain()
    assert info.value.remote_type == "LookupError" and "ordinary handler error" in info.value.message
    assert (await obj.state())["loaded"]["memory"] == "kept"


async def test_an_exception_out_of_block_concurrency_while_resets_the_object(worker: Worker, env: Env) -> None:
    obj = env.LIFECYCLES.get_by_name("reset")
    await obj.remember("lost on reset")
    before = (await obj.state())["constructed"]
    with pytest.raises(DurableError) as info:
        await obj.fail_in_block()
    assert info.value.remote_type == "ValueError"
    state = await obj.state()
    assert state["constructed"] == before + 1, "the constructor runs again after a reset"
    assert "memory" not in state["loaded"]
    assert state["loaded"]["boots"] == 2


async def test_a_failing_constructor_init_fails_calls_until_fixed(worker: Worker, env: Env) -> None:
    obj = env.LIFECYCLES.get_by_name("bad-init")
    await obj.set_fail_init(True)
    # reset the object: the next instance runs _load, which raises, and every call reports it
    with pytest.raises(DurableError):
        await obj.fail_in_block()
    for _ in range(2):
        with pytest.raises(DurableError) as info:
            await obj.state()
        assert "init failed on purpose" in info.value.message


async def test_idle_objects_are_evicted_and_rebuilt_from_storage(start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    obj = env.LIFECYCLES.get_by_name("evict")
    await obj.remember("in memory only")
    await assert_eventually(lambda: _no_live(worker), message="eviction")
    state = await obj.state()
    assert "memory" not in state["loaded"]
    assert state["loaded"]["boots"] == 2, "the constructor ran again and saw the stored state"


async def test_calls_between_objects_can_interleave_without_deadlock(worker: Worker, env: Env) -> None:
    a = env.PROBES.get_by_name("ping")
    # a -> pong -> a again: a's input gate is open while it waits for pong
    result = await a.call_other("PROBES", "pong", "call_other", "PROBES", "ping", "echo", 7)
    assert result == {"args": [7], "kwargs": {}}


async def test_consecutive_writes_to_a_hot_object_coalesce_into_few_commits(worker: Worker, env: Env) -> None:
    counter = env.COUNTERS.get_by_name("hot")
    await counter.increment()
    commits_before = worker.flusher.commits
    results = await asyncio.gather(*(counter.increment() for _ in range(300)))
    assert sorted(results) == list(range(2, 302))
    assert await counter.get() == 301
    assert worker.flusher.commits - commits_before < 300
