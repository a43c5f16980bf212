"""ctx.storage: get/put/delete, limits, value types, transactions, sync and durability, driven
over RPC through the Probe object against a real worker, NATS and Postgres."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import asyncpg
import pytest
from durable.client import Env
from durable.core.errors import RemoteError, StorageError
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory

BATCH_ERROR = "Maximum number of key value pairs is 128. 129 pairs were provided."
VALUE_SIZE = re.compile(r"Values cannot be larger than 131072 bytes\. A value of size (\d+) was provided\.")


async def wait_evicted(worker: Worker) -> None:
    async def evicted() -> bool:
        return worker.live_objects() == 0

    await assert_eventually(evicted, message="the object was evicted")


async def postgres_rows(database_url: str, probe: Any) -> dict[str, bytes]:
    """What Postgres holds for the object (after its writes were synced)."""
    await probe.storage("sync")
    object_id = (await probe.whoami())["id"]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT key, value FROM do_storage WHERE object_id = $1", object_id)
    finally:
        await conn.close()
    return {bytes(r["key"]).decode(): bytes(r["value"]) for r in rows}


async def assert_contents(probe: Any, database_url: str, expected: dict[str, Any]) -> None:
    """The object lists exactly ``expected`` and Postgres holds exactly those keys."""
    assert await probe.storage("list") == expected
    assert sorted(await postgres_rows(database_url, probe)) == sorted(expected)


def typed(value: Any) -> Any:
    """A structure that compares equal only if types match too (True != 1, 1.0 != 1)."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    if isinstance(value, dt.datetime):
        return ("datetime", value.isoformat())
    return (type(value).__name__, value)


# ----- get / put / delete ----------------------------------------------------------------------


