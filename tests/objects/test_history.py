"""Per-object change history and point-in-time restore (services/objects/history.py) on real
NATS and Postgres: a restore gives exactly the storage of the time asked for, before the
constructor reads; it is recorded itself (undo); a fork leaves its source untouched; history
past the retention window is pruned and refused; bad input is a clear error."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest
from durable.client import Env
from durable.core.config import AppConfig
from durable.core.errors import DurableError, NotOwner, ObjectReset
from durable.core.settings import Settings
from durable.core.wire import partition_of
from durable.objects import Worker
from durable.objects.history import Bookmark, parse_time
from durable.operate import commands
from durable.operate.target import UsageError
from websockets.asyncio.client import connect

from tests.cli.test_operate import parse, run
from tests.helpers.gateway import ask
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory


def now_ms() -> int:
    return int(time.time() * 1000)


async def mark() -> int:
    """A time strictly between the writes before it and the writes after it."""
    await asyncio.sleep(0.02)
    t = now_ms()
    await asyncio.sleep(0.02)
    return t


async def history_rows(settings: Settings, object_id: str) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM do_history WHERE object_id = $1", object_id))
    finally:
        await conn.close()


async def restored(stub: Any, bookmark: str) -> None:
    with pytest.raises(ObjectReset, match="restoring"):
        await stub.restore(bookmark)


async def test_restore_to_a_time_gives_exactly_the_storage_at_that_time(worker: Worker, env: Env) -> None:
    stub = env.JOURNALS.get_by_name("timeline")
    expected: list[tuple[int, dict[str, Any]]] = [(await mark(), {})]
    state: dict[str, Any] = {}

    async def step(op: str, arg: Any) -> None:
        if op == "put":
            await stub.put(arg)
            state.update(arg)
        elif op == "delete":
            await stub.delete(arg)
            for k in arg:
                state.pop(k, None)
        else:
            await stub.delete_all()
            state.clear()
        expected.append((await mark(), dict(state)))

    await step("put", {"a": 1, "b": [1, 2], "c": "x"})
    await step("put", {"a": 2, "d": {"nested": True}})
    await step("delete", ["b", "missing"])
    await step("put", {"b": "again", "e": b"\x00bytes"})
    await step("delete_all", None)
    await step("put", {"a": 3, "z": 0.5})
    await step("put", {"a": 4})
    assert await stub.dump() == state

    # to every point, in an order that goes back and forth (a restore is recorded history too)
    for i in (3, 0, 6, 1, 5, 2, 4, 7):
        t, want = expected[i]
        await restored(stub, await stub.bookmark_for(t))
        assert await stub.dump() == want, f"point {i}"
        assert await stub.seen_at_start() == want  # the constructor already saw the restored state
    # the last restore (to now) undid nothing: everything written since stays
    assert await stub.dump() == state


async def test_a_restore_is_recorded_and_can_be_undone(worker: Worker, env: Env) -> None:
    stub = env.JOURNALS.get_by_name("undo")
    await stub.put({"v": 1})
    before = await stub.current_bookmark()
    await stub.put({"v": 2, "w": 2})
    undo = await stub.request_restore(before)
    assert undo > before  # bookmarks compare as strings in time order
    with pytest.raises(ObjectReset):
        await stub.abort()
    assert await stub.dump() == {"v": 1}
    await restored(stub, undo)
    assert await stub.dump() == {"v": 2, "w": 2}


async def test_the_alarm_and_later_restarts_are_left_alone(worker: Worker, env: Env) -> None:
    stub = env.JOURNALS.get_by_name("alarm-kept")
    await stub.put({"k": 1})
    t = await mark()
    far = now_ms() + 3_600_000
    await stub.arm(far)
    await stub.put({"k": 2})
    await restored(stub, await stub.bookmark_for(t))
    assert await stub.dump() == {"k": 1}
    assert await stub.alarm_at() == far  # the alarm is not storage: it keeps its time
    await stub.put({"k": 3})
    with pytest.raises(ObjectReset):
        await stub.abort()
    assert await stub.dump() == {"k": 3}  # applied once: a later restart restores nothing again


async def test_bad_bookmarks_and_times_are_clear_errors(worker: Worker, env: Env) -> None:
    stub = env.JOURNALS.get_by_name("bad-input")
    await stub.put({"k": 1})
    with pytest.raises(DurableError, match="not a bookmark"):
        await stub.request_restore("yesterday")
    with pytest.raises(DurableError, match="is in the future"):
        await stub.bookmark_for(now_ms() + 3_600_000)
    with pytest.raises(DurableError, match="outside the history retention window"):
        await stub.bookmark_for(now_ms() - 30 * 86_400_000)
    for bad in ("noon", float("inf"), float("nan"), -1, 10**30, True):
        with pytest.raises(DurableError, match="datetime or epoch milliseconds"):
            await stub.bookmark_for(bad)
    old = f"{1:016x}-{now_ms() - 30 * 86_400_000:012x}"
    with pytest.raises(DurableError, match="outside the history retention window"):
        await stub.request_restore(old)
    assert await stub.dump() == {"k": 1}  # nothing changed, and the object lives on


async def test_restore_waits_for_the_running_event_and_is_never_half_applied(
        worker: Worker, env: Env, settings: Settings, config: AppConfig, capsys: pytest.CaptureFixture[str]) -> None:
    stub = env.JOURNALS.get_by_name("raced")
    await stub.put({f"k{i}": 0 for i in range(8)})
    t = await mark()
    observed: list[dict[str, Any]] = []

    async def traffic() -> None:
        for n in range(1, 15):
            try:
                await stub.put_slowly({f"k{i}": n for i in range(8)}, 0.01)
                observed.append(await stub.dump())
            except ObjectReset:
                pass  # queued behind the restore's reset: retryable, as after abort()

    async def operator() -> int:
        await asyncio.sleep(0.1)
        code, _ = await run(settings, config, capsys, "state", "restore", "JOURNALS", "raced", "--at", str(t))
        return code

    results = await asyncio.gather(traffic(), traffic(), operator())
    assert results[-1] == 0
    observed.append(await stub.dump())
    # every state anyone saw is one whole write or the restored one: all eight keys alike
    for seen in observed:
        assert len(set(seen.values())) == 1 and len(seen) == 8, seen


async def test_cli_restore_and_fork(worker: Worker, env: Env, settings: Settings, config: AppConfig,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    source = env.JOURNALS.get_by_name("src")
    await source.put({"a": 1, "b": 2})
    t = await mark()
    await source.delete(["a"])
    await source.put({"c": 3})
    code, out = await run(settings, config, capsys, "state", "restore", "JOURNALS", "src", "--at", str(t),
                          "--fork", "src-copy")
    assert code == 0 and '"copied": 2' in out
    assert await env.JOURNALS.get_by_name("src-copy").dump() == {"a": 1, "b": 2}
    assert await source.dump() == {"b": 2, "c": 3}  # the source is untouched
    # a fork never overwrites an object that has storage
    with pytest.raises(UsageError, match="has storage already"):
        await commands._dispatch(parse("state", "restore", "JOURNALS", "src", "--at", str(t), "--fork", "src-copy"),
                                 settings, config)
    code, out = await run(settings, config, capsys, "state", "restore", "JOURNALS", "src", "--at", "-0s")
    assert code == 0 and '"changed": 0' in out
    code, out = await run(settings, config, capsys, "state", "restore", "JOURNALS", "src", "--at", str(t))
    assert code == 0
    assert await source.dump() == {"a": 1, "b": 2}


@pytest.mark.parametrize(("argv", "words"), [
    (("state", "restore", "JOURNALS", "x", "--at", "last tuesday"), "bad time"),
    (("state", "restore", "JOURNALS", "x", "--at", "-1y"), "bad time"),
    (("state", "restore", "NOPE", "x", "--at", "-1m"), "no binding or class named 'NOPE'"),
    (("state", "restore", "JOURNALS", "never-written", "--at", "-1m"), "no storage and no history"),
    (("state", "restore", "JOURNALS", "x", "--at", "-30d"), "outside the history retention window"),
    (("state", "restore", "JOURNALS", "x", "--at", "2999-01-01T00:00:00Z"), "in the future"),
    (("state", "restore", "JOURNALS", "x", "--at", "-1m", "--fork", "x"), "names the object itself"),
    (("state", "restore", "JOURNALS", "never-written", "--at", "-1m", "--fork", "y"), "no storage and no history"),
])
async def test_bad_restore_input_is_a_usage_error(worker: Worker, env: Env, settings: Settings, config: AppConfig,
                                                  argv: tuple[str, ...], words: str) -> None:
    await env.JOURNALS.get_by_name("x").put({"k": 1})
    with pytest.raises(UsageError, match=words):
        await commands._dispatch(parse(*argv), settings, config)


async def test_history_is_pruned_past_retention(start_worker: WorkerFactory, env: Env, settings: Settings,
                                                config: AppConfig, capsys: pytest.CaptureFixture[str]) -> None:
    await start_worker(history_retention=1.0)
    stub = env.JOURNALS.get_by_name("short-lived")
    oid = env.JOURNALS.id_from_name("short-lived").hex
    await stub.put({"a": 1})
    t = await mark()
    await stub.put({"a": 2})
    assert await history_rows(settings, oid) == 2

    async def pruned() -> bool:
        return await history_rows(settings, oid) == 0

    await assert_eventually(pruned, 15, "history older than the retention pruned")
    with pytest.raises(DurableError, match="outside the history retention window"):
        await stub.bookmark_for(t)
    assert await stub.dump() == {"a": 2}  # pruning history never touches storage
    # what is inside the window still restores
    t2 = await mark()
    await stub.put({"a": 3})
    await restored(stub, await stub.bookmark_for(t2))
    assert await stub.dump() == {"a": 2}


async def test_history_off_records_nothing_and_says_so(start_worker: WorkerFactory, env: Env,
                                                       settings: Settings) -> None:
    before = await mark()
    off = await start_worker(history=False)
    stub = env.JOURNALS.get_by_name("no-history")
    await stub.put({"a": 1})
    await stub.delete(["a"])
    assert await history_rows(settings, env.JOURNALS.id_from_name("no-history").hex) == 0
    with pytest.raises(DurableError, match="history is off"):
        await stub.current_bookmark()
    await off.stop()
    # a worker with history on again never restores across the time writes went unrecorded
    await start_worker()
    with pytest.raises(DurableError, match="outside the history retention window"):
        await stub.bookmark_for(before)


async def test_hibernated_sockets_stay_connected_through_a_restore(
        gw: str, env: Env, settings: Settings, config: AppConfig, capsys: pytest.CaptureFixture[str]) -> None:
    async with connect(f"{gw}/sock/pitr?user=ada") as ws:
        assert (await ask(ws, {"op": "whoami"}))["count"] == 1
        t = await mark()
        assert await ask(ws, {"op": "put_then_send", "key": "x", "v": 1}) == {"sent": "x"}
        code, _ = await run(settings, config, capsys, "state", "restore", "SOCKS", "pitr", "--at", str(t))
        assert code == 0
        code, out = await run(settings, config, capsys, "state", "get", "SOCKS", "pitr")
        assert json.loads(out) == {"accepted": 1}  # storage went back ...
        # ... while the socket (not storage) stayed open with its tags and attachment
        seen = await ask(ws, {"op": "whoami"})
        assert seen["count"] == 1 and seen["attachment"] == {"user": "ada"}


async def test_a_restore_under_a_superseded_epoch_writes_nothing(worker: Worker, env: Env, settings: Settings) -> None:
    stub = env.JOURNALS.get_by_name("fenced")
    oid = env.JOURNALS.id_from_name("fenced").hex
    await stub.put({"a": 1})
    before = Bookmark.parse(await stub.current_bookmark())
    await stub.put({"a": 2})
    partition = partition_of(oid, settings.partitions)
    stale = worker.parts[partition].epoch - 1
    with pytest.raises(NotOwner):
        await worker.history.restore(oid, "Journal", partition, stale, before.pos)
    with pytest.raises(NotOwner):
        await worker.history.request(oid, "Journal", partition, stale, before)
    with pytest.raises(NotOwner):
        await worker.history.fork(oid, before.pos, "f" * 64, "Journal", partition, stale)
    with pytest.raises(ObjectReset):
        await stub.abort()
    assert await stub.dump() == {"a": 2}  # nothing restored, nothing pending


def test_operator_times_and_bookmarks_parse() -> None:
    now = 1_800_000_000.0
    assert parse_time("-10m", now) == int((now - 600) * 1000)
    assert parse_time("-1.5h", now) == int((now - 5400) * 1000)
    assert parse_time("-250ms", now) == int(now * 1000) - 250
    assert parse_time("1700000000123", now) == 1_700_000_000_123
    assert parse_time("2026-05-01T12:00:00Z") == parse_time("2026-05-01T12:00:00") == 1_777_636_800_000
    assert parse_time("2026-05-01T14:00:00+02:00") == 1_777_636_800_000
    for bad in ("", "-10", "-10y", "10m", "yesterday", "2026-13-01", "0001-01-01", "-99999999999d",
                "99999999999999999"):
        with pytest.raises(ValueError, match="bad time"):
            parse_time(bad, now)
    b = Bookmark(1234, 1_777_636_800_000)
    assert Bookmark.parse(str(b)) == b
    assert str(Bookmark(9, 5)) < str(Bookmark(10, 4))  # string order is position order
    for bad in ("", "00000000000004d2", "00000000000004D2-018f2b3c4d5e", 42):
        with pytest.raises(DurableError, match="not a bookmark"):
            Bookmark.parse(bad)
