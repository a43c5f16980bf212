"""The operator's restores (``durable state restore``), run as ordinary events of the object, as
admin.py's writes are: under the object's input gate, fenced by its partition's epoch, answered
once durable, and the instance reset afterwards so the object rebuilds from the restored state.

- ``admin.restore`` on the object: its writes so far are made durable, then its storage is put
  back as it was at the time given (one fenced transaction, recorded in the history itself, so
  the reply's ``undo`` bookmark undoes it).
- ``admin.fork`` on a *new* object: the source's storage at that time is copied into it (one
  fenced transaction on the new object's partition). The source is only read, from committed
  history, so it is left untouched and need not be live.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..core.errors import InvalidRequest, ObjectReset
from .history import Bookmark, to_ms
from .instance import STORAGE_ONLY

ADMIN_RESTORE_VERB = ["admin", "restore"]
ADMIN_FORK_VERB = ["admin", "fork"]

_HEX = frozenset("0123456789abcdef")


def _at(payload: Any, fields: set[str]) -> int:
    if not isinstance(payload, dict):
        raise InvalidRequest(f"an admin payload is a map, not {type(payload).__name__}")
    unknown = set(payload) - fields - {"at_ms", "name"}
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(map(str, unknown)))}")
    if "at_ms" not in payload:
        raise InvalidRequest("'at_ms' (the time to restore to, epoch milliseconds) is required")
    return to_ms(payload["at_ms"])


def restore_handler(inst: Any, payload: Any) -> Callable[[Any], Awaitable[dict[str, Any]]]:
    """``{"at_ms": int}``: restore the object's storage to that time."""
    at_ms = _at(payload, set())
    history = inst.runtime.history
    if history is None:
        raise InvalidRequest("history is off in this deployment (DURABLE_HISTORY=false): nothing to restore from")

    async def run(obj: Any) -> dict[str, Any]:
        if not await history.known(inst.object_id):
            raise InvalidRequest("this object has no storage and no history: nothing to restore "
                                 "(is the name right?)")
        target = await history.for_time(inst.object_id, at_ms)  # refuses a time outside the window
        await inst.storage.sync()  # the object's own writes first: they are part of what is undone
        undo = await history.current()
        changed = await history.restore(inst.object_id, inst.namespace, inst.partition, inst.epoch, target.pos)
        inst.fail(ObjectReset("Durable Object was reset after an operator restored its storage "
                              "(durable state restore)"))
        return {"restored_to": str(target), "undo": str(undo), "changed": changed}

    setattr(run, STORAGE_ONLY, True)
    return run


def fork_handler(inst: Any, payload: Any) -> Callable[[Any], Awaitable[dict[str, Any]]]:
    """``{"source": <64-hex id of the same namespace>, "at_ms": int}``: copy the source's
    storage at that time into this object, which must have none."""
    at_ms = _at(payload, {"source"})
    source = payload.get("source")
    if not isinstance(source, str) or len(source) != 64 or not set(source) <= _HEX:
        raise InvalidRequest("'source' is the 64-hex id of the object to fork")
    if source == inst.object_id:
        raise InvalidRequest("an object cannot be forked into itself: name a new object")
    history = inst.runtime.history
    if history is None:
        raise InvalidRequest("history is off in this deployment (DURABLE_HISTORY=false): nothing to fork from")

    async def run(obj: Any) -> dict[str, Any]:
        if not await history.known(source):
            raise InvalidRequest("the source object has no storage and no history (is the name right?)")
        target = await history.for_time(source, at_ms)
        await inst.storage.sync()
        copied = await history.fork(source, target.pos, inst.object_id, inst.namespace, inst.partition, inst.epoch)
        inst.fail(ObjectReset("Durable Object was reset after an operator forked another object into it"))
        return {"forked_from": source, "at": str(Bookmark(target.pos, target.ms)), "copied": copied}

    setattr(run, STORAGE_ONLY, True)
    return run
