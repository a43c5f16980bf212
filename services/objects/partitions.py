"""The partitions this worker owns, the live objects in them, and eviction of idle ones.

An object lives in the partition its id hashes to; a worker holds a partition under an epoch
(ownership.py), and the instances in it are valid for that epoch only. This module is also the
runtime every instance is given (instance.Runtime): its storage reads, its gateways, the
flusher and the lease, without a reference to the whole worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.subscription import Subscription

from ..core.errors import InvalidId, InvalidRequest, ObjectReset, UnknownNamespace
from ..core.ids import IdFactory, ObjectId
from ..core.tasks import TaskSet
from ..core.wire import NAME_HEADER, partition_of
from .flusher import Flusher
from .gateway_link import GatewayLink
from .history import History
from .instance import Instance
from .sql import ObjectStore

log = logging.getLogger("durable.worker")


@dataclass(eq=False)
class PartitionState:
    """One owned partition: its epoch, its request subscription and its live objects."""

    partition: int
    epoch: int
    sub: Subscription | None = None
    instances: dict[str, Instance] = field(default_factory=dict)
    #: being handed over or released: new requests are refused with NotOwner (callers retry)
    closing: bool = False
    #: requests and alarm runs received and not yet through run_event (a hand-over waits for them)
    _pending: int = 0
    #: objects whose overdue alarm a sweep already started
    _sweeping: set[str] = field(default_factory=set)

    def begin(self) -> None:
        """A request or alarm run arrived for this partition."""
        self._pending += 1

    def end(self) -> None:
        self._pending -= 1

    @property
    def pending(self) -> int:
        return self._pending

    def claim_overdue(self, object_id: str) -> bool:
        """Whether a sweep may start ``object_id``'s overdue alarm (no sweep has it already)."""
        if object_id in self._sweeping:
            return False
        self._sweeping.add(object_id)
        return True

    def release_overdue(self, object_id: str) -> None:
        self._sweeping.discard(object_id)

    def busy(self) -> bool:
        return self._pending > 0 or any(i.inflight or (i.has_unflushed and i.broken is None)
                                        for i in self.instances.values())


