"""Operator writes to one object's storage (``durable state put|delete|import``), run as an
ordinary event of the object: under its input gate, through its storage cache, flushed under
its partition's epoch fence, answered only once durable. Nothing an operator does bypasses the
guarantees traffic has.

The user's object is not constructed for it (when it is not live already), so an object whose
constructor fails on its stored state can still be repaired. After the writes are durable the
instance is reset (as ``ctx.abort()`` does): an object that
keeps state in attributes rebuilds it from storage on its next event, instead of carrying on
with what it had before the operator's change. A request queued behind the write at that
moment fails with a retryable reset, as on Cloudflare after ``abort()``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import InvalidRequest, ObjectReset
from .instance import STORAGE_ONLY
from .storage import MAX_BATCH, check_entries, check_keys

#: the verb of an operator's write: ``do.<namespace>.<id>.admin.state``
ADMIN_STATE_VERB = ["admin", "state"]


@dataclass(frozen=True)
class StateWrite:
    """What one ``admin.state`` event does, in this order: wipe, delete keys, put entries, set
    the alarm (epoch milliseconds)."""

    put: dict[str, Any]
    delete: list[str]
    delete_all: bool
    set_alarm: int | None = None


def parse_state_write(payload: Any) -> StateWrite:
    """``{"put": {key: value}, "delete": [key], "delete_all": bool}``, every part optional; every
    key and value is checked before anything is written."""
    if not isinstance(payload, dict):
        raise InvalidRequest(f"an admin.state payload is a map, not {type(payload).__name__}")
    unknown = set(payload) - {"put", "delete", "delete_all", "set_alarm", "name"}
    if unknown:
        raise InvalidRequest(f"unknown admin.state fields: {', '.join(sorted(map(str, unknown)))}")
    put = payload.get("put") or {}
    delete = payload.get("delete") or []
    delete_all = payload.get("delete_all", False)
    if not isinstance(put, dict) or not all(isinstance(k, str) for k in put):
        raise InvalidRequest("'put' is a map of str keys to values")
    if not isinstance(delete, list) or not all(isinstance(k, str) for k in delete):
        raise InvalidRequest("'delete' is a list of str keys")
    if not isinstance(delete_all, bool):
        raise InvalidRequest("'delete_all' is true or false")
    set_alarm = payload.get("set_alarm")
    if set_alarm is not None and (not isinstance(set_alarm, int) or isinstance(set_alarm, bool) or set_alarm < 0):
        raise InvalidRequest("'set_alarm' is a time in epoch milliseconds")
    check_entries(put)
    check_keys(delete)
    return StateWrite(put, delete, delete_all, set_alarm)


def state_write_handler(inst: Any, payload: Any) -> Callable[[Any], Awaitable[dict[str, int]]]:
    """The event: the writes, a wait until they are durable, then the instance's reset."""
    write = parse_state_write(payload)
    if write.set_alarm is not None and getattr(inst.cls, "alarm", None) is None:
        # refused before anything is written, not half-way through
        raise InvalidRequest(f"{inst.cls.__name__} has no alarm() handler: its alarm cannot be set")

    async def run(obj: Any) -> dict[str, int]:
        storage = inst.storage
        if write.delete_all:
            await storage.delete_all()
        deleted = 0
        for start in range(0, len(write.delete), MAX_BATCH):
            deleted += await storage.delete(write.delete[start:start + MAX_BATCH])
        items = list(write.put.items())
        for start in range(0, len(items), MAX_BATCH):
            await storage.put(dict(items[start:start + MAX_BATCH]))
        if write.set_alarm is not None:
            await storage.set_alarm(write.set_alarm)
        await storage.sync()
        inst.fail(ObjectReset("Durable Object was reset after an operator changed its storage (durable state)"))
        return {"put": len(items), "deleted": deleted, "wiped": int(write.delete_all)}

    setattr(run, STORAGE_ONLY, True)  # the user's object is not constructed for it
    return run
