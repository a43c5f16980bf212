"""Events (ctx.emit, services/objects/events.py and outbox.py): an event commits with the writes
of the event that emitted it, or not at all, and reaches the JetStream stream once, in order per
object, read back here by a JetStream consumer as any consumer would.

The stream is shared by the test session (NATS is); each test uses objects of its own names and
reads only their subjects. Each test has a fresh database, so the outbox holds only its events.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import asyncpg
import pytest
from durable.client import Env
from durable.core.errors import ObjectReset, RemoteError
from durable.core.settings import Settings
from durable.objects import Worker
from nats.aio.client import Client as NatsClient

from tests.helpers import events
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.timeout(120)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def test_increments_reach_the_stream_once_each_in_order(worker: Worker, env: Env, settings: Settings,
                                                              raw_nc: NatsClient) -> None:
    counter = env.COUNTERS.get_by_name(_name("evt"))
    for expected in range(1, 6):
        assert await counter.increment() == expected
    await counter.increment(10)
    got = await events.wait_for(raw_nc, settings, f"evt.Counter.{counter.id.hex}.>", 6)
    await events.wait_drained(settings)  # published rows are deleted once the stream acknowledged them
    assert [e.name for e in got] == ["incremented"] * 6
    assert [e.json() for e in got] == [{"value": v, "by": 1} for v in range(1, 6)] + [{"value": 15, "by": 10}]
    assert [e.seq for e in got] == list(range(1, 7))
    assert len({e.msg_id for e in got}) == 6 and all(e.msg_id.startswith(counter.id.hex + ":") for e in got)
    assert await events.count(raw_nc, settings, f"evt.Counter.{counter.id.hex}.>") == 6
    assert worker.events.published == 6 and worker.events.failures == 0
    assert b"durable_events_published_total 6.0" in await worker.scrape()


async def test_an_event_is_committed_in_the_flush_of_its_writes(start_worker: WorkerFactory, env: Env,
                                                                settings: Settings, raw_nc: NatsClient) -> None:
    """With the publisher paused, the event is a do_outbox row as soon as the call returns (the
    reply waited for the commit), numbered, with its subject, headers and body."""
    worker = await start_worker(events_publish_delay=3600.0)
    probe = env.PROBES.get_by_name(_name("row"))
    await probe.emit("made", b"\x00raw", {"X-Trace": "abc"}, {"k": 1})
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT seq, subject, msg_id, payload, headers FROM do_outbox WHERE object_id = $1",
                                probe.id.hex)
        assert await conn.fetchval("SELECT count(*) FROM do_storage WHERE object_id = $1", probe.id.hex) == 1
    finally:
        await conn.close()
    assert len(rows) == 1
    r = rows[0]
    assert (r["seq"], r["subject"], bytes(r["payload"]), r["headers"]) == \
        (1, f"evt.Probe.{probe.id.hex}.made", b"\x00raw", '{"X-Trace":"abc"}')
    assert await events.count(raw_nc, settings, f"evt.Probe.{probe.id.hex}.>") == 0
    # a new publisher (as after a restart) sends it, with the headers given and its own
    worker.events.delay = 0.0
    await worker.events.stop()
    worker.events.start()
    [e] = await events.wait_for(raw_nc, settings, f"evt.Probe.{probe.id.hex}.>", 1)
    assert (e.data, e.headers["X-Trace"], e.seq, e.msg_id) == (b"\x00raw", "abc", 1, r["msg_id"])


@pytest.mark.parametrize("name", ["a.b", "", "has space", "*", ">", "a*", "x" * 129, "tab\t", "é"])
async def test_a_bad_event_name_is_a_clear_error(worker: Worker, env: Env, name: str) -> None:
    probe = env.PROBES.get_by_name(_name("bad-name"))
    with pytest.raises(RemoteError) as info:
        await probe.emit(name, {"a": 1})
    assert info.value.remote_type == "ValueError" and "emit(name)" in info.value.message


async def test_bad_payloads_and_headers_are_clear_errors_that_stage_nothing(
        start_worker: WorkerFactory, env: Env, settings: Settings, raw_nc: NatsClient) -> None:
    await start_worker(event_max_bytes=1000)
    probe = env.PROBES.get_by_name(_name("bad-input"))
    bad: list[tuple[object, object, str, str]] = [
        (5, None, "TypeError", "emit(name)"),
        ("ok", {"b": b"bytes are not JSON"}, "TypeError", "emit(payload)"),
        ("ok", float("nan"), "TypeError", "emit(payload)"),
        ("ok", b"x" * 1001, "ValueError", "at most 1000 bytes"),
        ("ok", "x" * 999, "ValueError", "at most 1000 bytes"),  # 1001 bytes as JSON, quotes included
    ]
    for name, payload, kind, text in bad:
        with pytest.raises(RemoteError) as info:
            await probe.emit(name, payload)
        assert info.value.remote_type == kind and text in info.value.message, (name, payload, info.value)
    bad_headers: list[object] = [
        "not a dict", {"Nats-Msg-Id": "mine"}, {"durable-seq": "1"}, {"a b": "c"}, {"k": "v\r\nInjected: 1"},
        {"k": 1}, {f"h{i}": "v" for i in range(17)}, {"k": "v" * 1025}, {"": "v"},
    ]
    for headers in bad_headers:
        with pytest.raises(RemoteError) as info:
            await probe.emit("ok", None, headers)
        assert info.value.remote_type in ("TypeError", "ValueError") and "emit(headers)" in info.value.message
    # none of that staged anything: the one good event is the object's first
    await probe.emit("ok", b"x" * 1000, {"Content-Type": "application/octet-stream"})
    [e] = await events.wait_for(raw_nc, settings, f"evt.Probe.{probe.id.hex}.>", 1)
    assert (e.name, e.seq, len(e.data), e.headers["Content-Type"]) == ("ok", 1, 1000, "application/octet-stream")
    await events.wait_drained(settings)
    assert await events.count(raw_nc, settings, f"evt.Probe.{probe.id.hex}.>") == 1


async def test_a_rolled_back_or_reset_event_emits_nothing(worker: Worker, env: Env, settings: Settings,
                                                          raw_nc: NatsClient) -> None:
    probe = env.PROBES.get_by_name(_name("rollback"))
    await probe.emit_in_txn("rolled-back", "k1", "rollback")
    with pytest.raises(RemoteError) as raised:
        await probe.emit_in_txn("raised", "k2", "raise")
    assert raised.value.remote_type == "KeyError"
    with pytest.raises(ObjectReset):
        await probe.emit_then_abort("aborted", "k3")
    await probe.emit_in_txn("kept", "k4", "commit")
    await probe.emit("marker")
    got = await events.wait_for(raw_nc, settings, f"evt.Probe.{probe.id.hex}.>", 2)
    await events.wait_drained(settings)
    # the marker is the second event of the object: nothing before it was committed but "kept"
    assert [(e.name, e.seq) for e in got] == [("kept", 1), ("marker", 2)]
    assert await probe.storage("get", ["k1", "k2", "k3", "k4"]) == {"k4": "kept"}
    assert await events.count(raw_nc, settings, f"evt.Probe.{probe.id.hex}.>") == 2


async def test_a_handler_that_raises_keeps_its_writes_but_emits_nothing(worker: Worker, env: Env,
                                                                       settings: Settings, raw_nc: NatsClient) -> None:
    """A handler that raises after writing keeps its writes (Cloudflare's semantics: the object
    is not reset), but its caller got an error, so no event says it happened."""
    probe = env.PROBES.get_by_name(_name("failed"))
    with pytest.raises(RemoteError) as info:
        await probe.emit_then_fail("written", "k")
    assert info.value.remote_type == "RuntimeError"
    assert await probe.storage("get", "k") == "written"
    await probe.emit("marker")
    [e] = await events.wait_for(raw_nc, settings, f"evt.Probe.{probe.id.hex}.>", 1)
    await events.wait_drained(settings)
    # the marker is the object's first event: the failed handler's was never committed
    assert (e.name, e.seq) == ("marker", 1)
    assert await events.count(raw_nc, settings, f"evt.Probe.{probe.id.hex}.>") == 1


async def test_several_emits_of_one_event_keep_their_order(worker: Worker, env: Env, settings: Settings,
                                                           raw_nc: NatsClient) -> None:
    probe = env.PROBES.get_by_name(_name("many"))
    await probe.emit_many([f"e{i}" for i in range(50)])
    await probe.emit_many(["last"])
    got = await events.wait_for(raw_nc, settings, f"evt.Probe.{probe.id.hex}.>", 51)
    assert [e.name for e in got] == [f"e{i}" for i in range(50)] + ["last"]
    assert [e.seq for e in got] == list(range(1, 52))


async def test_events_wait_in_postgres_while_the_stream_is_gone_and_are_all_published_after(
        worker: Worker, env: Env, settings: Settings, raw_nc: NatsClient) -> None:
    """JetStream cannot take them (the stream was deleted): the committed events stay in the
    outbox, the publisher's round fails for that object (and makes the stream again), and a
    later round publishes every one of them, in order."""
    publisher = worker.events
    await publisher.stop()
    await raw_nc.jetstream().delete_stream(settings.events_stream)
    counter = env.COUNTERS.get_by_name(_name("gone"))
    for _ in range(3):
        await counter.increment()
    assert await events.outbox_rows(settings, counter.id.hex) == 3
    assert await publisher.publish_round()  # a round that tried: the object now waits a backoff
    assert publisher.failures == 1
    assert await events.outbox_rows(settings, counter.id.hex) == 3  # nothing lost
    publisher.start()
    got = await events.wait_for(raw_nc, settings, f"evt.Counter.{counter.id.hex}.>", 3)
    assert [e.json()["value"] for e in got] == [1, 2, 3] and [e.seq for e in got] == [1, 2, 3]
    await events.wait_drained(settings)


async def test_the_stream_follows_the_settings(worker: Worker, settings: Settings, raw_nc: NatsClient) -> None:
    info = await raw_nc.jetstream().stream_info(settings.events_stream)
    assert info.config.subjects == ["evt.>"]
    assert info.config.max_age == settings.events_max_age
    assert info.config.duplicate_window == settings.events_duplicate_window
    assert info.config.num_replicas == settings.events_replicas


def test_a_dedupe_window_longer_than_retention_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="events_duplicate_window"):
        Settings(**{**settings.model_dump(), "events_max_age": 60.0, "events_duplicate_window": 120.0})


@pytest.mark.slow
async def test_ten_thousand_events_of_a_hundred_objects_arrive_in_order_without_gap_or_duplicate(
        worker: Worker, env: Env, settings: Settings, raw_nc: NatsClient) -> None:
    objects, per_object = 100, 100
    counters = [env.COUNTERS.get_by_name(_name(f"ten-k-{i}")) for i in range(objects)]

    async def drive(i: int) -> None:
        for _ in range(per_object):
            await counters[i].increment()

    await asyncio.gather(*(drive(i) for i in range(objects)))
    await events.wait_drained(settings, timeout=90)
    ours = {c.id.hex for c in counters}
    seen: dict[str, list[tuple[int, int]]] = defaultdict(list)
    ids: set[str] = set()
    for e in await events.read_all(raw_nc, settings, "evt.Counter.*.incremented"):
        if e.object_id in ours:
            seen[e.object_id].append((e.seq, e.json()["value"]))
            ids.add(e.msg_id)
    assert set(seen) == ours
    for object_id, got in seen.items():
        assert got == [(n, n) for n in range(1, per_object + 1)], object_id
    assert len(ids) == objects * per_object


async def test_a_chat_message_over_a_websocket_is_an_event(gw: str, env: Env, settings: Settings,
                                                           raw_nc: NatsClient) -> None:
    from durable.client.chat import ChatClient

    room = _name("room")
    async with ChatClient(gw, room, "u1", "Ada") as ada:
        await ada.next_event("welcome")
        await ada.send("hello events")
        sent = await ada.next_event("message")
    room_id = env.ROOMS.get_by_name(room).id.hex
    [e] = await events.wait_for(raw_nc, settings, f"evt.ChatRoom.{room_id}.>", 1)
    assert (e.name, e.seq) == ("message", 1)
    assert e.json() == sent


async def test_an_alarm_handler_emits_like_any_event(worker: Worker, env: Env, settings: Settings,
                                                     raw_nc: NatsClient) -> None:
    alarmer = env.ALARMERS.get_by_name(_name("alarm"))
    await alarmer.plan({"emit": "fired"})
    await alarmer.arm(0)
    [e] = await events.wait_for(raw_nc, settings, f"evt.Alarmer.{alarmer.id.hex}.>", 1)
    assert (e.name, e.seq, e.json()) == ("fired", 1, {"run": 1})


async def test_an_event_the_server_refuses_holds_up_only_its_own_object(
        worker: Worker, env: Env, settings: Settings, raw_nc: NatsClient) -> None:
    """A poison row (larger than NATS carries: put there by hand, since emit refuses it) stays
    in the outbox, retried and logged; other objects' events are published meanwhile."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "INSERT INTO do_outbox (object_id, seq, partition, subject, msg_id, payload) VALUES ($1, 1, 0, $2, $3, $4)",
            "poison", "evt.Probe.poison.too-big", "poison:x:1", b"x" * (raw_nc.max_payload + 1))
    finally:
        await conn.close()
    counter = env.COUNTERS.get_by_name(_name("beside-poison"))
    for _ in range(3):
        await counter.increment()
    got = await events.wait_for(raw_nc, settings, f"evt.Counter.{counter.id.hex}.>", 3)
    assert [e.seq for e in got] == [1, 2, 3]
    await assert_eventually(lambda: worker.events.failures >= 1, 10, "the poison row tried and failed")
    assert await events.outbox_rows(settings, "poison") == 1


