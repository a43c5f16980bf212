"""Idempotency keys (services/objects/idempotency.py): a keyed call runs once; a repeat gets the
recorded reply, also after eviction; the record commits in the same flush as the call's writes.

The objects (``Edge`` in tests/helpers/objects.py) run in the test's process, so each test counts
how often a method really ran through ``Edge.notes[tag]``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import httpx
import pytest
from durable.client import Client, Env
from durable.client.namespace import Stub
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.errors import (
    IdempotencyInterrupted,
    IdempotencyKeyReused,
    InvalidRequest,
    RemoteError,
    RequestTimeout,
)
from durable.core.settings import Settings
from durable.core.wire import IDEMPOTENCY_HEADER, partition_of
from durable.objects import Worker

from tests.helpers.objects import Edge
from tests.helpers.waiting import assert_eventually, assert_stays
from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.timeout(120)


async def _fetch(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _stored(settings: Settings, stub: Stub, key: str) -> Any:
    rows = await _fetch(settings, "SELECT value FROM do_storage WHERE object_id = $1 AND key = $2",
                        stub.id.hex, key.encode())
    return codec.unpack(bytes(rows[0]["value"])) if rows else None


async def _record(settings: Settings, stub: Stub, key: str) -> asyncpg.Record | None:
    rows = await _fetch(settings, "SELECT fingerprint, reply, expires_ms FROM do_idempotency "
                                  "WHERE object_id = $1 AND idem_key = $2", stub.id.hex, key)
    return rows[0] if rows else None


def _runs(tag: str) -> int:
    return Edge.notes.get(tag, []).count("ran")


def _evict(worker: Worker, settings: Settings, stub: Stub) -> None:
    state = worker.parts[partition_of(stub.id.hex, settings.partitions)]
    assert state.instances.pop(stub.id.hex, None) is not None, "the object was not live"


async def test_a_repeated_key_returns_the_recorded_reply_without_running_again(
        worker: Worker, env: Env, settings: Settings) -> None:
    obj = env.EDGES.get_by_name("idem-repeat")
    keyed = obj.with_idempotency_key("order-1")
    assert await keyed.incr_noted("n", "idem-repeat") == 1
    assert await keyed.incr_noted("n", "idem-repeat") == 1  # the recorded reply
    assert _runs("idem-repeat") == 1
    assert await _stored(settings, obj, "n") == 1
    record = await _record(settings, obj, "order-1")
    assert record is not None and record["fingerprint"] == "rpc.incr_noted" and record["reply"] is not None

    # another key, or none, runs the method
    assert await obj.with_idempotency_key("order-2").incr_noted("n", "idem-repeat") == 2
    assert await obj.incr_noted("n", "idem-repeat") == 3
    assert _runs("idem-repeat") == 3

    # evicted: the record is read back from Postgres
    _evict(worker, settings, obj)
    assert await keyed.incr_noted("n", "idem-repeat") == 1
    assert _runs("idem-repeat") == 3
    assert await obj.get("n") == 3


async def test_an_error_the_method_raised_is_recorded_too(worker: Worker, env: Env, settings: Settings) -> None:
    """The call ran (its write stays): a repeat gets the same error and does not run it again."""
    keyed = env.EDGES.get_by_name("idem-error").with_idempotency_key("k")
    for _ in range(2):
        with pytest.raises(RemoteError, match="failed after writing 1") as info:
            await keyed.incr_noted("n", "idem-error", fail=True)
        assert info.value.remote_type == "ValueError"
    assert _runs("idem-error") == 1
    assert await env.EDGES.get_by_name("idem-error").get("n") == 1


async def test_a_key_is_bound_to_the_method_it_was_first_used_with(worker: Worker, env: Env) -> None:
    obj = env.EDGES.get_by_name("idem-reuse")
    await obj.with_idempotency_key("k").incr_noted("n", "idem-reuse")
    with pytest.raises(IdempotencyKeyReused, match="rpc.incr_noted") as info:
        await obj.with_idempotency_key("k").put("n", 100)
    assert info.value.status == 422
    assert await obj.get("n") == 1
    # the same key on another object is another call
    assert await env.EDGES.get_by_name("idem-reuse-2").with_idempotency_key("k").incr_noted("n", "x") == 1


async def test_bad_keys_are_refused_before_anything_runs(worker: Worker, env: Env, client: Client) -> None:
    obj = env.EDGES.get_by_name("idem-bad")
    for bad in ["", "x" * 256, "caf\u00e9", "tab\there"]:
        with pytest.raises(InvalidRequest, match="Idempotency-Key"):
            obj.with_idempotency_key(bad)
    # a raw NATS publisher's bad header: a clear error reply, nothing run
    with pytest.raises(InvalidRequest, match="Idempotency-Key must be 1 to 255"):
        await client.request(obj._subject + "rpc.incr_noted", codec.pack({"args": ["n", "idem-bad"]}),
                             {IDEMPOTENCY_HEADER: "y" * 300})
    assert _runs("idem-bad") == 0


async def test_a_repeat_while_the_first_call_runs_waits_for_its_reply(worker: Worker, env: Env) -> None:
    obj = env.EDGES.get_by_name("idem-inflight")
    keyed = obj.with_idempotency_key("k")
    first = asyncio.create_task(keyed.incr_when("n", "idem-inflight"))
    await assert_eventually(lambda: _runs("idem-inflight") == 1, 10, "the first call running")
    repeats = [asyncio.create_task(keyed.incr_when("n", "idem-inflight")) for _ in range(3)]
    await assert_stays(lambda: not any(r.done() for r in repeats), 0.2, "repeats waiting")
    Edge.event("idem-inflight").set()
    assert await first == 1
    assert [await r for r in repeats] == [1, 1, 1]
    assert _runs("idem-inflight") == 1
    assert await obj.get("n") == 1


@pytest.mark.parametrize("with_key", [True, False])
async def test_a_keyed_call_commits_its_writes_together_with_its_record(
        worker: Worker, env: Env, settings: Settings, with_key: bool) -> None:
    """While a keyed call runs, its writes are held back: they commit only with its record, so no
    failure can leave the writes without the record (a repeat would apply them again). Without a
    key (the control), the write made before the wait commits during the wait."""
    tag = f"idem-atomic-{with_key}"
    obj = env.EDGES.get_by_name(tag)
    await obj.ping()
    stub = obj.with_idempotency_key("k") if with_key else obj
    call = asyncio.create_task(stub.put_then_hold("v", "written", tag))
    await assert_eventually(lambda: "put" in Edge.notes.get(tag, []), 10, "the put")

    async def committed() -> bool:
        return await _stored(settings, obj, "v") == "written"

    if with_key:
        await assert_stays(lambda: _not(committed), 0.5, "the held write not committed")
        assert await _record(settings, obj, "k") is None
    else:
        await assert_eventually(committed, 10, "the unkeyed write committed during the wait")
    Edge.event(tag).set()
    assert await call == "done"
    assert await committed()
    if with_key:
        record = await _record(settings, obj, "k")
        assert record is not None and record["reply"] is not None


async def _not(check: Any) -> bool:
    return not await check()


async def test_a_call_that_waits_for_durability_leaves_a_started_record(
        worker: Worker, env: Env, settings: Settings) -> None:
    """A keyed call that calls another object needs its writes durable first: they commit with a
    started record (no reply), replaced by the full record when it ends."""
    obj = env.EDGES.get_by_name("idem-started")
    call = asyncio.create_task(obj.with_idempotency_key("k").call_then_time_out("idem-started", "idem-callee"))
    await assert_eventually(lambda: "callee waiting" in Edge.notes.get("idem-started-callee", []), 10,
                            "the outgoing call running")
    record = await _record(settings, obj, "k")
    assert record is not None and record["reply"] is None and record["fingerprint"] == "rpc.call_then_time_out"
    Edge.event("idem-started-callee").set()
    assert await call == "done"
    record = await _record(settings, obj, "k")
    assert record is not None and record["reply"] is not None
    assert await obj.with_idempotency_key("k").call_then_time_out("idem-started", "idem-callee") == "done"

    # what a worker that stopped during the outgoing call leaves behind: the started record alone
    other = env.EDGES.get_by_name("idem-interrupted")
    await _fetch(settings, "INSERT INTO do_idempotency VALUES ($1, 'k', 'Edge', $2, 'rpc.incr_noted', NULL, $3)",
                 other.id.hex, partition_of(other.id.hex, settings.partitions), int(time.time() * 1000) + 60_000)
    with pytest.raises(IdempotencyInterrupted, match="outcome is partial") as info:
        await other.with_idempotency_key("k").incr_noted("n", "idem-interrupted")
    assert info.value.status == 409 and _runs("idem-interrupted") == 0


async def test_a_keyed_call_that_times_out_is_retried_and_runs_once(
        worker: Worker, settings: Settings, config: AppConfig) -> None:
    """With a key, the client repeats a timed-out call (its repeats wait for the first run on the
    worker); without one, the timeout is reported and the call is not repeated."""
    impatient = settings.model_copy(update={"request_timeout": 0.3, "retry_deadline": 10.0})
    async with await Client.connect(impatient, config) as c:
        env = Env(c, config)
        obj = env.EDGES.get_by_name("idem-timeout")
        with pytest.raises(RequestTimeout):
            await obj.incr_when("n", "idem-timeout-plain")
        Edge.event("idem-timeout-plain").set()

        call = asyncio.create_task(obj.with_idempotency_key("k").incr_when("n", "idem-timeout"))
        await asyncio.sleep(1.0)  # several timed-out attempts, each repeated
        assert not call.done()
        Edge.event("idem-timeout").set()
        assert await call == 2
    assert _runs("idem-timeout") == 1


async def test_keys_expire_and_expired_records_are_swept(start_worker: WorkerFactory, env: Env,
                                                         settings: Settings) -> None:
    worker = await start_worker(idempotency_ttl=0.5)
    obj = env.EDGES.get_by_name("idem-expiry")
    keyed = obj.with_idempotency_key("k")
    assert await keyed.incr_noted("n", "idem-expiry") == 1
    record = await _record(settings, obj, "k")
    assert record is not None
    await asyncio.sleep(max(0.0, record["expires_ms"] / 1000 - time.time()) + 0.05)  # past its expiry
    assert await keyed.incr_noted("n", "idem-expiry") == 2  # a repeat after the expiry runs again
    assert _runs("idem-expiry") == 2

    other = env.EDGES.get_by_name("idem-expiry-2")
    await other.with_idempotency_key("k2").incr_noted("n", "idem-expiry")
    await asyncio.sleep(0.6)
    assert await worker.idempotency.sweep() >= 2
    assert await _record(settings, obj, "k") is None and await _record(settings, other, "k2") is None


async def test_an_http_idempotency_key_reaches_the_object(worker: Worker, gw: str) -> None:
    """The router passes the HTTP header on: a repeated POST gets the first one's answer."""
    base = gw.replace("ws://", "http://")
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        url = "/counter/idem-http/increment"
        first = await http.post(url, headers={IDEMPOTENCY_HEADER: "pay-1"})
        again = await http.post(url, headers={IDEMPOTENCY_HEADER: "pay-1"})
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json() == {"value": 1}
        assert (await http.post(url)).json() == {"value": 2}
        bad = await http.post(url, headers={IDEMPOTENCY_HEADER: "x" * 300})
        assert bad.status_code == 400 and "Idempotency-Key" in bad.text
        assert (await http.get("/counter/idem-http")).json() == {"value": 2}
