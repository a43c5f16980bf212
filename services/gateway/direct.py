"""Frames written straight to a client's transport, without a task or an ASGI hop per frame.

A broadcast from an object names hundreds of sockets; through ASGI each frame would be a
``websocket.send`` message awaited by a writer task per socket (a wake-up, a queue hop and the
Starlette and uvicorn layers, about 10 µs per delivery), and would be encoded once per socket.
Here a frame is encoded once per broadcast (a server's frames are not masked, so the bytes are
the same for every socket) and written to each socket's transport in the same turn of the
event loop.

This reaches into uvicorn's ``websockets-sansio`` protocol (the one cli.server_config picks):
the ASGI ``send`` it hands the app is a bound method of its protocol object, which holds the
``transport``, the websockets ``conn`` (state, extensions) and the ``writable`` flag it keeps
for flow control. :func:`direct_writer` returns None for anything else (another server or
implementation, a wrapped ``send``), and :meth:`DirectWriter.write` returns False whenever the
plain path must be taken (the handshake not done, a close sent or received, the transport's
buffer over its high-water mark, an extension such as permessage-deflate that changes the bytes):
the gateway then queues the frame for its ASGI writer, in order behind the others.
"""

from __future__ import annotations

from typing import Any

from websockets.frames import Frame, Opcode
from websockets.protocol import State

#: what uvicorn's websockets-sansio protocol object must have for a direct write
_NEEDED = ("transport", "conn", "writable", "handshake_complete", "close_sent", "disconnected")


def encode(data: str | bytes) -> bytes:
    """One unmasked, unfragmented, uncompressed frame: what a server sends on every socket."""
    if isinstance(data, str):
        return Frame(Opcode.TEXT, data.encode()).serialize(mask=False)
    return Frame(Opcode.BINARY, data).serialize(mask=False)


class DirectWriter:
    """Writes frames to one connection's transport when nothing stands in the way."""

    __slots__ = ("_proto",)

    def __init__(self, proto: Any) -> None:
        self._proto = proto

    def write(self, frame: bytes) -> bool:
        """Write an encoded frame now; False if it must go the ASGI way (nothing written)."""
        p = self._proto
        if not p.handshake_complete or p.close_sent or p.disconnected or not p.writable.is_set():
            return False
        conn = p.conn
        if conn.state is not State.OPEN or conn.extensions or conn.expect_continuation_frame:
            return False
        transport = p.transport
        if transport.is_closing():
            return False
        transport.write(frame)
        return True


def direct_writer(send: Any) -> DirectWriter | None:
    """A writer for the connection behind an ASGI ``send``, or None if it is not one we know."""
    proto = getattr(send, "__self__", None)
    if proto is None or not all(hasattr(proto, name) for name in _NEEDED):
        return None
    conn = proto.conn
    if not (hasattr(conn, "state") and hasattr(conn, "extensions") and hasattr(conn, "expect_continuation_frame")):
        return None
    return DirectWriter(proto)


def release_handshake(ws: Any) -> None:
    """Drop what only the opening handshake needed, once the socket is open: the request and
    response (with their headers) uvicorn's protocol keeps, the scope's raw headers (the scope is
    only read for log lines after this) and the headers Starlette parsed from them. About 5 KiB
    per socket, which every idle socket would otherwise hold for its lifetime."""
    proto = getattr(ws._send, "__self__", None)
    if proto is not None and getattr(proto, "handshake_complete", False):
        for name in ("request", "response"):
            if hasattr(proto, name):
                setattr(proto, name, None)
    for name in ("_headers", "_url"):
        ws.__dict__.pop(name, None)
    ws.scope["headers"] = []
