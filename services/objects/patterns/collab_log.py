"""How a collaborative document is kept in its object's storage: a snapshot plus a log of updates.

Every accepted update is appended under its own keys, so storing it costs one small write, not a
rewrite of the document. From time to time the document compacts: its whole state, encoded as
one update, replaces the snapshot and the log in one transaction, so a restart (eviction,
failover) reads a handful of keys and applies a few updates, not thousands.

A storage value is at most 128 KiB, so a snapshot or an update larger than ``chunk_bytes`` is
cut into parts under consecutive keys and written in the same put:

- ``meta``: ``{"next": <next update seq>, "snapshot_parts": n, "snapshot_bytes": b}``
- ``s:<part:04d>``: the snapshot's parts, in order
- ``u:<seq:016d>:<part:03d>``: each logged update's parts (a seq's parts are written together)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..storage import MAX_BATCH

#: a part leaves room under the 128 KiB value limit for msgpack's framing
DEFAULT_CHUNK_BYTES = 120 * 1024


def _update_key(seq: int, part: int) -> str:
    return f"u:{seq:016d}:{part:03d}"


def _snapshot_key(part: int) -> str:
    return f"s:{part:04d}"


def _batches(keys: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(keys), MAX_BATCH):
        yield keys[i:i + MAX_BATCH]


class DocumentLog:
    """The snapshot and update log of one document, over ``ctx.storage``; it also knows their
    sizes, so the document can decide when to compact without reading anything."""

    def __init__(self, storage: Any, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.storage = storage
        self.chunk_bytes = chunk_bytes
        self.next_seq = 1
        self.snapshot_parts = 0
        self.snapshot_bytes = 0
        #: logged update seq -> (number of parts, bytes)
        self.entries: dict[int, tuple[int, int]] = {}

    @property
    def log_count(self) -> int:
        return len(self.entries)

    @property
    def log_bytes(self) -> int:
        return sum(size for _, size in self.entries.values())

    @property
    def stored_bytes(self) -> int:
        """Snapshot plus log: at least the size of the document's state encoded as one update."""
        return self.snapshot_bytes + self.log_bytes

    def _parts(self, data: bytes) -> list[bytes]:
        return [data[i:i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)] or [b""]

    async def load(self) -> list[bytes]:
        """The snapshot (if any) then every logged update, in order: apply them to a new Doc."""
        meta = await self.storage.get("meta") or {}
        self.next_seq = int(meta.get("next", 1))
        self.snapshot_parts = int(meta.get("snapshot_parts", 0))
        self.snapshot_bytes = int(meta.get("snapshot_bytes", 0))
        updates: list[bytes] = []
        if self.snapshot_parts:
            parts = await self.storage.list(prefix="s:")
            snapshot = b"".join(bytes(parts[_snapshot_key(i)]) for i in range(self.snapshot_parts))
            if len(snapshot) != self.snapshot_bytes:
                raise ValueError(f"the stored snapshot has {len(snapshot)} bytes, its meta says "
                                 f"{self.snapshot_bytes}")
            updates.append(snapshot)
        by_seq: dict[int, list[bytes]] = {}
        for key, value in (await self.storage.list(prefix="u:")).items():
            by_seq.setdefault(int(key.split(":")[1]), []).append(bytes(value))  # key order is part order
        self.entries = {}
        for seq in sorted(by_seq):
            update = b"".join(by_seq[seq])
            self.entries[seq] = (len(by_seq[seq]), len(update))
            updates.append(update)
            self.next_seq = max(self.next_seq, seq + 1)
        return updates

    async def append(self, update: bytes) -> None:
        """Log one update (its parts in one put: atomic, and durable before anything said after it)."""
        seq = self.next_seq
        parts = self._parts(update)
        await self.storage.put({_update_key(seq, i): part for i, part in enumerate(parts)})
        self.next_seq = seq + 1
        self.entries[seq] = (len(parts), len(update))

    async def compact(self, snapshot: bytes) -> None:
        """Replace snapshot and log by ``snapshot`` (the whole state as one update), atomically."""
        parts = self._parts(snapshot)
        old_updates = [_update_key(seq, i) for seq, (n, _) in self.entries.items() for i in range(n)]
        stale = [_snapshot_key(i) for i in range(len(parts), self.snapshot_parts)]
        writes: dict[str, Any] = {_snapshot_key(i): part for i, part in enumerate(parts)}
        writes["meta"] = {"next": self.next_seq, "snapshot_parts": len(parts), "snapshot_bytes": len(snapshot)}
        async with self.storage.transaction() as txn:
            for batch in _batches(old_updates + stale):
                await txn.delete(batch)
            for batch in _batches(list(writes)):
                await txn.put({k: writes[k] for k in batch})
        self.entries = {}
        self.snapshot_parts = len(parts)
        self.snapshot_bytes = len(snapshot)