class Partitions:
    """The owned partitions and their instances; the runtime the instances run on."""

    def __init__(self, partitions: int, classes: dict[str, type], ids: dict[str, IdFactory], env: Any,
                 store: ObjectStore, gateways: GatewayLink, flusher: Flusher,
                 owns: Callable[[int, int], bool],
                 on_named: Callable[[str, str, str], None] | None = None) -> None:
        self.partitions = partitions
        #: told (namespace, object id, name) when an instance's name is known (names.py)
        self._on_named = on_named
        self.classes = classes
        self.ids = ids
        self.env = env
        self.store = store
        self.gateways = gateways
        self.flusher = flusher
        self._owns = owns
        self.tasks = TaskSet()
        #: the largest payload ctx.emit accepts (the worker sets it from settings and NATS)
        self.event_max_bytes = 1024 * 1024
        #: the change history (history.py): the worker sets it when DURABLE_HISTORY is on
        self.history: History | None = None
        self.states: dict[int, PartitionState] = {}
        self._evictor: asyncio.Task[None] | None = None
        #: instances evicted for idleness since start (metrics)
        self.evicted = 0

    # ----- the runtime of instances (instance.Runtime) ---------------------------------------

    def owns(self, partition: int, epoch: int) -> bool:
        return self._owns(partition, epoch)

    def mark_dirty(self, inst: Instance) -> None:
        self.flusher.mark_dirty(inst)

    async def settled(self, object_id: str) -> None:
        await self.flusher.settled(object_id)

    def drop(self, inst: Instance) -> None:
        state = self.states.get(inst.partition)
        if state is not None and state.instances.get(inst.object_id) is inst:
            del state.instances[inst.object_id]

    # ----- partitions ------------------------------------------------------------------------

    def get(self, partition: int) -> PartitionState | None:
        return self.states.get(partition)

    def serving(self, partition: int) -> PartitionState | None:
        """The partition's state if this worker serves it now (owned, not being handed over)."""
        state = self.states.get(partition)
        return state if state is not None and not state.closing else None

    def is_current(self, state: PartitionState) -> bool:
        """``state`` is still this worker's ownership of its partition, and not closing."""
        return not state.closing and self.states.get(state.partition) is state

    def open(self, partition: int, epoch: int) -> PartitionState:
        state = PartitionState(partition, epoch)
        self.states[partition] = state
        return state

    def close(self, partition: int, error: BaseException, state: PartitionState | None = None) -> PartitionState | None:
        """Forget the partition (only ``state`` if given) and reset its instances with ``error``."""
        current = self.states.get(partition)
        if current is None or (state is not None and current is not state):
            return None
        del self.states[partition]
        for inst in list(current.instances.values()):
            inst.fail(error)
        return current

    def live_objects(self) -> int:
        return sum(len(s.instances) for s in self.states.values())

    def live_by_namespace(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for state in self.states.values():
            for inst in state.instances.values():
                counts[inst.namespace] = counts.get(inst.namespace, 0) + 1
        return counts

    # ----- instances -------------------------------------------------------------------------

    def instance(self, state: PartitionState, namespace: str, oid: str, name: str | None = None) -> Instance:
        """The live instance of object ``oid`` of ``namespace`` in ``state``'s partition, made if
        needed; ``name`` is the name the caller claims it was made from (checked)."""
        inst = state.instances.get(oid)
        if inst is not None and inst.namespace == namespace:
            # a live object: still check a claimed name (cheap when it is the name it was made from)
            if name is not None and name != inst.ctx.id.name:
                if not self.ids[namespace].name_matches(oid, name):
                    raise InvalidRequest(f"{NAME_HEADER} {name!r} is not the name of object {oid}")
                inst.ctx.id.name = name  # woken by a nameless request first; now we know it
                if self._on_named is not None:
                    self._on_named(namespace, oid, name)
            return inst
        if partition_of(oid, self.partitions) != state.partition:
            # a raw publisher picked the wrong partition: serving it here could give the object
            # a second live instance next to the one in its real partition
            raise InvalidRequest(f"object {oid[:80]!r} does not belong to partition {state.partition}")
        cls = self.classes.get(namespace)
        ids = self.ids.get(namespace)
        if cls is None or ids is None:
            raise UnknownNamespace(f"no Durable Object class {namespace!r} is bound here "
                                   f"(known: {sorted(self.classes)})")
        object_id = ids.from_string(oid)
        if inst is not None:  # instances are keyed by id: never hand one object's instance to another class
            raise InvalidId(f"Durable Object ID {oid} is live in namespace {inst.namespace!r}, "
                            f"not {namespace!r}")
        if name is not None:
            if not ids.name_matches(oid, name):
                raise InvalidRequest(f"{NAME_HEADER} {name!r} is not the name of object {oid}")
            object_id = ObjectId(oid, name)
            if self._on_named is not None:
                self._on_named(namespace, oid, name)
        inst = Instance(self, state.partition, state.epoch, namespace, cls, object_id)
        state.instances[oid] = inst
        return inst

    # ----- eviction --------------------------------------------------------------------------

    def evict_idle(self, idle_timeout: float, now: float | None = None) -> int:
        """Reset every instance idle for ``idle_timeout`` seconds; returns how many."""
        now = time.monotonic() if now is None else now
        evicted = 0
        for state in list(self.states.values()):
            for inst in list(state.instances.values()):
                if inst.idle and now - inst.last_active >= idle_timeout:
                    # fail, not just forget: a task the object left running must not
                    # write next to the instance that replaces it
                    inst.fail(ObjectReset("Durable Object was evicted after being idle; "
                                          "this instance can no longer be used"))
                    evicted += 1
        self.evicted += evicted
        return evicted

    def start_eviction(self, idle_timeout: float) -> None:
        async def evict_loop() -> None:
            period = max(0.05, min(idle_timeout / 2, 5.0))
            while True:
                await asyncio.sleep(period)
                self.evict_idle(idle_timeout)

        self._evictor = asyncio.get_running_loop().create_task(evict_loop(), name="evictor")

    async def stop_eviction(self) -> None:
        if self._evictor is not None:
            self._evictor.cancel()
            await asyncio.gather(self._evictor, return_exceptions=True)
            self._evictor = None
