"""The owner's own timers for the alarms of its partitions: the on-time path.

A JetStream message schedule is the alarm's durable wake-up (alarm_stream.py): it survives the
owner, and any worker of the queue group gets it. But nats-server delivers schedules in batches
from a timer it arms at least 250 ms ahead, and under a steady stream of due schedules it falls
seconds behind (bench/bench_alarms.py measures it: p99 2 s for 100,000 over a minute on an
idle machine, far more on a busy one). The owner knows each alarm the moment its row commits,
so it also keeps a timer of its own: one heap and one task, firing each alarm at its time.

Both paths run the same alarm event, and a run is idempotent by the row's generation: whichever
comes second finds the alarm gone (or changed) and does nothing. A timer belongs to the
ownership it was armed under: once its partition has moved on, it fires nothing (the new owner
arms its own on taking the partition, and its sweep arms those coming due).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from typing import Any

from ..core.tasks import TaskSet

#: alarms due further ahead than this are left to their JetStream schedule (and the sweeps)
HORIZON_MS = 3_600_000

#: (due ms, tie-breaker, partition state, object id, namespace, generation)
_Entry = tuple[int, int, Any, str, str, int]


def _now_ms() -> int:
    return int(time.time() * 1000)


class LocalTimers:
    """Alarm timers of one worker: ``arm(...)``; at the due time ``on_due(state, object_id,
    namespace, generation)`` runs (if the partition is still held under that state)."""

    def __init__(self, on_due: Callable[[Any, str, str, int], None],
                 is_current: Callable[[Any], bool]) -> None:
        self._on_due = on_due
        self._is_current = is_current
        self._heap: list[_Entry] = []
        #: object id -> the generation armed for it: an alarm armed twice (commit, then a sweep)
        #: has one timer
        self._armed: dict[str, int] = {}
        self._seq = 0
        self._changed = asyncio.Event()
        self._tasks = TaskSet()
        #: timers that fired (tests, benchmarks)
        self.fired = 0

    def __len__(self) -> int:
        return len(self._heap)

    def start(self) -> None:
        self._tasks.spawn(self._run(), "alarm-timers")

    async def stop(self) -> None:
        await self._tasks.cancel()
        self._heap.clear()
        self._armed.clear()

    def arm(self, state: Any, object_id: str, namespace: str, generation: int, due_ms: int) -> bool:
        """Fire the alarm of ``object_id`` of ``generation`` at ``due_ms``; False when it is too
        far ahead or already armed."""
        if due_ms - _now_ms() > HORIZON_MS or self._armed.get(object_id) == generation:
            return False
        self._armed[object_id] = generation
        self._seq += 1
        entry = (due_ms, self._seq, state, object_id, namespace, generation)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._changed.set()  # earlier than what the timer task sleeps for
        return True

    def armed(self, object_id: str, generation: int) -> bool:
        return self._armed.get(object_id) == generation

    async def _run(self) -> None:
        heap = self._heap
        while True:
            self._changed.clear()
            if not heap:
                await self._changed.wait()
                continue
            delay = (heap[0][0] - _now_ms()) / 1000
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
                    continue  # armed earlier: look again
                except TimeoutError:
                    pass
            now = _now_ms()
            while heap and heap[0][0] <= now:
                _, _, state, object_id, namespace, generation = heapq.heappop(heap)
                if self._armed.get(object_id) == generation:
                    del self._armed[object_id]
                if self._is_current(state):
                    self.fired += 1
                    self._on_due(state, object_id, namespace, generation)
            await asyncio.sleep(0)  # the fires just started get their turn before the next round
