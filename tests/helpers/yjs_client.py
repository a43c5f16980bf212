"""Real Yjs clients for the collab tests: ``node tests/helpers/yjs/client.mjs`` (yjs + y-websocket's
WebsocketProvider from npm, unmodified) driven over stdin/stdout.

``install()`` runs ``npm ci`` in tests/helpers/yjs once (again only when package-lock.json is
newer than what is installed). A machine without node or npm fails the tests that need them,
clearly: these tests are what shows that unmodified Yjs clients work, so they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
from typing import Any

import pytest

from .settings import ROOT
from .waiting import assert_eventually

YJS_DIR = ROOT / "tests" / "helpers" / "yjs"


def install() -> None:
    """``npm ci`` into tests/helpers/yjs/node_modules unless it is there and current."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("the collab tests run real Yjs clients on Node.js: install node and npm "
                    "(Debian: apt-get install nodejs npm)", pytrace=False)
    marker = YJS_DIR / "node_modules" / ".package-lock.json"
    lock = YJS_DIR / "package-lock.json"
    if marker.is_file() and marker.stat().st_mtime >= lock.stat().st_mtime:
        return
    result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=YJS_DIR,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"npm ci in {YJS_DIR} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                    f"{result.stderr[-2000:]}", pytrace=False)


class YjsClient:
    """One node process: a Y.Doc with a WebsocketProvider on ``<server>/<room>``."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, server: str, room: str, name: str = "client") -> YjsClient:
        """``server`` is what a Yjs app is given, e.g. ``ws://127.0.0.1:8787/collab``."""
        proc = await asyncio.create_subprocess_exec(
            "node", str(YJS_DIR / "client.mjs"), server, room, cwd=YJS_DIR,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            limit=16 * 1024 * 1024)  # a reply carries the whole text
        return cls(proc, name)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                self.events.append({"event": "output", "line": line.decode(errors="replace").rstrip()})
                continue
            waiter = self._waiting.pop(message.get("id", -1), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
            elif "event" in message:
                self.events.append(message)
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(RuntimeError(f"{self.name} exited; its output: {self.events[-5:]}"))

    async def call(self, op: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        """Run one command; returns the client's state after it (text, synced, connected, ...)."""
        assert self.proc.stdin is not None
        ident = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = fut
        self.proc.stdin.write(json.dumps({"id": ident, "op": op, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {op} failed: {reply['error']}")
        return reply

    async def state(self) -> dict[str, Any]:
        return await self.call("state")

    async def text(self) -> str:
        return str((await self.state())["text"])

    async def wait_synced(self, timeout: float = 15.0) -> dict[str, Any]:
        async def synced() -> dict[str, Any] | None:
            state = await self.state()
            return state if state["synced"] and state["connected"] else None

        result: dict[str, Any] = await assert_eventually(synced, timeout, f"{self.name} synced")
        return result

    async def wait_text(self, check: Any, timeout: float = 15.0) -> str:
        """Until the text equals ``check`` (a str) or ``check(text)`` holds; returns the text."""
        async def holds() -> str | None:
            text = await self.text()
            ok = text == check if isinstance(check, str) else check(text)
            return text if ok else None

        result: str = await assert_eventually(holds, timeout, f"{self.name}'s text")
        return result

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("exit", timeout=2)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()

    async def kill(self) -> None:
        """kill -9: the client vanishes without a close frame."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def yjs_clients(server: str, room: str, n: int) -> Any:
    """``n`` synced clients of one room, closed at the end."""
    clients: list[YjsClient] = []
    try:
        for i in range(n):
            clients.append(await YjsClient.start(server, room, f"client{i}"))
        for c in clients:
            await c.wait_synced()
        yield clients
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def server_url(gw: str) -> str:
    """The server URL a Yjs app is given for this gateway: its rooms are /collab/<room>."""
    return f"{gw}/collab"

