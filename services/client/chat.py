"""A Python client for the ChatRoom pattern: async, reconnects with jittered exponential
backoff, and resumes from the last message it saw (``?since=<seq>``), so a dropped connection
loses none of the room's last 100 messages and delivers none twice.

    async with ChatClient("ws://127.0.0.1:8787", "lobby", "u1", "Ada") as chat:
        await chat.send("hello")
        async for event in chat.events():   # dicts: welcome, message, join, leave, typing, error
            ...
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

log = logging.getLogger("durable.chat")


class ChatClient:
    def __init__(self, base_url: str, room: str, user_id: str, name: str, *,
                 backoff_base: float = 0.25, backoff_cap: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.room = room
        self.user_id = user_id
        self.name = name
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        #: the sequence number of the last chat message delivered
        self.last_seq = 0
        self.users: dict[str, dict[str, Any]] = {}
        self.connects = 0
        self._ws: ClientConnection | None = None
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._open = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def url(self) -> str:
        query = urlencode({"user": self.user_id, "name": self.name, "since": self.last_seq})
        return f"{self.base_url}/room/{quote(self.room, safe='')}?{query}"

    async def __aenter__(self) -> ChatClient:
        self.start()
        await self.wait_open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"chat-{self.room}-{self.user_id}")

    async def wait_open(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._open.wait(), timeout)

    async def _run(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                async with connect(self.url(), open_timeout=10) as ws:
                    self._ws = ws
                    self.connects += 1
                    attempt = 0
                    self._open.set()
                    async for raw in ws:
                        self._receive(raw)
            except (OSError, ConnectionClosed, InvalidStatus, TimeoutError) as exc:
                log.info("chat connection lost: %s", exc)
            finally:
                self._ws = None
                self._open.clear()
            if self._closed:
                return
            # full jitter: uniform up to min(cap, base * 2^attempt)
            delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** attempt))
            attempt += 1
            await asyncio.sleep(delay)

    def _receive(self, raw: str | bytes) -> None:
        if raw == "pong":
            return
        try:
            event = json.loads(raw)
        except ValueError:
            return
        kind = event.get("type")
        if kind == "welcome":
            self.users = {u["userId"]: u for u in event.get("users", [])}
            history = event.get("history", [])
            self._events.put_nowait({k: v for k, v in event.items() if k != "history"})
            for message in history:
                self._deliver(message)
            return
        if kind == "message":
            self._deliver(event)
            return
        if kind == "join":
            self.users[event["userId"]] = event
        elif kind == "leave":
            self.users.pop(event.get("userId"), None)
        self._events.put_nowait(event)

    def _deliver(self, message: dict[str, Any]) -> None:
        seq = message.get("seq", 0)
        if seq <= self.last_seq:
            return  # seen before the reconnect
        self.last_seq = seq
        self._events.put_nowait(message)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self._events.get()

    async def next_event(self, kind: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The next event (of ``kind``), skipping others."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self._events.get()
                if kind is None or event.get("type") == kind:
                    return event

    async def _frame(self, value: dict[str, Any]) -> None:
        await self.wait_open()
        assert self._ws is not None
        await self._ws.send(json.dumps(value))

    async def send(self, content: str) -> None:
        await self._frame({"type": "message", "content": content})

    async def typing(self) -> None:
        await self._frame({"type": "typing"})

    async def close(self) -> None:
        """Leave the room and stop reconnecting."""
        self._closed = True
        ws = self._ws
        if ws is not None:
            try:
                await ws.send(json.dumps({"type": "leave"}))
                await ws.close()
            except ConnectionClosed:
                pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
