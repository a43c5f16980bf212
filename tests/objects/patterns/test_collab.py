"""The collab pattern with real Yjs clients: yjs + y-websocket's WebsocketProvider on Node.js
(tests/helpers/yjs, installed by ``npm ci`` once per session), through a real gateway and worker,
on real NATS and Postgres. Bad frames come from a plain ``websockets`` client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from durable.client import Env
from durable.client.namespace import Stub
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.errors import ObjectReset
from durable.core.settings import Settings
from durable.core.wire import partition_of
from durable.objects import Worker
from durable.objects.patterns.collab import CollabDocument
from durable.objects.patterns.yprotocol import (
    AwarenessEntry,
    SyncStep,
    awareness_message,
    encode_awareness,
    sync_message,
    var_bytes,
)
from pycrdt import Doc, Text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import yjs_client
from tests.helpers.gateway import gateway
from tests.helpers.waiting import assert_eventually, assert_stays
from tests.helpers.workers import WorkerFactory, WorkerProcess
from tests.helpers.yjs_client import YjsClient, server_url, yjs_clients
from tests.objects.test_edge_cases import PartitionRowLock


@pytest.fixture(scope="session", autouse=True)
def _node_yjs() -> None:
    yjs_client.install()


async def stored_keys(settings: Settings, stub: Stub) -> list[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT key FROM do_storage WHERE object_id = $1 ORDER BY key", stub.id.hex)
    finally:
        await conn.close()
    return [bytes(r["key"]).decode() for r in rows]


async def attachments(settings: Settings, stub: Stub) -> list[Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT attachment FROM do_sockets WHERE object_id = $1", stub.id.hex)
    finally:
        await conn.close()
    return [None if r["attachment"] is None else codec.unpack(bytes(r["attachment"])) for r in rows]


# ----- convergence -----------------------------------------------------------------------------


async def test_two_clients_converge_after_concurrent_edits(gw: str, env: Env) -> None:
    async with yjs_clients(server_url(gw), "concurrent", 2) as (ada, bob):
        await ada.call("append", text="shared ")
        await bob.wait_text("shared ")
        await asyncio.gather(*(ada.call("insert", index=0, text=f"a{i} ") for i in range(20)),
                             *(bob.call("append", text=f"b{i} ") for i in range(20)))
        final = await ada.wait_text(lambda t: all(f"b{i} " in t for i in range(20)))
        assert await bob.wait_text(final) == final
        assert all(f"a{i} " in final for i in range(20)) and "shared " in final
        assert await env.DOCS.get_by_name("concurrent").text() == final


async def test_offline_edits_merge_when_the_client_reconnects(gw: str, env: Env) -> None:
    async with yjs_clients(server_url(gw), "offline", 2) as (ada, bob):
        await ada.call("append", text="base")
        await bob.wait_text("base")
        assert not (await bob.call("disconnect"))["connected"]
        await bob.call("insert", index=0, text="[bob offline]")
        await ada.call("append", text="[ada online]")
        await assert_stays(lambda: _lacks(ada, "[bob offline]"), 0.5, "an offline edit stays local")
        await bob.call("connect")
        await bob.wait_synced()
        merged = await bob.wait_text(lambda t: "[ada online]" in t)
        assert merged == "[bob offline]base[ada online]"
        assert await ada.wait_text(merged) == merged
        assert await env.DOCS.get_by_name("offline").text() == merged


async def _lacks(client: YjsClient, chunk: str) -> bool:
    return chunk not in await client.text()


async def test_a_late_joiner_gets_the_whole_document(gw: str) -> None:
    async with yjs_clients(server_url(gw), "late", 1) as (ada,):
        for i in range(30):
            await ada.call("append", text=f"line {i}\n")
        await ada.call("delete", index=0, length=len("line 0\n"))
        expected = await ada.text()
        async with yjs_clients(server_url(gw), "late", 1) as (late,):
            assert await late.wait_text(expected) == expected


# ----- durability: eviction, kill -9, the output gate -----------------------------------------


async def test_the_document_survives_eviction_with_its_clients_connected(
        start_worker: WorkerFactory, settings: Settings, config: AppConfig, env: Env) -> None:
    worker = await start_worker(idle_timeout=0.3)
    stub = env.DOCS.get_by_name("evicted")
    async with gateway(settings, config) as gw, yjs_clients(server_url(gw), "evicted", 2) as (ada, bob):
        await ada.call("append", text="before eviction. ")
        await bob.wait_text("before eviction. ")
        await assert_eventually(lambda: _live(worker, settings, stub) is None, 10, "the document evicted")
        await bob.call("append", text="after eviction.")  # a new instance, rebuilt from storage
        assert await ada.wait_text("before eviction. after eviction.")
        async with yjs_clients(server_url(gw), "evicted", 1) as (late,):
            assert await late.wait_text("before eviction. after eviction.")
        # awareness after hibernation: the removal's clock comes from the socket's attachment
        await bob.call("awareness", state={"user": {"name": "Bob"}})
        bob_id = (await bob.call("awareness", state={"user": {"name": "Bob", "cursor": 3}}))["clientID"]
        await assert_eventually(lambda: _sees(ada, bob_id, {"name": "Bob", "cursor": 3}), 10, "Ada sees Bob")
        await assert_eventually(lambda: _live(worker, settings, stub) is None, 10, "the document evicted again")
        await bob.kill()
        await assert_eventually(lambda: _unseen(ada, bob_id), 20, "Bob's awareness removed after hibernation")


def _live(worker: Worker, settings: Settings, stub: Stub) -> Any:
    state = worker.parts.get(partition_of(stub.id.hex, settings.partitions))
    return None if state is None else state.instances.get(stub.id.hex)


async def evict(worker: Worker, settings: Settings, stub: Stub) -> bool:
    """Drop the live instance once its writes are durable, as an idle timeout does."""
    inst = _live(worker, settings, stub)
    if inst is None:
        return False
    await inst.storage.sync()
    inst.fail(ObjectReset("evicted by the test"))
    return True


@pytest.mark.fault
async def test_the_document_survives_a_kill9_of_the_owning_worker(
        settings: Settings, config: AppConfig, start_worker: WorkerFactory, env: Env, tmp_path: Path) -> None:
    doomed = WorkerProcess(settings, tmp_path / "doomed.log")
    await doomed.start()
    try:
        async with gateway(settings, config) as gw, yjs_clients(server_url(gw), "failover", 2) as (ada, bob):
            for i in range(10):
                await ada.call("append", text=f"a{i} ")
            await bob.wait_text(await ada.text())
            doomed.kill()  # SIGKILL: nothing is flushed on the way out
            assert doomed.proc is not None and doomed.proc.returncode == -9
            await bob.call("append", text="during failover ")  # waits in the client or the gateway
            await start_worker()  # takes the partitions once the dead worker's lease runs out
            await ada.wait_text(lambda t: t.endswith("during failover "), 30)  # Bob's edit got through
            await ada.call("append", text="after")
            expected = "a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 during failover after"
            for c in (ada, bob):
                await c.wait_synced(30)
                assert await c.wait_text(expected, 30) == expected
            async with yjs_clients(server_url(gw), "failover", 1) as (late,):
                assert await late.wait_text(expected) == expected
            assert await env.DOCS.get_by_name("failover").text() == expected
    finally:
        doomed.close()


async def test_an_update_reaches_the_others_only_once_it_is_durable(gw: str, settings: Settings, env: Env) -> None:
    stub = env.DOCS.get_by_name("gated")
    async with yjs_clients(server_url(gw), "gated", 2) as (ada, bob):
        await ada.call("append", text="one ")
        await bob.wait_text("one ")
        async with PartitionRowLock(settings, partition_of(stub.id.hex, settings.partitions)) as row:
            await ada.call("append", text="two")
            await row.flush_waits()  # its flush is stuck behind our lock on the partition row
            await assert_stays(lambda: _lacks(bob, "two"), 1.0, "an update not yet durable stays unseen")
            await row.release()
            assert await bob.wait_text("one two")
        assert any(k.startswith("u:") for k in await stored_keys(settings, stub))


# ----- compaction ------------------------------------------------------------------------------


async def test_compaction_folds_the_log_into_a_snapshot_and_keeps_the_text(
        gw: str, settings: Settings, env: Env) -> None:
    stub = env.DOCS.get_by_name("compacted")
    every = CollabDocument.COMPACT_EVERY_UPDATES
    async with yjs_clients(server_url(gw), "compacted", 1) as (ada,):
        for i in range(every + 20):
            await ada.call("append", text=f"{i % 10}")
        expected = "".join(f"{i % 10}" for i in range(every + 20))
        await assert_eventually(lambda: _has_text(stub, expected), 15, "every update applied")
        stats = await stub.stats()
        assert stats["snapshot_parts"] == 1 and stats["log_updates"] == 20, stats
        keys = await stored_keys(settings, stub)
        assert [k for k in keys if not k.startswith("u:")] == ["meta", "s:0000"]
        assert len([k for k in keys if k.startswith("u:")]) == 20  # not every + 20: the log shrank
        async with yjs_clients(server_url(gw), "compacted", 1) as (late,):
            assert await late.wait_text(expected) == expected


async def _has_text(stub: Stub, text: str) -> bool:
    return bool(await stub.text() == text)


async def test_a_large_snapshot_is_chunked_across_keys_and_read_back(
        start_worker: WorkerFactory, settings: Settings, config: AppConfig, env: Env) -> None:
    """Three 100 KB inserts pass the log's byte threshold: the snapshot (about 300 KB) is over a
    storage value's 128 KiB, so it is cut into parts; an evicted document reads them back."""
    worker = await start_worker(idle_timeout=0.3)
    stub = env.DOCS.get_by_name("chunked")
    chunks = ["x" * 100_000, "y" * 100_000, "z" * 100_000]
    async with gateway(settings, config) as gw:
        async with yjs_clients(server_url(gw), "chunked", 1) as (ada,):
            for chunk in chunks:
                await ada.call("append", text=chunk)
            await assert_eventually(lambda: _has_text(stub, "".join(chunks)), 15, "every chunk applied")
        stats = await stub.stats()  # the third chunk passed COMPACT_EVERY_BYTES: no log left
        assert stats["snapshot_parts"] == 3 and stats["snapshot_bytes"] > 300_000, stats
        assert stats["log_updates"] == 0, stats
        assert [k for k in await stored_keys(settings, stub)] == ["meta", "s:0000", "s:0001", "s:0002"]
        await assert_eventually(lambda: _live(worker, settings, stub) is None, 10, "the document evicted")
        async with yjs_clients(server_url(gw), "chunked", 1) as (late,):
            assert await late.wait_text("".join(chunks)) == "".join(chunks)


