"""The object of the history tests (tests/objects/test_history.py): raw storage operations, the
bookmark API, and what its constructor saw (a restore must happen before the constructor reads)."""

from __future__ import annotations

import asyncio
from typing import Any

from durable.objects import AlarmInfo, DurableObject


class Journal(DurableObject):
    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        self.seen: dict[str, Any] = {}
        ctx.block_concurrency_while(self._load)

    async def _load(self) -> None:
        self.seen = await self.ctx.storage.list()

    async def put(self, entries: dict[str, Any]) -> None:
        await self.ctx.storage.put(entries)

    async def put_slowly(self, entries: dict[str, Any], pause: float) -> None:
        """Half the entries, a pause (the input gate stays closed: no other event runs), the rest."""
        items = list(entries.items())
        await self.ctx.storage.put(dict(items[: len(items) // 2]))
        await asyncio.sleep(pause)
        await self.ctx.storage.put(dict(items[len(items) // 2:]))

    async def delete(self, keys: list[str]) -> int:
        return int(await self.ctx.storage.delete(keys))

    async def delete_all(self) -> None:
        await self.ctx.storage.delete_all()

    async def dump(self) -> dict[str, Any]:
        return await self.ctx.storage.list()

    async def seen_at_start(self) -> dict[str, Any]:
        return self.seen

    async def bookmark_for(self, when: Any) -> str:
        return await self.ctx.storage.get_bookmark_for_time(when)

    async def current_bookmark(self) -> str:
        return await self.ctx.storage.get_current_bookmark()

    async def request_restore(self, bookmark: str) -> str:
        """Ask for the restore and return the undo bookmark, without restarting."""
        return await self.ctx.storage.on_next_session_restore_bookmark(bookmark)

    async def restore(self, bookmark: str) -> None:
        """Cloudflare's shape: ask for the restore, then abort (the caller gets the reset)."""
        await self.ctx.storage.on_next_session_restore_bookmark(bookmark)
        self.ctx.abort("restoring")

    async def abort(self) -> None:
        self.ctx.abort("reset by the test")

    async def arm(self, at_ms: int) -> None:
        await self.ctx.storage.set_alarm(at_ms)

    async def alarm_at(self) -> int | None:
        return await self.ctx.storage.get_alarm()

    async def alarm(self, info: AlarmInfo) -> None:
        await self.ctx.storage.put("alarm-ran", True)
