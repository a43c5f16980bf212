"""ChatRoom: join, leave, message, typing over hibernatable WebSockets; the last 100 messages kept.

Nothing about the people in the room lives in instance memory: each socket carries its user in
its attachment and its user id as a tag, so the room survives eviction and failover with every
client still connected, and the users list is the sockets that are open (presence.py). A socket that vanishes
(its gateway died, its client went away without a close frame) is closed by the runtime, so
presence stays honest without timeouts of our own.

Every chat message gets a sequence number; a client that reconnects with ``?since=<seq>`` gets
the messages it missed (of the last 100). When the last socket leaves, an alarm is set: a room
still empty when it fires forgets its history.

Client -> room (JSON text frames): ``{"type": "message", "content": "..."}``, ``{"type": "typing"}``,
``{"type": "leave"}``; the text frame ``ping`` is answered ``pong`` by the gateway itself.
Room -> client: ``welcome`` (you, users, history, seq), ``join``, ``leave``, ``message`` (seq),
``typing``, ``error``.

Each chat message is also an event (``ctx.emit``, README "Events"): ``evt.ChatRoom.<id>.message``
carries the message as sent to the room, committed with it (people type at human speed, so this
is on by default; ``EMIT_EVENTS = False`` in a subclass turns it off).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ...core.errors import StorageError
from ...core.http import Request, Response
from ..base import AlarmInfo, DurableObject
from ..sockets import WebSocket
from .presence import Presence

HISTORY = 100
MAX_CONTENT_CHARS = 2000
MAX_NAME_CHARS = 64


def _now_ms() -> int:
    return int(time.time() * 1000)


def _msg_key(seq: int) -> str:
    return f"m:{seq:016d}"


class ChatRoom(DurableObject):
    """Routes (see examples/chat): ``/room/<name>`` upgrades to a WebSocket with
    ``?userId=<id>&name=<display name>[&since=<seq>]`` (``user=`` is accepted for ``userId``);
    ``GET /room/<name>/messages`` and ``GET /room/<name>/users`` answer JSON."""

    #: an empty room's history is deleted this long after the last person left
    EMPTY_ROOM_TTL_MS = 24 * 3600 * 1000
    #: each chat message is also an event, ``evt.ChatRoom.<id>.message``
    EMIT_EVENTS = True

    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        ctx.set_websocket_auto_response("ping", "pong")
        #: who is in the room: the users its open sockets carry (presence.py)
        self.presence = Presence(ctx, id_key="userId")

    # ----- HTTP ----------------------------------------------------------------------------

    async def fetch(self, request: Request) -> Response:
        segments = [s for s in request.path.split("/") if s]
        action = segments[2] if len(segments) > 2 else ""
        if request.websocket is not None:
            return await self._join(request)
        if request.method != "GET":
            return Response.json_response({"error": "use GET"}, 405, {"allow": "GET"})
        if action == "messages":
            return Response.json_response(await self.messages())
        if action == "users":
            return Response.json_response(await self.users())
        if action == "":
            return Response.json_response({"error": "connect with a WebSocket: /room/<name>?userId=<id>&name=<name>"},
                                          426, {"upgrade": "websocket"})
        return Response.json_response({"error": "not found"}, 404)

    async def messages(self, since: int = 0) -> list[dict[str, Any]]:
        """The kept messages (the last 100), oldest first; only those after ``since``."""
        stored = await self.ctx.storage.list(prefix="m:", start=_msg_key(since + 1))
        return list(stored.values())

    async def users(self) -> list[dict[str, Any]]:
        """Who is in the room now: one entry per user, however many sockets they have open."""
        users = await self.presence.socket_members()
        return sorted(users.values(), key=lambda u: u["joinedAt"])

    # ----- sockets -------------------------------------------------------------------------

    async def _join(self, request: Request) -> Response:
        # the original specification's clients send userId; earlier ones of this project, user
        user_id = (request.query_param("userId") or request.query_param("user") or "").strip()
        name = (request.query_param("name") or "").strip()
        if not user_id or not name:
            return Response.json_response({"error": "missing userId or name"}, 400)
        if len(user_id) > 256 or len(name) > MAX_NAME_CHARS:
            return Response.json_response({"error": f"userId must be at most 256 and name {MAX_NAME_CHARS} "
                                                    "characters"}, 400)
        try:
            since = int(request.query_param("since") or 0)
        except ValueError:
            return Response.json_response({"error": "since must be a sequence number"}, 400)
        already_here = user_id in await self.presence.socket_members()
        ws = request.websocket
        self.ctx.accept_websocket(ws, [user_id])
        user = {"userId": user_id, "name": name, "joinedAt": _now_ms()}
        ws.serialize_attachment(user)
        await self.ctx.storage.delete_alarm()  # somebody is here: no clean-up
        history = await self.messages(since)
        ws.send(json.dumps({"type": "welcome", "you": user, "users": await self.users(), "history": history,
                            "seq": await self.ctx.storage.get("seq") or 0}))
        if not already_here:
            await self._broadcast({"type": "join", "userId": user_id, "name": name, "timestamp": _now_ms()},
                                  exclude=ws)
        return Response(None, 101)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        user = ws.deserialize_attachment() or {}
        try:
            data = json.loads(message)
            kind = data["type"]
        except (ValueError, TypeError, KeyError, RecursionError):
            ws.send(json.dumps({"type": "error", "error": "frames are JSON objects with a 'type'"}))
            return
        if kind == "message":
            content = data.get("content")
            if not isinstance(content, str) or not content.strip():
                ws.send(json.dumps({"type": "error", "error": "a message needs a non-empty 'content' string"}))
                return
            if len(content) > MAX_CONTENT_CHARS:
                ws.send(json.dumps({"type": "error", "error": f"messages are at most {MAX_CONTENT_CHARS} "
                                                              "characters"}))
                return
            seq = (await self.ctx.storage.get("seq") or 0) + 1
            msg = {"type": "message", "seq": seq, "userId": user.get("userId"), "name": user.get("name"),
                   "content": content, "timestamp": _now_ms()}
            try:  # refused before anything is written (a lone surrogate such as "\ud800", say)
                await self.ctx.storage.put({"seq": seq, _msg_key(seq): msg})
            except StorageError as exc:
                ws.send(json.dumps({"type": "error", "error": f"the message was not sent: {exc.message}"}))
                return
            # committed with the message itself: `nats sub 'evt.ChatRoom.*.message'` sees each once
            if self.EMIT_EVENTS:
                self.ctx.emit("message", msg)
            if seq > HISTORY:
                await self.ctx.storage.delete(_msg_key(seq - HISTORY))
            await self._broadcast(msg)
        elif kind == "typing":
            await self._broadcast({"type": "typing", "userId": user.get("userId"), "name": user.get("name"),
                                   "timestamp": _now_ms()}, exclude=ws)
        elif kind == "leave":
            ws.close(1000, "left the room")
            await self._left(user, ws)
        else:
            ws.send(json.dumps({"type": "error", "error": f"unknown frame type {kind!r}"}))

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        await self._left(ws.deserialize_attachment() or {}, ws)

    async def _left(self, user: dict[str, Any], ws: WebSocket) -> None:
        remaining = await self.ctx.get_websockets()
        if user.get("userId") not in await self.presence.socket_members(exclude=ws):
            await self._broadcast({"type": "leave", "userId": user.get("userId"), "name": user.get("name"),
                                   "timestamp": _now_ms()}, exclude=ws)
        if not [other for other in remaining if other is not ws]:
            await self.ctx.storage.set_alarm(_now_ms() + self.EMPTY_ROOM_TTL_MS)

    async def _broadcast(self, message: dict[str, Any], exclude: WebSocket | None = None) -> None:
        """One payload to every socket: the runtime sends it as one NATS message per gateway."""
        data = json.dumps(message)
        for ws in await self.ctx.get_websockets():
            if ws is not exclude:
                ws.send(data)

    async def alarm(self, info: AlarmInfo) -> None:
        """The room has been empty for EMPTY_ROOM_TTL_MS: forget it."""
        if not await self.ctx.get_websockets():
            await self.ctx.storage.delete_all()
