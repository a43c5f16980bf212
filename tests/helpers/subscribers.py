"""Objects that receive stream messages (tests/objects/test_subscriptions.py, tests/faults/)."""

from __future__ import annotations

import asyncio
from typing import Any

from durable import DurableObject, Message


class Tally(DurableObject):
    """Counts the messages it applied and keeps their stream sequences in order.

    A body ``{"poison": true}`` raises until ``heal()`` was called; ``{"slow": s}`` sleeps ``s``
    seconds after its writes (a worker can be killed mid-handler); ``{"fail_times": n}`` raises on
    its first ``n`` attempts (then succeeds: retries with backoff)."""

    async def on_message(self, msg: Message) -> None:
        body: dict[str, Any] = msg.json()
        storage = self.ctx.storage
        count = (await storage.get("count")) or 0
        seqs = (await storage.get("seqs")) or []
        await storage.put({"count": count + 1, "seqs": [*seqs, msg.sequence], "last_subject": msg.subject})
        if body.get("poison") and not await storage.get("healed"):
            raise ValueError(f"poison pill at sequence {msg.sequence}")
        if msg.delivery_count <= body.get("fail_times", 0):
            raise RuntimeError(f"attempt {msg.delivery_count} fails")
        if body.get("slow"):
            await asyncio.sleep(body["slow"])

    async def heal(self) -> None:
        await self.ctx.storage.put("healed", True)

    async def state(self) -> dict[str, Any]:
        got = await self.ctx.storage.get(["count", "seqs", "last_subject"])
        return {"count": got.get("count", 0), "seqs": got.get("seqs", []), "last_subject": got.get("last_subject")}