# ----- awareness -------------------------------------------------------------------------------


async def test_awareness_is_relayed_never_stored_and_removed_when_a_client_vanishes(
        gw: str, settings: Settings, env: Env) -> None:
    stub = env.DOCS.get_by_name("aware")
    async with yjs_clients(server_url(gw), "aware", 2) as (ada, bob):
        bob_id = (await bob.call("awareness", state={"user": {"name": "Bob"}}))["clientID"]

        async def ada_sees(present: bool) -> bool:
            states = (await ada.state())["awareness"]
            return (states.get(str(bob_id)) == {"user": {"name": "Bob"}}) is present

        await assert_eventually(lambda: ada_sees(True), 10, "Ada sees Bob's awareness")
        async with yjs_clients(server_url(gw), "aware", 1) as (late,):  # held in memory for joiners
            await assert_eventually(lambda: _sees(late, bob_id), 10, "a joiner sees Bob")
        # the socket's attachment keeps Bob's client id and clock, not his state
        announced = [[cid for cid, _ in a["clients"]] for a in await attachments(settings, stub) if a]
        assert [bob_id] in announced, announced
        assert not [k for k in await stored_keys(settings, stub) if not k.startswith(("u:", "s:", "meta"))]
        await bob.kill()  # no close frame: the gateway finds out, the document tells the others
        await assert_eventually(lambda: ada_sees(False), 20, "Bob's awareness removed")


