"""StreamChannel: the coordination of one live stream (a broadcast, a live blog, a market feed).

One publisher at a time sends messages; the channel numbers them (offsets 1, 2, 3 ...), keeps the
last :attr:`StreamChannel.RETAIN` in storage and fans each out to every viewer. What it gives:

- **Ordered, resumable messages**: every message has an offset; a viewer that reconnects with
  ``?since=<offset>`` gets what it missed (of those kept) before anything new. A viewer whose
  ``since`` is older than what is kept is told which offsets it lost (a ``gap`` frame); one
  that missed more than its window gets the newest window's worth and a ``skip`` frame naming
  the kept offsets it was skipped past (readable from the HTTP history).
- **Acknowledged means kept**: the publisher's ``published`` answer, and the message's fan-out,
  leave only once the message is durable (the output gate), so a message a viewer saw or a
  publisher was told about survives eviction and failover of the owning worker.
- **One publisher, with take-over**: a second publisher is refused unless it asks to take over
  (``takeover=1``); then the old one is told ``replaced`` and closed (4001), its later frames
  cannot publish. Every take-over raises the channel's publisher ``epoch``.
- **Viewer count**: in the welcome, in every ``message`` frame (the same payload goes to every
  viewer, so the runtime sends it once per gateway) and as ``viewers`` events to the publisher.
- **Back-pressure without stalls**: each viewer acknowledges what it has processed
  (``{"type": "ack", "offset": n}``) and may be at most ``window`` messages (``?window=``,
  default :attr:`StreamChannel.WINDOW`) ahead of its last ack. A viewer that falls behind stops
  getting messages and is told ``lagging``; its next ack is answered ``skip`` (the offsets it
  missed, which it can fetch over HTTP while they are kept) and it resumes at the head. Nobody
  else waits for it: each socket has its own queue at the gateway. ``window=0`` turns this off
  (the gateway then closes a client with 10,000 frames queued, code 1013).

Acks are flow control, not data: they live in instance memory and are forgotten when the
instance is evicted (every viewer then counts as caught up), so acks never cost a write.

Routes (see examples/stream): a WebSocket to ``/stream/<name>?role=viewer|publisher&id=<client>``
(``&since=``, ``&window=`` for viewers, ``&takeover=1`` for publishers); ``GET /stream/<name>``
answers the channel's stats; ``GET /stream/<name>/messages?since=<offset>&limit=<n>`` the kept
messages after ``since``.

Publisher -> channel: ``{"type": "publish", "data": <JSON>}``. Channel -> publisher: ``welcome``,
``published`` (offset), ``viewers`` (count), ``replaced``, ``error``. Viewer -> channel:
``{"type": "ack", "offset": n}``. Channel -> viewer: ``welcome``, ``message`` (offset, data,
viewers), ``gap``, ``lagging``, ``skip``, ``publisher`` (who publishes now, or null), ``error``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...core.errors import StorageError
from ...core.http import Request, Response
from ..base import DurableObject
from ..sockets import WebSocket

MAX_ID_CHARS = 256
#: a message's ``data``, as JSON, is at most this many bytes (well under the storage value limit)
MAX_DATA_BYTES = 64 * 1024
PUBLISHER = "publisher"
VIEWER = "viewer"
#: close code for a publisher another one took over from
CLOSE_REPLACED = 4001


def _key(offset: int) -> str:
    return f"m:{offset:016d}"


def _frame(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":"))


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_param(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}")
    return value


@dataclass(slots=True)
class _Flow:
    """A viewer's flow control (instance memory only): its window, what it acknowledged, and
    whether it was cut off for lagging."""

    window: int
    acked: int
    lagging: bool = False


class StreamChannel(DurableObject):
    """One live stream: ordered, resumable, one publisher with take-over, flow-controlled viewers."""

    #: messages kept for resuming viewers and the HTTP history
    RETAIN = 1000
    #: messages a viewer may be ahead of its last ack before it is skipped ahead
    WINDOW = 256
    #: most messages one HTTP history answer carries
    MAX_PAGE = 1000
    #: and most bytes of JSON (replies travel as one NATS message, at most 1 MiB)
    MAX_PAGE_BYTES = 768 * 1024

    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        #: socket id -> flow control of that viewer (forgotten on eviction: everyone caught up)
        self._flows: dict[str, _Flow] = {}

    # ----- HTTP ----------------------------------------------------------------------------

    async def fetch(self, request: Request) -> Response:
        segments = [s for s in request.path.split("/") if s]
        action = segments[2] if len(segments) > 2 else ""
        if request.websocket is not None:
            if action:
                return Response.json_response({"error": "connect to /stream/<name>"}, 404)
            return await self._connect(request)
        if request.method != "GET":
            return Response.json_response({"error": "use GET (or a WebSocket to publish)"}, 405, {"allow": "GET"})
        if action == "":
            return Response.json_response(await self.stats())
        if action == "messages":
            try:
                since = _int_param(request, "since", 0, 0, 2**62)
                limit = _int_param(request, "limit", self.MAX_PAGE, 1, self.MAX_PAGE)
            except ValueError as exc:
                return Response.json_response({"error": str(exc)}, 400)
            return Response.json_response(await self.messages(since, limit))
        return Response.json_response({"error": "not found"}, 404)

    async def stats(self) -> dict[str, Any]:
        """The head offset, the oldest kept, the viewer count and who publishes."""
        head, oldest = await self._bounds()
        publishers = await self.ctx.get_websockets(PUBLISHER)
        return {"head": head, "oldest": oldest, "viewers": len(await self.ctx.get_websockets(VIEWER)),
                "publisher": self._client_id(publishers[0]) if publishers else None,
                "epoch": await self.ctx.storage.get("epoch") or 0}

    async def messages(self, since: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Kept messages after offset ``since``, oldest first, at most ``limit`` and at most
        MAX_PAGE_BYTES of JSON (a reply must fit in one NATS message): a caller pages on with
        ``since`` = the last offset it got."""
        limit = max(1, min(limit, self.MAX_PAGE))
        stored = await self.ctx.storage.list(prefix="m:", start=_key(since + 1), limit=limit)
        page: list[dict[str, Any]] = []
        size = 0
        for message in stored.values():
            size += len(json.dumps(message)) + 1
            if page and size > self.MAX_PAGE_BYTES:
                break
            page.append(message)
        return page

    async def _bounds(self) -> tuple[int, int]:
        """(head, oldest kept offset); (0, 0) for a channel with no message yet."""
        head = await self.ctx.storage.get("head") or 0
        return head, (max(1, head - self.RETAIN + 1) if head else 0)

    # ----- connecting ----------------------------------------------------------------------

    async def _connect(self, request: Request) -> Response:
        role = request.query_param("role") or VIEWER
        client = (request.query_param("id") or "").strip()
        if role not in (PUBLISHER, VIEWER):
            return Response.json_response({"error": f"role is 'publisher' or 'viewer', not {role!r}"}, 400)
        if not client or len(client) > MAX_ID_CHARS:
            return Response.json_response({"error": f"id is a non-empty client id of at most {MAX_ID_CHARS} "
                                                    "characters"}, 400)
        try:
            since = _int_param(request, "since", -1, 0, 2**62)
            window = _int_param(request, "window", self.WINDOW, 0, 1_000_000)
        except ValueError as exc:
            return Response.json_response({"error": str(exc)}, 400)
        if role == PUBLISHER:
            return await self._connect_publisher(request, client)
        return await self._connect_viewer(request, client, since, window)

    async def _connect_publisher(self, request: Request, client: str) -> Response:
        current = await self.ctx.get_websockets(PUBLISHER)
        if current and request.query_param("takeover") not in ("1", "true"):
            return Response.json_response({"error": f"the channel has a publisher ({self._client_id(current[0])}); "
                                                    "connect with takeover=1 to replace it"}, 409)
        epoch = (await self.ctx.storage.get("epoch") or 0) + 1
        await self.ctx.storage.put("epoch", epoch)
        for old in current:
            old.send(_frame(type="replaced", by=client, epoch=epoch))
            old.close(CLOSE_REPLACED, "another publisher took over")
        ws = request.websocket
        assert ws is not None
        self.ctx.accept_websocket(ws, [PUBLISHER])
        ws.serialize_attachment({"id": client, "role": PUBLISHER, "epoch": epoch})
        head, oldest = await self._bounds()
        ws.send(_frame(type="welcome", role=PUBLISHER, epoch=epoch, head=head, oldest=oldest,
                       viewers=len(await self.ctx.get_websockets(VIEWER))))
        await self._broadcast(_frame(type="publisher", id=client, epoch=epoch))
        return Response(None, 101)

    async def _connect_viewer(self, request: Request, client: str, since: int, window: int) -> Response:
        ws = request.websocket
        assert ws is not None
        self.ctx.accept_websocket(ws, [VIEWER])
        ws.serialize_attachment({"id": client, "role": VIEWER, "window": window})
        head, oldest = await self._bounds()
        publishers = await self.ctx.get_websockets(PUBLISHER)
        viewers = len(await self.ctx.get_websockets(VIEWER))
        ws.send(_frame(type="welcome", role=VIEWER, head=head, oldest=oldest, viewers=viewers, window=window,
                       publisher=self._client_id(publishers[0]) if publishers else None))
        first = (head if since < 0 else min(since, head)) + 1  # no since: live from now
        # what it missed and is still kept, at most a window's worth (the newest): it acks those
        lowest = max(first, oldest, head - window + 1 if window else 0)
        missed = list((await self.ctx.storage.list(prefix="m:", start=_key(lowest))).values()) if first <= head else []
        resume_at = missed[0]["offset"] if missed else head + 1
        if first < oldest:  # gone: older than what is kept
            ws.send(_frame(type="gap", first=first, last=oldest - 1))
        if max(first, oldest) < resume_at:  # kept, but more than its window: skipped, readable over HTTP
            ws.send(_frame(type="skip", first=max(first, oldest), last=resume_at - 1, head=head))
        for message in missed:
            ws.send(_frame(type="message", **message, viewers=viewers))
        self._flows[ws.id] = _Flow(window=window, acked=resume_at - 1)
        for publisher in publishers:
            publisher.send(_frame(type="viewers", count=viewers))
        return Response(None, 101)

    # ----- frames --------------------------------------------------------------------------

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        try:
            data = json.loads(message)
            kind = data["type"]
        except (ValueError, TypeError, KeyError, RecursionError):
            ws.send(_frame(type="error", error="frames are JSON objects with a 'type'"))
            return
        role = (ws.deserialize_attachment() or {}).get("role")
        if kind == "publish":
            if role != PUBLISHER:
                ws.send(_frame(type="error", error="only the publisher publishes (connect with role=publisher)"))
                return
            await self._publish(ws, data)
        elif kind == "ack":
            offset = data.get("offset")
            if role != VIEWER or not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                ws.send(_frame(type="error", error="an ack is {'type': 'ack', 'offset': <int>} from a viewer"))
                return
            await self._ack(ws, offset)
        else:
            ws.send(_frame(type="error", error=f"unknown frame type {kind!r}"))

    async def _publish(self, ws: WebSocket, frame: dict[str, Any]) -> None:
        if (ws.deserialize_attachment() or {}).get("epoch") != await self.ctx.storage.get("epoch"):
            ws.send(_frame(type="error", error="another publisher took over: not published"))
            return
        if "data" not in frame:
            ws.send(_frame(type="error", error="a publish frame carries 'data' (any JSON value)"))
            return
        size = len(json.dumps(frame["data"]))
        if size > MAX_DATA_BYTES:
            ws.send(_frame(type="error", error=f"data is at most {MAX_DATA_BYTES} bytes of JSON, not {size}"))
            return
        head = (await self.ctx.storage.get("head") or 0) + 1
        message = {"offset": head, "data": frame["data"]}
        try:  # refused before anything is written (a lone surrogate such as "\ud800", say)
            await self.ctx.storage.put({"head": head, _key(head): message})
        except StorageError as exc:
            ws.send(_frame(type="error", error=f"not published: {exc.message}"))
            return
        if head > self.RETAIN:
            await self.ctx.storage.delete(_key(head - self.RETAIN))
        ws.send(_frame(type="published", offset=head))
        await self._fan_out(message)

    async def _fan_out(self, message: dict[str, Any]) -> None:
        """Send to every viewer within its window; tell a viewer that just fell out of it."""
        viewers = await self.ctx.get_websockets(VIEWER)
        payload = _frame(type="message", **message, viewers=len(viewers))
        offset = message["offset"]
        for ws in viewers:
            flow = self._flows.get(ws.id) or self._restored_flow(ws, offset - 1)
            if flow.lagging:
                continue
            if flow.window and offset - flow.acked > flow.window:
                flow.lagging = True
                ws.send(_frame(type="lagging", acked=flow.acked, head=offset,
                               error=f"more than {flow.window} messages unacknowledged: skipping you ahead"))
                continue
            ws.send(payload)

    async def _ack(self, ws: WebSocket, offset: int) -> None:
        flow = self._flows.get(ws.id) or self._restored_flow(ws, offset)
        head = await self.ctx.storage.get("head") or 0
        flow.acked = max(flow.acked, min(offset, head))
        if flow.lagging:  # it has processed what it got: skip it to the head
            flow.lagging = False
            ws.send(_frame(type="skip", first=flow.acked + 1, last=head, head=head))
            flow.acked = head

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self._flows.pop(ws.id, None)
        role = (ws.deserialize_attachment() or {}).get("role")
        if role == PUBLISHER:
            if not [p for p in await self.ctx.get_websockets(PUBLISHER) if p is not ws]:
                await self._broadcast(_frame(type="publisher", id=None), exclude=ws)
        elif role == VIEWER:
            count = len([v for v in await self.ctx.get_websockets(VIEWER) if v is not ws])
            for publisher in await self.ctx.get_websockets(PUBLISHER):
                publisher.send(_frame(type="viewers", count=count))

    async def _broadcast(self, payload: str, exclude: WebSocket | None = None) -> None:
        for ws in await self.ctx.get_websockets(VIEWER):
            if ws is not exclude:
                ws.send(payload)

    def _restored_flow(self, ws: WebSocket, acked: int) -> _Flow:
        """The flow of a viewer that connected before this instance started (the old instance's
        acks are gone): its window from its attachment, counted as caught up to ``acked``."""
        window = (ws.deserialize_attachment() or {}).get("window", self.WINDOW)
        flow = self._flows[ws.id] = _Flow(window=window if isinstance(window, int) else self.WINDOW, acked=acked)
        return flow

    @staticmethod
    def _client_id(ws: WebSocket) -> str | None:
        attachment = ws.deserialize_attachment()
        return attachment.get("id") if isinstance(attachment, dict) else None

