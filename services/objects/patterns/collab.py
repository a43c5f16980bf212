"""CollabDocument: a Yjs document that unmodified Yjs clients edit together over y-websocket.

A client (``yjs`` + ``y-websocket``'s ``WebsocketProvider``, and any editor binding on them)
given ``ws://<host>/collab`` as its server URL and ``<doc>`` as its room name connects to
``/collab/<doc>``; the routing code hands that upgrade to the object named ``<doc>``. The wire
protocol is y-protocols' (see yprotocol.py): on connect the document sends sync step 1 (its state
vector) and answers the client's step 1 with step 2 (what the client lacks); afterwards each
update is applied, stored, and relayed to the other sockets.

The document state is a real CRDT: a pycrdt ``Doc`` (Yrs, the Rust port of Yjs). That Doc is a
cache: the truth is the snapshot plus the update log in storage (collab_log.py), which the
instance reads when it starts, so eviction and failover lose nothing. What is stored is the
*effective* update of each change (what the Doc's transaction actually integrated), so a
duplicate or a no-op costs nothing and trailing garbage after a valid update is never kept.

Durability: an update is written before it is relayed, and the runtime's output gate holds every
outgoing WebSocket frame until the writes made before it have committed, so nobody ever sees an
edit that a crash then loses. Every ``COMPACT_EVERY_UPDATES`` updates or ``COMPACT_EVERY_BYTES``
logged bytes the log is folded into the snapshot in one transaction.

Awareness (cursors, names) is relayed, held in memory for the next joiner, and never stored;
each socket's attachment keeps the awareness client ids it announced with their last clock, so
when it closes or vanishes (after hibernation too) the document tells everyone they left.

Bad input is refused whole and changes nothing: the socket is closed with 4400 (a frame that is
not y-websocket: text, a truncated varint, an update Yrs cannot decode, awareness that is not
JSON) or 4413 (an update over ``MAX_UPDATE_BYTES``, a document that would pass
``MAX_DOC_BYTES``), and a reason saying which. y-websocket does not reconnect after a 44xx close.
"""

from __future__ import annotations

import logging
from typing import Any

from pycrdt import Doc, Subscription, Text, TransactionEvent, get_update, merge_updates

from ...core.errors import StorageError
from ...core.http import Request, Response
from ...core.wire import MAX_MESSAGE_BYTES
from ..base import DurableObject
from ..sockets import WebSocket
from .collab_log import DocumentLog
from .yprotocol import (
    CLOSE_TOO_LARGE,
    AwarenessEntry,
    MessageType,
    ProtocolError,
    SyncStep,
    awareness_message,
    encode_awareness,
    has_structs,
    parse_awareness,
    parse_frame,
    sync_message,
)

log = logging.getLogger("durable.patterns.collab")

#: the close reason is at most 123 UTF-8 bytes (RFC 6455)
_MAX_REASON = 120
#: an update that changes nothing, as Yjs encodes it
_EMPTY_UPDATE = b"\x00\x00"