async def test_get_of_a_missing_key_returns_none(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("get-missing")
    assert await probe.storage("get", "nope") is None
    assert await probe.storage("get", "") is None


async def test_put_then_get_returns_the_value_and_a_second_put_overwrites_it(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("put-get")
    await probe.storage("put", "k", "one")
    assert await probe.storage("get", "k") == "one"
    await probe.storage("put", "k", {"two": 2})
    assert await probe.storage("get", "k") == {"two": 2}
    await probe.storage("put", "", "empty key")
    assert await probe.storage("get", "") == "empty key"


async def test_falsy_values_are_stored_and_not_confused_with_missing_keys(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("falsy")
    falsy = {"zero": 0, "false": False, "empty-str": "", "empty-bytes": b"", "empty-list": [], "empty-dict": {}}
    await probe.storage("put", falsy)
    for key, value in falsy.items():
        assert typed(await probe.storage("get", key)) == typed(value)
    assert typed(await probe.storage("get", list(falsy))) == typed(dict(sorted(falsy.items())))


async def test_get_of_a_list_returns_only_the_keys_found_in_utf8_byte_order(
        start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("get-many")
    await probe.storage("put", {"b": 1, "\U0001F600": 2, "\uffff": 3, "a": 4, "": 5, "a\x00": 6})
    asked = ["\U0001F600", "zz", "\uffff", "b", "", "a\x00", "a", "missing", "b"]
    expected = [("", 5), ("a", 4), ("a\x00", 6), ("b", 1), ("\uffff", 3), ("\U0001F600", 2)]
    assert list((await probe.storage("get", asked)).items()) == expected
    await wait_evicted(worker)  # now the values come from Postgres
    assert list((await probe.storage("get", asked)).items()) == expected
    assert await probe.storage("get", ["missing", "zz"]) == {}
    assert await probe.storage("get", []) == {}


async def test_delete_returns_whether_the_key_existed(start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("delete-one")
    assert await probe.storage("delete", "k") is False
    await probe.storage("put", "k", 1)
    assert await probe.storage("delete", "k") is True
    assert await probe.storage("delete", "k") is False
    assert await probe.storage("get", "k") is None

    await probe.storage("put", {"stored": 0, "": 0})
    await wait_evicted(worker)  # the key now exists only in Postgres
    assert await probe.storage("delete", "stored") is True
    assert await probe.storage("delete", "") is True
    assert await probe.storage("delete", "never") is False
    assert await probe.storage("get", "stored") is None
    await wait_evicted(worker)
    assert await probe.storage("list") == {}


async def test_delete_of_a_list_returns_how_many_of_the_keys_existed(
        start_worker: WorkerFactory, env: Env, database_url: str) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("delete-many")
    await probe.storage("put", {"a": 1, "b": 2, "c": 3, "d": 4})
    assert await probe.storage("delete", ["a", "b", "x"]) == 2
    assert await probe.storage("delete", []) == 0
    assert await probe.storage("list") == {"c": 3, "d": 4}
    await wait_evicted(worker)  # "c" and "d" exist only in Postgres now
    assert await probe.storage("delete", ["c", "y", "a"]) == 1
    await assert_contents(probe, database_url, {"d": 4})


async def test_put_of_a_dict_writes_every_entry(worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("put-many")
    entries = {f"key-{i}": i for i in range(50)}
    await probe.storage("put", entries)
    assert await probe.storage("get", list(entries)) == entries
    await assert_contents(probe, database_url, entries)


async def test_put_and_delete_of_the_same_key_in_one_event_keep_the_last_write(
        start_worker: WorkerFactory, env: Env, database_url: str) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("same-key-one-event")
    await probe.storage("put", {"a": 0, "b": 0})
    await probe.storage_ops([
        ["put", ["a", 1], {}], ["delete", ["a"], {}],
        ["delete", ["b"], {}], ["put", ["b", 2], {}],
        ["put", ["c", 3], {}], ["put", ["c", 4], {}],
    ])
    await wait_evicted(worker)
    await assert_contents(probe, database_url, {"b": 2, "c": 4})


async def test_a_put_made_while_reads_of_the_same_key_wait_for_postgres_is_not_undone_by_them(
        start_worker: WorkerFactory, env: Env, database_url: str) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("put-during-reads")
    assert await probe.put_during_reads("fresh", "new") == {"get": "new", "list": {"fresh": "new"}}
    await probe.storage("put", "k", "old")
    await wait_evicted(worker)  # "k" is only in Postgres, with the old value
    assert await probe.put_during_reads("k", "new") == {"get": "new", "list": {"k": "new"}}
    await wait_evicted(worker)
    await assert_contents(probe, database_url, {"fresh": "new", "k": "new"})


async def test_delete_all_removes_every_key_from_the_cache_and_from_postgres(
        start_worker: WorkerFactory, env: Env, database_url: str) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("delete-all")
    other = env.PROBES.get_by_name("delete-all-other")
    await probe.storage("put", {f"k{i}": i for i in range(10)})
    await other.storage("put", "kept", 1)
    await wait_evicted(worker)  # the keys are only in Postgres now
    await probe.storage("put", "k0", "cached")
    assert await probe.storage("delete_all") is None
    assert await probe.storage("list") == {}
    assert await probe.storage("get", "k5") is None
    assert await probe.storage("get", ["k1", "k2"]) == {}
    assert await probe.storage("delete", "k3") is False
    await assert_contents(probe, database_url, {})
    await wait_evicted(worker)
    assert await probe.storage("list") == {}
    assert await other.storage("get", "kept") == 1  # another object's keys are untouched


async def test_writes_after_delete_all_in_the_same_event_survive_it(
        start_worker: WorkerFactory, env: Env, database_url: str) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("delete-all-then-put")
    await probe.storage("put", {"old1": 1, "old2": 2, "new": "old"})
    await wait_evicted(worker)
    results = await probe.storage_ops([
        ["put", ["pending", 0], {}],
        ["delete_all", [], {}],
        ["put", [{"new": "fresh", "other": 2}], {}],
        ["list", [], {}],
    ])
    assert results[-1] == {"new": "fresh", "other": 2}
    await wait_evicted(worker)
    await assert_contents(probe, database_url, {"new": "fresh", "other": 2})


# ----- limits: keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["k" * 2048, "é" * 1024, "\U0001F600" * 512, "\uffff" * 682 + "kk"],
                         ids=["ascii", "two-byte", "four-byte", "three-byte"])
async def test_a_key_of_2048_utf8_bytes_fits(worker: Worker, env: Env, database_url: str, key: str) -> None:
    assert len(key.encode()) == 2048
    probe = env.PROBES.get_by_name(f"key-2048-{len(key)}")
    await probe.storage("put", key, "fits")
    assert await probe.storage("get", key) == "fits"
    assert await probe.storage("get", [key]) == {key: "fits"}
    assert await probe.storage("list", start=key, end=key + "\x00") == {key: "fits"}
    await assert_contents(probe, database_url, {key: "fits"})
    assert await probe.storage("delete", key) is True


@pytest.mark.parametrize("key", ["k" * 2049, "é" * 1024 + "k", "\U0001F600" * 512 + "k"],
                         ids=["ascii", "two-byte", "four-byte"])
async def test_a_key_of_2049_utf8_bytes_is_rejected_by_every_method_and_writes_nothing(
        worker: Worker, env: Env, database_url: str, key: str) -> None:
    assert len(key.encode()) == 2049
    probe = env.PROBES.get_by_name(f"key-2049-{len(key)}")
    await probe.storage("put", "existing", 1)
    message = "Keys cannot be larger than 2048 bytes. A key of size 2049 was provided."
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("put", (key, "too long")),
        ("put", ({"ok": 1, key: "too long"},)),
        ("get", (key,)),
        ("get", (["existing", key],)),
        ("delete", (key,)),
        ("delete", (["existing", key],)),
    ]
    for op, args in calls:
        with pytest.raises(StorageError) as info:
            await probe.storage(op, *args)
        assert info.value.code == "storage"
        assert info.value.message == message, (op, args)
    await assert_contents(probe, database_url, {"existing": 1})


async def test_keys_that_are_not_strings_are_rejected(worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("key-types")
    await probe.storage("put", "existing", 1)
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("put", (5, "x")),
        ("put", ({1: "x", "ok": 2},)),
        ("put", (b"k", "x")),
        ("get", (5,)),
        ("get", (b"existing",)),
        ("get", (["existing", 5],)),
        ("delete", (5,)),
        ("delete", (b"existing",)),
        ("delete", (["existing", 5],)),
    ]
    for op, args in calls:
        with pytest.raises(StorageError) as info:
            await probe.storage(op, *args)
        assert info.value.code == "storage", (op, args)
    await assert_contents(probe, database_url, {"existing": 1})


# ----- limits: values --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"\xff" * 131072, "x" * 131072, "é" * 65536],
                         ids=["131072-bytes", "131072-chars", "131072-utf8-bytes"])
async def test_a_value_of_128_kib_fits_and_survives_eviction(
        start_worker: WorkerFactory, env: Env, value: Any) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name(f"value-fits-{type(value).__name__}-{len(value)}")
    await probe.storage("put", "big", value)
    assert await probe.storage("get", "big") == value
    await probe.storage("put", {"big2": value, "small": 1})
    await wait_evicted(worker)
    assert await probe.storage("get", "big") == value
    assert await probe.storage("get", ["big", "big2"]) == {"big": value, "big2": value}


@pytest.mark.parametrize("value", [b"\xff" * (131072 + 64), "x" * (131072 + 64), ["x" * 70000, "y" * 70000],
                                   {"nested": b"z" * 200_000}],
                         ids=["bytes", "str", "list", "dict"])
async def test_a_value_larger_than_128_kib_is_rejected_with_the_limit_and_size_and_writes_nothing(
        worker: Worker, env: Env, database_url: str, value: Any) -> None:
    probe = env.PROBES.get_by_name(f"value-too-big-{type(value).__name__}")
    await probe.storage("put", "existing", 1)
    raw_size = len(value) if isinstance(value, (bytes, str)) else 140000 if isinstance(value, list) else 200_000
    for args in [("big", value), ("existing", value), ({"ok": 1, "big": value},)]:
        with pytest.raises(StorageError) as info:
            await probe.storage("put", *args)
        match = VALUE_SIZE.fullmatch(info.value.message)
        assert match, info.value.message
        assert raw_size <= int(match.group(1)) <= raw_size + 32
    await assert_contents(probe, database_url, {"existing": 1})
    assert await probe.storage("get", "existing") == 1


# ----- limits: batches -------------------------------------------------------------------------


async def test_batches_of_128_keys_fit_for_get_put_and_delete(worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("batch-128")
    entries = {f"k{i:03}": i for i in range(128)}
    await probe.storage("put", entries)
    assert await probe.storage("get", list(entries)) == entries
    await assert_contents(probe, database_url, entries)
    assert await probe.storage("delete", list(entries)) == 128
    await assert_contents(probe, database_url, {})


async def test_batches_of_129_keys_are_rejected_for_get_put_and_delete_and_change_nothing(
        worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("batch-129")
    existing = {f"k{i:03}": i for i in range(100)}
    await probe.storage("put", existing)
    keys = [f"k{i:03}" for i in range(129)]
    for op, arg in [("put", {k: "new" for k in keys}), ("get", keys), ("delete", keys)]:
        with pytest.raises(StorageError) as info:
            await probe.storage(op, arg)
        assert info.value.message == BATCH_ERROR, op
    await assert_contents(probe, database_url, existing)


# ----- limits: value types ---------------------------------------------------------------------


async def test_put_of_none_is_an_error_and_writes_nothing(worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("put-none")
    await probe.storage("put", "existing", 1)
    for args in [("k", None), ("existing", None), ({"ok": 1, "k": None},)]:
        with pytest.raises(StorageError, match=r"put\(\) called with None"):
            await probe.storage("put", *args)
    with pytest.raises(StorageError, match="takes no second argument"):
        await probe.storage("put", {"ok": 1}, "extra")
    await assert_contents(probe, database_url, {"existing": 1})


@pytest.mark.parametrize("kind", ["set", "object", "complex", "nested_set"])
async def test_values_of_unsupported_types_are_errors_and_write_nothing(
        worker: Worker, env: Env, database_url: str, kind: str) -> None:
    probe = env.PROBES.get_by_name(f"unsupported-{kind}")
    await probe.storage("put", "existing", 1)
    for batch in (False, True):
        with pytest.raises(StorageError, match="value cannot be stored") as info:
            await probe.put_built("k", kind, batch)
        assert info.value.code == "storage"
    await assert_contents(probe, database_url, {"existing": 1})


# ----- value types -----------------------------------------------------------------------------

AWARE = dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-3, minutes=-30)))
VALUES: dict[str, Any] = {
    "str": "héllo \x00 \uffff \U0001F600",
    "bytes": bytes(range(256)),
    "int": 42,
    "negative": -7,
    "u64-max": 2**64 - 1,
    "beyond-u64": 2**64 + 1,
    "i64-min": -(2**63),
    "below-i64": -(2**63) - 1,
    "huge-negative": -(2**100),
    "float": 3.25,
    "float-integral": 2.0,
    "infinity": float("inf"),
    "true": True,
    "false": False,
    "list": [1, "a", None, [2.5, b"x", [True]]],
    "dict": {"a": {"b": [1, {"c": None}]}, "none": None, "big": 2**70, "when": dt.datetime(2000, 1, 1)},
    "int-keys": {1: "one", 2: [None]},
    "naive-datetime": dt.datetime(2024, 2, 29, 23, 59, 58, 123456),
    "aware-datetime": AWARE,
    "utc-datetime": dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
    "none-in-list": [None],
}


async def test_values_round_trip_with_their_types_through_the_cache_and_postgres(
        start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("value-types")
    await probe.storage("put", VALUES)
    await probe.storage("put", "single-aware", AWARE)
    for key, value in VALUES.items():
        assert typed(await probe.storage("get", key)) == typed(value), key
    await wait_evicted(worker)
    got = await probe.storage("get", list(VALUES))
    for key, value in VALUES.items():
        assert typed(got[key]) == typed(value), key
    listed = await probe.storage("list")
    assert typed(listed["aware-datetime"]) == typed(AWARE)
    assert listed["single-aware"].utcoffset() == dt.timedelta(hours=-3, minutes=-30)
    assert listed["naive-datetime"].tzinfo is None


# ----- transactions ----------------------------------------------------------------------------


async def test_a_committed_transaction_applies_every_write(
        start_worker: WorkerFactory, env: Env, database_url: str) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("txn-commit")
    await probe.storage("put", {"keep": 1, "gone": 2})
    seen = await probe.txn({"a": 1, "b": [2]}, ["gone"], "commit")
    assert seen == {"a": 1, "b": [2], "keep": 1}
    assert await probe.storage("list") == {"a": 1, "b": [2], "keep": 1}
    await wait_evicted(worker)
    await assert_contents(probe, database_url, {"a": 1, "b": [2], "keep": 1})


async def test_a_rolled_back_transaction_applies_nothing(worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("txn-rollback")
    await probe.storage("put", {"keep": 1, "gone": 2})
    seen = await probe.txn({"a": 1, "keep": "changed"}, ["gone"], "rollback")
    assert seen == {"a": 1, "keep": "changed"}  # the transaction saw its own writes before rolling back
    await assert_contents(probe, database_url, {"keep": 1, "gone": 2})
    assert await probe.storage("get", "keep") == 1


async def test_an_exception_inside_a_transaction_rolls_it_back_and_reaches_the_caller(
        worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("txn-raise")
    await probe.storage("put", {"keep": 1, "gone": 2})
    with pytest.raises(RemoteError) as info:
        await probe.txn({"a": 1, "keep": "changed"}, ["gone"], "raise")
    assert info.value.remote_type == "KeyError"
    assert "boom in transaction" in info.value.message
    await assert_contents(probe, database_url, {"keep": 1, "gone": 2})


async def test_an_exception_inside_a_transaction_does_not_reset_the_object(
        worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("txn-no-reset")
    assert await probe.bump_memory() == 1
    await probe.storage("put", "keep", 1)
    with pytest.raises(RemoteError):
        await probe.txn({"a": 1}, ["keep"], "raise")
    assert await probe.bump_memory() == 2  # the same instance: its memory survived
    assert await probe.echo(1, x=2) == {"args": [1], "kwargs": {"x": 2}}
    assert await probe.txn({"b": 2}, [], "commit") == {"b": 2, "keep": 1}
    await assert_contents(probe, database_url, {"b": 2, "keep": 1})
    assert await probe.bump_memory() == 3


async def test_reads_inside_a_transaction_see_its_own_writes_and_deletes(
        worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("txn-reads")
    await probe.storage("put", {"x": "stored", "y": "stored"})
    results = await probe.txn_ops([
        ["get", ["a"], {}],
        ["put", ["a", 1], {}],
        ["get", ["a"], {}],
        ["get", [["y", "a", "b", "x"]], {}],
        ["delete", ["x"], {}],
        ["get", ["x"], {}],
        ["delete", ["x"], {}],
        ["put", [{"b": 2, "\U0001F600": 3, "\uffff": 4}], {}],
        ["delete", [["b", "y", "nope"]], {}],
        ["get", [["b", "y", "a", "\U0001F600", "\uffff"]], {}],
        ["list", [], {}],
        ["list", [], {"reverse": True, "limit": 2}],
        ["list", [], {"start_after": "a", "limit": 1}],
    ])
    assert results == [
        None, None, 1,
        {"a": 1, "x": "stored", "y": "stored"},
        True, None, False, None,
        2,
        {"a": 1, "\uffff": 4, "\U0001F600": 3},
        {"a": 1, "\uffff": 4, "\U0001F600": 3},
        {"\U0001F600": 3, "\uffff": 4},
        {"\uffff": 4},
    ]
    assert [list(r) for r in results[9:12]] == [["a", "\uffff", "\U0001F600"], ["a", "\uffff", "\U0001F600"],
                                                ["\U0001F600", "\uffff"]]
    await assert_contents(probe, database_url, {"a": 1, "\uffff": 4, "\U0001F600": 3})


async def test_a_transaction_checks_limits_like_storage_and_commits_only_the_valid_writes(
        worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("txn-limits")
    results = await probe.txn_ops([
        ["put", ["k" * 2049, 1], {}],
        ["put", ["v", b"x" * (131072 + 64)], {}],
        ["put", ["n", None], {}],
        ["put", [{f"k{i}": i for i in range(129)}], {}],
        ["get", [[f"k{i}" for i in range(129)]], {}],
        ["delete", [[f"k{i}" for i in range(129)]], {}],
        ["list", [], {"start": "a", "start_after": "a"}],
        ["list", [], {"limit": 0}],
        ["delete_all", [], {}],
        ["put", ["ok", 1], {}],
    ])
    errors = [r["error"] for r in results[:-1]]
    assert "Keys cannot be larger than 2048 bytes. A key of size 2049 was provided." in errors[0]
    assert VALUE_SIZE.search(errors[1])
    assert "put() called with None" in errors[2]
    assert all(BATCH_ERROR in e for e in errors[3:6])
    assert "cannot be called with both start and start_after" in errors[6]
    assert "List limit must be positive" in errors[7]
    assert "Cannot call delete_all() within a transaction" in errors[8]
    assert results[-1] is None
    await assert_contents(probe, database_url, {"ok": 1})


async def test_a_transaction_refuses_every_operation_after_rollback(worker: Worker, env: Env) -> None:
    """Except a second rollback(), which does nothing (workerd: "allow multiple calls to rollback()")."""
    probe = env.PROBES.get_by_name("txn-after-rollback")
    await probe.storage("put", "keep", 1)
    results = await probe.txn_ops([
        ["put", ["a", 1], {}],
        ["rollback", [], {}],
        ["get", ["keep"], {}],
        ["put", ["b", 2], {}],
        ["delete", ["keep"], {}],
        ["list", [], {}],
        ["rollback", [], {}],
    ])
    assert results[:2] == [None, None]
    for op, result in zip(["get", "put", "delete", "list"], results[2:6], strict=True):
        assert f"Cannot {op} on rolled back transaction" in result["error"]
    assert results[6] is None
    assert await probe.storage("list") == {"keep": 1}


async def test_a_second_rollback_does_nothing(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("double-rollback")
    await probe.storage("put", "keep", 1)
    results = await probe.txn_ops([["put", ["a", 1], {}], ["rollback", [], {}], ["rollback", [], {}]])
    assert results == [None, None, None]
    assert await probe.storage("list") == {"keep": 1}


# ----- sync and durability ---------------------------------------------------------------------


async def test_sync_returns_and_the_writes_are_then_in_postgres(worker: Worker, env: Env, database_url: str) -> None:
    probe = env.PROBES.get_by_name("sync")
    assert await probe.storage("sync") is None  # nothing pending
    results = await probe.storage_ops([["put", [{"a": 1, "b": 2}], {}], ["delete", ["b"], {}], ["sync", [], {}]])
    assert results == [None, True, None]
    assert sorted(await postgres_rows(database_url, probe)) == ["a"]


async def test_values_survive_eviction(start_worker: WorkerFactory, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("survive-eviction")
    assert await probe.bump_memory() == 1
    await probe.storage("put", {"a": 1, "b": [2, {"c": b"3"}], "\U0001F600": "smile"})
    await probe.storage("delete", "a")
    await wait_evicted(worker)
    assert await probe.bump_memory() == 1  # a new instance
    assert await probe.storage("list") == {"b": [2, {"c": b"3"}], "\U0001F600": "smile"}


async def test_values_survive_a_worker_restart(start_worker: WorkerFactory, env: Env) -> None:
    first = await start_worker()
    probe = env.PROBES.get_by_name("survive-restart")
    await probe.storage("put", {"a": 1, "b": 2, "big": 2**64 + 1})
    await probe.storage("delete", "b")
    await probe.storage("put", "a", "changed")
    await first.stop()
    await start_worker()
    assert await probe.storage("list") == {"a": "changed", "big": 2**64 + 1}


async def test_a_put_made_before_the_handler_raised_is_still_committed(
        start_worker: WorkerFactory, env: Env, database_url: str) -> None:
    worker = await start_worker(idle_timeout=0.2)
    probe = env.PROBES.get_by_name("put-then-fail")
    with pytest.raises(RemoteError) as info:
        await probe.put_many_then_fail({"a": 1, "b": 2})
    assert info.value.remote_type == "RuntimeError"
    assert "handler failed after put" in info.value.message
    assert await probe.storage("get", ["a", "b"]) == {"a": 1, "b": 2}
    await wait_evicted(worker)
    await assert_contents(probe, database_url, {"a": 1, "b": 2})


async def test_committed_deletes_leave_no_markers_in_the_cache(worker: Worker, env: Env, settings: Settings) -> None:
    """An object that deletes as it goes (a stream dropping old messages) keeps a cache the size
    of what it holds, and a deleted key still reads as absent once its marker is gone."""
    from durable.core.wire import partition_of

    probe = env.PROBES.get_by_name("rolling")
    for n in range(300):
        await probe.storage("put", f"m:{n:05d}", n)
        if n >= 5:
            await probe.storage("delete", f"m:{n - 5:05d}")
    state = worker.parts[partition_of(probe.id.hex, settings.partitions)]
    inst = state.instances[probe.id.hex]
    await inst.storage.sync()
    await probe.storage("put", "tick", 1)  # one more flush: the last delete's marker goes too
    assert len(inst.storage._cache) <= 10, len(inst.storage._cache)
    assert await probe.storage("get", "m:00000") is None
    assert list(await probe.storage("list", prefix="m:")) == [f"m:{n:05d}" for n in range(295, 300)]
