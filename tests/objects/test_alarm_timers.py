"""The owner's alarm timers, without servers: on time, in order, once, and only for a partition
still held under the state they were armed with."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from durable.objects.alarm_timers import HORIZON_MS, LocalTimers

from tests.helpers.waiting import assert_eventually


class _State:
    def __init__(self) -> None:
        self.current = True


async def test_timers_fire_at_their_time_in_order_once_and_not_for_a_lost_partition() -> None:
    fired: list[tuple[str, int, float]] = []

    def due(state: Any, object_id: str, namespace: str, generation: int) -> None:
        fired.append((object_id, generation, time.time() * 1000))

    timers = LocalTimers(due, lambda state: state.current)
    timers.start()
    held, lost = _State(), _State()
    now = int(time.time() * 1000)
    try:
        assert timers.arm(held, "b", "N", 2, now + 300)
        assert timers.arm(held, "a", "N", 1, now + 150)
        assert not timers.arm(held, "a", "N", 1, now + 150)  # armed already: one timer
        assert timers.arm(lost, "c", "N", 3, now + 100)
        assert timers.arm(held, "late", "N", 4, now - 50)  # overdue: fires at once
        assert not timers.arm(held, "far", "N", 5, now + HORIZON_MS + 60_000)  # left to its schedule
        lost.current = False
        await assert_eventually(lambda: len(fired) == 3, 5, "three timers")
        assert [(o, g) for o, g, _ in fired] == [("late", 4), ("a", 1), ("b", 2)]
        for (_, _, at), due_ms in zip(fired[1:], (now + 150, now + 300), strict=True):
            assert at >= due_ms, "a timer fired before its time"
        assert not timers.armed("a", 1) and len(timers) == 0
        assert timers.arm(held, "a", "N", 1, now + 10)  # fired: the same alarm may be armed again
    finally:
        await timers.stop()
    await asyncio.sleep(0.05)
    assert len(fired) == 3  # stopped: nothing fires after