class CollabDocument(DurableObject):
    """One collaborative document per object. Routes (see examples/collab): ``/collab/<doc>``
    with a WebSocket upgrade. RPC: ``text(name="text")`` (a Y.Text's content), ``stats()``."""

    #: the largest update one frame may carry
    MAX_UPDATE_BYTES = 256 * 1024
    #: the largest document (its state encoded as one update): a late joiner gets it in one
    #: frame, and frames are at most 1 MiB
    MAX_DOC_BYTES = 768 * 1024
    #: the largest awareness update one frame may carry
    MAX_AWARENESS_BYTES = 32 * 1024
    #: awareness client ids one socket may announce (a provider has one per document)
    MAX_CLIENTS_PER_SOCKET = 16
    #: compact when the log holds this many updates ...
    COMPACT_EVERY_UPDATES = 100
    #: ... or this many bytes
    COMPACT_EVERY_BYTES = 256 * 1024

    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        self.log = DocumentLog(ctx.storage)
        self.doc: Doc[Any] = Doc()
        self._changes: list[bytes] = []
        self._subscription: Subscription | None = None
        #: awareness client id -> its latest entry (memory only: clients renew it every 15 s)
        self.awareness: dict[int, AwarenessEntry] = {}
        ctx.block_concurrency_while(self._rebuild)

    # ----- the document ----------------------------------------------------------------------

    async def _rebuild(self) -> None:
        """(Re)build the in-memory Doc from the snapshot and the log."""
        doc: Doc[Any] = Doc()
        for update in await self.log.load():
            doc.apply_update(update)
        self.doc = doc
        self._subscription = doc.observe(self._changed)

    def _changed(self, event: TransactionEvent) -> None:
        self._changes.append(event.update)

    def _integrate(self, update: bytes) -> bytes | None:
        """Apply ``update``; returns what it changed (None: nothing, e.g. a duplicate), or raises
        ProtocolError with the doc unchanged (Yrs decodes an update whole before applying it)."""
        self._changes = []
        try:
            self.doc.apply_update(update)
        except ValueError as exc:
            raise ProtocolError(f"the update was refused: {exc}") from None
        changes, self._changes = self._changes, []
        if not changes:
            return None
        return changes[0] if len(changes) == 1 else merge_updates(*changes)

    async def _compact(self) -> None:
        if self.log.log_count:
            await self.log.compact(self.doc.get_update())

    async def _apply(self, ws: WebSocket, update: bytes) -> None:
        if len(update) > self.MAX_UPDATE_BYTES:
            raise ProtocolError(f"an update of {len(update)} bytes is over the limit of {self.MAX_UPDATE_BYTES}",
                                CLOSE_TOO_LARGE)
        if update == _EMPTY_UPDATE:
            return
        if self.log.stored_bytes + len(update) > self.MAX_DOC_BYTES:
            await self._compact()  # the log overstates the document: measure it exactly
            if self.log.stored_bytes + len(update) > self.MAX_DOC_BYTES:
                raise ProtocolError(f"the document would pass its limit of {self.MAX_DOC_BYTES} bytes "
                                    f"({self.log.stored_bytes} now, an update of {len(update)})", CLOSE_TOO_LARGE)
        try:
            change = self._integrate(update)
        except ProtocolError:
            raise
        except BaseException as exc:  # a panic in Yrs is a BaseException: the Doc may be half-changed
            if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
                raise
            await self._rebuild()
            raise ProtocolError(f"the update was refused: {type(exc).__name__}") from None
        if has_structs(get_update(update, self.doc.get_state())):
            # it builds on edits this document does not have (the client kept edits the server
            # lost, say after a restore): Yrs holds it in memory, never applied. Drop it, store
            # what did apply, and ask the client for everything it has that we lack (step 1)
            await self._rebuild()
            change = None if change is None else self._integrate(change)
            ws.send(sync_message(SyncStep.STEP1, self.doc.get_state()))
        if change is None:
            return
        try:
            await self.log.append(change)
        except StorageError as exc:  # refused before anything was written: put the Doc back
            await self._rebuild()
            raise ProtocolError(f"the update could not be stored: {exc.message}") from None
        frame = sync_message(SyncStep.UPDATE, change)
        for other in await self.ctx.get_websockets():
            if other is not ws:
                other.send(frame)  # leaves once the append has committed (the output gate)
        if self.log.log_count >= self.COMPACT_EVERY_UPDATES or self.log.log_bytes >= self.COMPACT_EVERY_BYTES:
            await self._compact()

    # ----- RPC -------------------------------------------------------------------------------

    async def text(self, name: str = "text") -> str:
        """The content of the document's Y.Text ``name`` (what a y-websocket text editor shows)."""
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty str")
        return str(self.doc.get(name, type=Text))

    async def stats(self) -> dict[str, int]:
        """How the document is stored: its size, the snapshot and the log since."""
        return {"doc_bytes": len(self.doc.get_update()), "snapshot_parts": self.log.snapshot_parts,
                "snapshot_bytes": self.log.snapshot_bytes, "log_updates": self.log.log_count,
                "log_bytes": self.log.log_bytes, "sockets": len(await self.ctx.get_websockets()),
                "awareness_clients": len(self.awareness)}

    # ----- sockets ---------------------------------------------------------------------------

    async def fetch(self, request: Request) -> Response:
        ws = request.websocket
        if ws is None:
            return Response.json_response({"error": "connect a Yjs client (y-websocket) with a WebSocket: "
                                                    "server URL ws://<host>/collab, room <doc>"},
                                          426, {"upgrade": "websocket"})
        self.ctx.accept_websocket(ws)
        ws.send(sync_message(SyncStep.STEP1, self.doc.get_state()))
        if self.awareness:
            ws.send(awareness_message(encode_awareness(list(self.awareness.values()))))
        return Response(None, 101)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        try:
            if isinstance(message, str):
                raise ProtocolError("y-websocket frames are binary; this was a text frame")
            if len(message) > self.MAX_UPDATE_BYTES + 16:
                raise ProtocolError(f"a frame of {len(message)} bytes is over the limit of "
                                    f"{self.MAX_UPDATE_BYTES} bytes", CLOSE_TOO_LARGE)
            frame = parse_frame(message)
            if frame.kind is MessageType.SYNC:
                if frame.step is SyncStep.STEP1:
                    ws.send(sync_message(SyncStep.STEP2, self._missing(frame.payload)))
                else:
                    await self._apply(ws, frame.payload)
            elif frame.kind is MessageType.AWARENESS:
                await self._announce(ws, frame.payload)
            elif frame.kind is MessageType.QUERY_AWARENESS:
                ws.send(awareness_message(encode_awareness(list(self.awareness.values()))))
            # auth frames go from servers to clients: one from a client is ignored
        except ProtocolError as exc:
            await self._refuse(ws, exc)

    def _missing(self, state_vector: bytes) -> bytes:
        """Sync step 2: the update a client with ``state_vector`` lacks."""
        try:
            update = self.doc.get_update(state_vector)
        except ValueError:
            raise ProtocolError("sync step 1 carries a state vector Yrs cannot decode") from None
        if len(update) > MAX_MESSAGE_BYTES - 64:
            raise ProtocolError(f"the document ({len(update)} bytes) does not fit in one frame", CLOSE_TOO_LARGE)
        return update

    async def _refuse(self, ws: WebSocket, error: ProtocolError) -> None:
        """Close the socket that sent a bad frame, saying why (the client's close event has it)."""
        log.info("collab %s: refused a frame: %s", self.ctx.id, error.reason)
        reason = error.reason.encode()[:_MAX_REASON].decode("utf-8", "ignore")
        ws.close(error.code, reason)
        await self._left(ws)  # a close the object starts brings no websocket_close

    # ----- awareness -------------------------------------------------------------------------

    @staticmethod
    def _announced(ws: WebSocket) -> dict[int, int]:
        """The awareness client ids this socket announced, with their last clock (attachment)."""
        stored = ws.deserialize_attachment() or {}
        return {int(cid): int(clock) for cid, clock in stored.get("clients", [])}

    def _is_news(self, entry: AwarenessEntry) -> bool:
        """Newer than what the document holds (Yjs clients ignore the rest just the same)."""
        known = self.awareness.get(entry.client_id)
        return known is None or entry.clock > known.clock or (entry.clock == known.clock and entry.removed)

    async def _announce(self, ws: WebSocket, payload: bytes) -> None:
        """An awareness update: keep what is news, relay it, and note which clients this socket
        speaks for. y-websocket clients send back every change they receive, so a client id
        belongs to the first socket that announced it, not to every socket that echoes it."""
        if len(payload) > self.MAX_AWARENESS_BYTES:
            raise ProtocolError(f"an awareness update of {len(payload)} bytes is over the limit of "
                                f"{self.MAX_AWARENESS_BYTES}", CLOSE_TOO_LARGE)
        entries = [e for e in parse_awareness(payload) if self._is_news(e)]
        sockets = await self.ctx.get_websockets()
        elsewhere = {cid for other in sockets if other is not ws for cid in self._announced(other)}
        announced = self._announced(ws)
        clients = dict(announced)
        for e in entries:
            if e.removed:
                clients.pop(e.client_id, None)
            elif e.client_id in clients or e.client_id not in elsewhere:
                clients[e.client_id] = e.clock
        if len(clients) > self.MAX_CLIENTS_PER_SOCKET:
            raise ProtocolError(f"a socket may announce at most {self.MAX_CLIENTS_PER_SOCKET} awareness clients")
        if not entries:
            return
        for e in entries:
            if e.removed:
                self.awareness.pop(e.client_id, None)
            else:
                self.awareness[e.client_id] = e
        if clients != announced:
            # the clocks too: a removal must carry a newer clock than the client's last, or
            # Yjs clients ignore it (after hibernation this is all the document knows)
            ws.serialize_attachment({"clients": [[cid, clock] for cid, clock in clients.items()]})
        frame = awareness_message(encode_awareness(entries))
        for other in sockets:
            other.send(frame)  # to the sender too: y-websocket takes a long silence for a dead link

    async def _left(self, ws: WebSocket) -> None:
        """Tell the others that the awareness clients of ``ws`` are gone (unless another socket
        announces them now: a client that reconnected before its old socket's close arrived)."""
        others = [other for other in await self.ctx.get_websockets() if other is not ws]
        elsewhere = {cid for other in others for cid in self._announced(other)}
        gone = []
        for cid, clock in self._announced(ws).items():
            if cid in elsewhere:
                continue
            known = self.awareness.pop(cid, None)
            last = clock if known is None else max(clock, known.clock)
            gone.append(AwarenessEntry(cid, last + 1, "null"))
        if gone:
            frame = awareness_message(encode_awareness(gone))
            for other in others:
                other.send(frame)

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        await self._left(ws)