async def _sees(client: YjsClient, client_id: int, user: Any = None) -> bool:
    states = (await client.state())["awareness"]
    return str(client_id) in states and (user is None or states[str(client_id)].get("user") == user)


async def _unseen(client: YjsClient, client_id: int) -> bool:
    return not await _sees(client, client_id)


# ----- bad input -------------------------------------------------------------------------------


async def _open(gw: str, doc: str) -> ClientConnection:
    ws = await connect(f"{gw}/collab/{doc}", max_size=None)
    first = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(first, bytes) and first[:2] == b"\x00\x00"  # the document's sync step 1
    return ws


async def _closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def _update(text: str, client_id: int = 4242) -> bytes:
    doc: Doc[Any] = Doc(client_id=client_id)
    doc.get("text", type=Text).insert(0, text)
    return doc.get_update()


BAD_FRAMES: list[tuple[str, Any, int, str]] = [
    ("a text frame", "hello", 4400, "binary"),
    ("a truncated varint", b"\x80", 4400, "truncated"),
    ("an unknown message type", b"\x07", 4400, "unknown message type"),
    ("an unknown sync step", b"\x00\x09\x00", 4400, "unknown sync step"),
    ("a payload shorter than its length", b"\x00\x02\x05ab", 4400, "truncated"),
    ("bytes after the message", sync_message(SyncStep.UPDATE, _update("x")) + b"!", 4400, "after the end"),
    ("an update Yrs cannot decode", sync_message(SyncStep.UPDATE, b"\x01\xff\xff\xff\x07"), 4400, "refused"),
    ("a state vector Yrs cannot decode", sync_message(SyncStep.STEP1, b"\xff\xff"), 4400, "state vector"),
    ("awareness that is not JSON", awareness_message(encode_awareness([AwarenessEntry(7, 1, "{nope")])),
     4400, "not JSON"),
    ("a truncated awareness update", awareness_message(b"\x02\x07\x01"), 4400, "truncated"),
    ("too many awareness clients", awareness_message(encode_awareness(
        [AwarenessEntry(i, 1, "{}") for i in range(CollabDocument.MAX_CLIENTS_PER_SOCKET + 1)])),
     4400, "at most"),
    ("an update over the limit", sync_message(SyncStep.UPDATE, _update("u" * (CollabDocument.MAX_UPDATE_BYTES + 1))),
     4413, "over the limit"),
    ("a varint over 2**53", b"\x00\x02" + b"\xff" * 8 + b"\x01", 4400, "varUint"),
]


