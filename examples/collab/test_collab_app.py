"""The collab app through real WebSockets, with pycrdt (Yrs) as the Yjs client speaking y-websocket's
protocol: edits reach the other client, a late joiner and a joiner after eviction get the whole
text, a text frame is refused, and the page and its scripts are served."""

from __future__ import annotations

import asyncio

import pytest
from durable.testing import DurableApp
from pycrdt import Doc, Text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SYNC, AWARENESS = 0, 1
STEP1, STEP2, UPDATE = 0, 1, 2


def var_uint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def sync_frame(step: int, payload: bytes) -> bytes:
    return bytes([SYNC, step]) + var_uint(len(payload)) + payload


def read_sync(frame: bytes) -> tuple[int, bytes]:
    """(step, payload) of a sync frame (the payloads here are short: a one-byte length, or more)."""
    assert frame[0] == SYNC, frame[:8]
    length, shift, pos = 0, 0, 2
    while True:
        byte = frame[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    return frame[1], frame[pos:pos + length]


class YClient:
    """A Yjs client made of pycrdt and a WebSocket: it syncs as WebsocketProvider does."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.doc: Doc = Doc()
        self.text = self.doc.get("text", type=Text)

    async def sync(self) -> None:
        """Answer the server's step 1 and send ours; done when its step 2 arrives."""
        await self.ws.send(sync_frame(STEP1, self.doc.get_state()))
        while True:
            step, payload = read_sync(await self._next_sync())
            if step == STEP1:
                await self.ws.send(sync_frame(STEP2, self.doc.get_update(payload)))
            else:
                self.doc.apply_update(payload)
                if step == STEP2:
                    return

    async def _next_sync(self) -> bytes:
        while True:
            frame = await asyncio.wait_for(self.ws.recv(), 10)
            assert isinstance(frame, bytes)
            if frame[0] == SYNC:
                return frame

    async def insert(self, index: int, chunk: str) -> None:
        before = self.doc.get_state()
        self.text.insert(index, chunk)
        await self.ws.send(sync_frame(UPDATE, self.doc.get_update(before)))

    async def receive_until(self, expected: str) -> None:
        while str(self.text) != expected:
            step, payload = read_sync(await self._next_sync())
            self.doc.apply_update(payload)


async def test_two_clients_edit_one_text_and_late_joiners_get_all_of_it(durable_app: DurableApp) -> None:
    async with durable_app.serve() as base:
        url = base.replace("http", "ws", 1) + "/collab/notes"
        async with connect(url) as a, connect(url) as b:
            ada, bob = YClient(a), YClient(b)
            await ada.sync()
            await bob.sync()
            await ada.insert(0, "hello")
            await bob.receive_until("hello")
            await bob.insert(5, " world")
            await ada.receive_until("hello world")
        async with connect(url) as c:
            late = YClient(c)
            await late.sync()
            assert str(late.text) == "hello world"
        assert await durable_app.evict(durable_app.env.DOCS.get_by_name("notes"))
        async with connect(url) as d:  # rebuilt from storage by the next instance
            after = YClient(d)
            await after.sync()
            assert str(after.text) == "hello world"
            assert await durable_app.env.DOCS.get_by_name("notes").text() == "hello world"


async def test_a_text_frame_is_refused_with_4400(durable_app: DurableApp) -> None:
    async with durable_app.serve() as base:
        async with connect(base.replace("http", "ws", 1) + "/collab/refused") as ws:
            await ws.send("not y-websocket")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4400
            assert "binary" in closed.value.rcvd.reason


async def test_the_page_and_its_scripts_are_served(durable_app: DurableApp) -> None:
    page = await durable_app.fetch("/collab/notes")
    assert page.status == 200 and b"/collab/static/collab.js" in page.body
    script = await durable_app.fetch("/collab/static/collab.js")
    assert script.status == 200 and b"WebsocketProvider" in script.body
    bundle = await durable_app.fetch("/collab/static/yjs.bundle.js")
    assert bundle.status == 200 and b"yjs@" in bundle.body[:300]
    assert (await durable_app.fetch("/collab/static/THIRD_PARTY_LICENSES.txt")).status == 200
    for private in ("/collab/static/package.json", "/collab/static/../collab_app.py", "/collab/static/"):
        assert (await durable_app.fetch(private)).status == 404, private
    assert (await durable_app.fetch("/collab")).headers.get("location") == "/collab/scratch"
    assert (await durable_app.env.DOCS.get_by_name("notes").fetch("http://h/collab/notes")).status == 426