async def test_a_hot_objects_backlog_takes_turns_with_the_others(worker: Worker, env: Env, settings: Settings,
                                                                raw_nc: NatsClient) -> None:
    """A backlog is published a slice per round, at most PER_OBJECT events of one object each,
    and each round goes on after the last object of the one before: the object that sorts first
    does not hold back the next one until its backlog is gone."""
    publisher = worker.events
    await publisher.stop()
    one, two = env.PROBES.get_by_name(_name("hot")), env.PROBES.get_by_name(_name("cold"))
    hot, cold = sorted((one, two), key=lambda stub: stub.id.hex)  # the hot one is read first
    await hot.emit_many([f"e{i}" for i in range(250)])
    await cold.emit("cold")
    publisher.BATCH = publisher.PER_OBJECT  # one round: one object's slice
    assert await publisher.publish_round()
    assert await events.outbox_rows(settings, hot.id.hex) == 150
    assert await publisher.publish_round()  # after the hot object: the cold one's turn
    assert await events.outbox_rows(settings, cold.id.hex) == 0
    assert await events.outbox_rows(settings, hot.id.hex) == 150
    while await publisher.publish_round():
        pass
    got = await events.read_all(raw_nc, settings, f"evt.Probe.{hot.id.hex}.>")
    assert [e.seq for e in got] == list(range(1, 251))
    assert await events.outbox_rows(settings) == 0


async def test_the_migration_leaves_one_do_flush(worker: Worker, settings: Settings) -> None:
    """004 replaced 003's do_flush (a CREATE OR REPLACE with other parameters would have left an
    overload beside it, and a call by name could pick either)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        args = await conn.fetch("SELECT pg_get_function_identity_arguments(oid) AS a FROM pg_proc "
                                "WHERE proname = 'do_flush'")
    finally:
        await conn.close()
    assert len(args) == 1 and "evt_payload bytea[]" in args[0]["a"]