async def test_every_kind_of_bad_frame_is_refused_and_changes_nothing(
        worker: Worker, gw: str, settings: Settings, env: Env) -> None:
    stub = env.DOCS.get_by_name("bad-input")
    async with yjs_clients(server_url(gw), "bad-input", 1) as (ada,):
        await ada.call("append", text="intact")
        keys = await stored_keys(settings, stub)
        for what, frame, code, reason in BAD_FRAMES:
            ws = await _open(gw, "bad-input")
            await ws.send(frame)
            got = await _closed_with(ws)
            assert got[0] == code and reason in got[1], (what, got)
            assert await stub.text() == "intact", what
            assert await stored_keys(settings, stub) == keys, what
        assert (await stub.stats())["sockets"] == 1  # only Ada's: every refused socket is gone
        assert await evict(worker, settings, stub)
        assert await stub.text() == "intact"  # what storage holds, read by a new instance
        # the worker and the document carry on: Ada's socket was never touched
        assert (await ada.call("append", text=" and well"))["connected"]
        async with yjs_clients(server_url(gw), "bad-input", 1) as (late,):
            assert await late.wait_text("intact and well")


async def test_a_document_over_its_size_limit_refuses_the_update_that_would_pass_it(
        worker: Worker, gw: str, settings: Settings, env: Env) -> None:
    stub = env.DOCS.get_by_name("too-big")
    piece = 200_000
    fits = CollabDocument.MAX_DOC_BYTES // piece  # 3 pieces of 200 KB fit in 768 KiB, a 4th does not
    ws = await _open(gw, "too-big")
    try:
        for i in range(fits):
            await ws.send(sync_message(SyncStep.UPDATE, _update(chr(ord("a") + i) * piece, client_id=100 + i)))
        await assert_eventually(lambda: _text_length(stub, fits * piece), 15, "the pieces that fit stored")
        await ws.send(sync_message(SyncStep.UPDATE, _update("z" * piece, client_id=999)))
        code, reason = await _closed_with(ws)
        assert code == 4413 and "limit" in reason
        assert len(await stub.text()) == fits * piece
        # measuring the document exactly may have compacted the log first: same content, rebuilt
        assert await evict(worker, settings, stub)
        assert await stub.text() == "".join(chr(ord("a") + i) * piece for i in range(fits))
    finally:
        await ws.close()
    async with yjs_clients(server_url(gw), "too-big", 1) as (late,):
        assert len(await late.wait_text(lambda t: len(t) == fits * piece)) == fits * piece


