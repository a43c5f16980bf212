"""The input and output gates and the pending writes, on a bare event loop (no servers)."""

from __future__ import annotations

import asyncio

import pytest
from durable.core.errors import ObjectReset
from durable.core.tasks import TaskSet
from durable.objects.alarm_rules import AlarmRow
from durable.objects.input_gate import InputGate
from durable.objects.output_gate import OutputGate
from durable.objects.pending import PendingWrites


async def test_the_output_gate_releases_replies_in_order_once_their_writes_are_durable() -> None:
    gate = OutputGate(TaskSet())
    sent: list[str] = []

    def sender(name: str):  # type: ignore[no-untyped-def]
        async def send(error: BaseException | None) -> None:
            sent.append(name if error is None else f"{name}!")
        return send

    gate.wrote()
    gate.reply_when_durable(gate.write_seq, sender("first"))
    gate.wrote()
    gate.reply_when_durable(gate.write_seq, sender("second"))
    waiter = asyncio.ensure_future(gate.wait_durable(2))
    assert gate.has_unflushed and not gate.is_durable(1)
    ready = gate.flushed(1)
    assert len(ready) == 1 and not waiter.done()
    for send in ready:
        await send(None)
    ready = gate.flushed(2)
    for send in ready:
        await send(None)
    await asyncio.wait_for(waiter, 1)
    assert sent == ["first", "second"] and not gate.has_unflushed


async def test_a_failed_flush_gives_every_waiting_reply_the_error() -> None:
    tasks = TaskSet()
    gate = OutputGate(tasks)
    got: list[BaseException | None] = []

    async def send(error: BaseException | None) -> None:
        got.append(error)

    gate.wrote()
    gate.reply_when_durable(1, send)
    waiter = asyncio.ensure_future(gate.wait_durable(1))
    await asyncio.sleep(0)
    gate.fail(ObjectReset("disk on fire"))
    await tasks.join()
    assert len(got) == 1 and isinstance(got[0], ObjectReset)
    with pytest.raises(ObjectReset):
        await waiter
    with pytest.raises(ObjectReset, match="reset before its writes were durable"):
        gate.wrote()
        await gate.wait_durable(gate.write_seq)


async def test_the_input_gate_admits_one_event_and_opens_only_for_unblocked_calls() -> None:
    gate = InputGate()
    order: list[str] = []

    async def event(name: str, inner: asyncio.Event | None = None) -> None:
        async with gate:
            order.append(f"{name}+")
            if inner is not None:
                me = asyncio.current_task()
                opened = gate.open_for_call(me)
                assert opened
                await inner.wait()  # another event runs while this one "calls out"
                await gate.close_after_call()
            order.append(f"{name}-")

    release = asyncio.Event()
    first = asyncio.ensure_future(event("a", release))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(event("b"))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(first, second)
    assert order == ["a+", "b+", "b-", "a-"]

    async with gate:
        gate.block()
        assert not gate.open_for_call(asyncio.current_task())  # a blocking section keeps it shut
        gate.unblock()
        assert not gate.open_for_call(None)  # not the event's own task: it does not hold the turn
        assert gate.held


async def test_pending_writes_form_one_batch_and_a_wipe_supersedes_earlier_keys() -> None:
    writes = 0

    def on_write() -> None:
        nonlocal writes
        writes += 1

    pending = PendingWrites(on_write)
    pending.put({b"a": b"1"})
    pending.wipe()
    pending.put({b"b": b"2"})
    pending.set_alarm(AlarmRow(1, 1, 1))
    pending.set_socket("s", None)
    batch = pending.take(seq=5)
    assert writes == 5 and batch.seq == 5
    assert batch.delete_all and batch.writes == {b"b": b"2"} and batch.alarm_changed
    assert batch.alarm == AlarmRow(1, 1, 1) and batch.sockets == {"s": None}
    empty = pending.take(seq=6)
    assert not empty.delete_all and not empty.writes and not empty.alarm_changed and not empty.sockets