async def _text_length(stub: Stub, n: int) -> bool:
    return len(await stub.text()) == n


async def test_a_query_awareness_frame_gets_the_states_and_an_auth_frame_is_ignored(gw: str) -> None:
    ws = await _open(gw, "queried")
    try:
        await ws.send(awareness_message(encode_awareness([AwarenessEntry(77, 3, json.dumps({"n": 1}))])))
        echoed = await asyncio.wait_for(ws.recv(), 10)  # awareness comes back to its sender too
        assert isinstance(echoed, bytes) and echoed[0] == 1
        await ws.send(b"\x02\x00" + var_bytes(b"whatever"))  # auth: ignored
        await ws.send(b"\x03")
        answer = await asyncio.wait_for(ws.recv(), 10)
        assert answer == awareness_message(encode_awareness([AwarenessEntry(77, 3, json.dumps({"n": 1}))]))
    finally:
        await ws.close()


async def test_an_update_built_on_edits_the_server_lacks_is_dropped_and_the_client_asked_to_sync(
        worker: Worker, gw: str, env: Env) -> None:
    """Yrs keeps such an update aside in memory (pending), neither applied nor stored: the
    document drops it and answers with its sync step 1, so the client sends what is missing."""
    stub = env.DOCS.get_by_name("pending")
    author: Doc[Any] = Doc(client_id=77)
    text = author.get("text", type=Text)
    text.insert(0, "hello")
    first = author.get_update()
    state = author.get_state()
    text.insert(5, " world")
    second = author.get_update(state)  # builds on `first`
    ws = await _open(gw, "pending")
    try:
        await ws.send(sync_message(SyncStep.UPDATE, second))
        reply = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(reply, bytes) and reply[:2] == b"\x00\x00"  # step 1: "send me what I lack"
        assert await stub.text() == ""
        await ws.send(sync_message(SyncStep.UPDATE, first))
        await assert_eventually(lambda: _text_is(stub, "hello"), 10, "the first edit applied")
        await assert_stays(lambda: _text_is(stub, "hello"), 0.5, "the dropped edit stays dropped")
        await ws.send(sync_message(SyncStep.UPDATE, second))  # now it applies
        await assert_eventually(lambda: _text_is(stub, "hello world"), 10, "the second edit applied")
    finally:
        await ws.close()


async def _text_is(stub: Stub, expected: str) -> bool:
    return await stub.text() == expected
