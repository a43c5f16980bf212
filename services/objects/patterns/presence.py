"""Presence: who is here, per object (a room, a topic, a document), honest when clients vanish.

Two kinds of members, merged into one list:

- **socket members**: a client with a hibernatable WebSocket to the object. The member (its id
  and metadata) is the socket's attachment, so the list survives eviction and failover, and a
  client that vanishes is gone when its socket is (the runtime closes the sockets of a lost
  gateway): no timeouts of our own. One member may have several sockets (tabs); it leaves when
  the last one closes.
- **heartbeat members**: a client without a socket (a server, a mobile app in the background)
  that sends ``heartbeat(id, meta, ttl_ms)`` now and then; it is stored with a deadline and the
  object's alarm removes it when it stops.

:class:`Presence` is the piece an object uses (ChatRoom does); :class:`PresenceRoom` is a ready
object around it: sockets subscribe to ``join``/``update``/``leave`` events of a topic.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ...core.http import Request, Response
from ..base import AlarmInfo, DurableObject
from ..context import Context
from ..sockets import WebSocket

MAX_ID_CHARS = 256
MAX_META_BYTES = 4096
MIN_TTL_MS = 1_000
MAX_TTL_MS = 3600 * 1000
_HEARTBEAT_PREFIX = "presence:hb:"


def check_member(member_id: Any, meta: Any) -> tuple[str, dict[str, Any]]:
    """A member id (non-empty str) and its metadata (a JSON object of at most 4 KiB)."""
    if not isinstance(member_id, str) or not member_id.strip() or len(member_id) > MAX_ID_CHARS:
        raise ValueError(f"a member id is a non-empty str of at most {MAX_ID_CHARS} characters")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TypeError(f"member metadata is a JSON object, not {type(meta).__name__}")
    try:
        size = len(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"member metadata must be JSON: {exc}") from None
    if size > MAX_META_BYTES:
        raise ValueError(f"member metadata is at most {MAX_META_BYTES} bytes of JSON, not {size}")
    return member_id, meta


class Presence:
    """The presence of one object (``ctx``): its sockets' members and its heartbeat members."""

    def __init__(self, ctx: Context, id_key: str = "id") -> None:
        self.ctx = ctx
        #: the attachment field that holds a socket member's id
        self.id_key = id_key

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    async def socket_members(self, exclude: WebSocket | None = None) -> dict[str, dict[str, Any]]:
        """Members with an open socket (first socket's attachment per id), ``exclude`` left out."""
        seen: dict[str, dict[str, Any]] = {}
        for ws in await self.ctx.get_websockets():
            member = ws.deserialize_attachment()
            if ws is not exclude and isinstance(member, dict) and member.get(self.id_key) not in seen:
                seen[member[self.id_key]] = member
        return seen

    async def heartbeat_members(self, now: int | None = None) -> dict[str, dict[str, Any]]:
        """Members kept alive by heartbeats whose deadline has not passed."""
        now = self.now_ms() if now is None else now
        stored = await self.ctx.storage.list(prefix=_HEARTBEAT_PREFIX)
        return {m["id"]: m for m in stored.values() if isinstance(m, dict) and m["expires_ms"] > now}

    async def members(self) -> list[dict[str, Any]]:
        """Everyone here, once each, in the order they came."""
        merged = {**await self.heartbeat_members(), **await self.socket_members()}
        return sorted(merged.values(), key=lambda m: (m.get("joinedAt", 0), str(m.get(self.id_key, m.get("id")))))

    async def is_here(self, member_id: str, exclude: WebSocket | None = None) -> bool:
        return member_id in await self.socket_members(exclude) or member_id in await self.heartbeat_members()

    async def heartbeat(self, member_id: str, meta: Any, ttl_ms: int) -> str:
        """Keep a member without a socket here for ``ttl_ms`` more; ``joined``, ``updated`` (its
        metadata changed) or ``renewed``. Sets the alarm that removes it if it stops."""
        member_id, meta = check_member(member_id, meta)
        if not isinstance(ttl_ms, int) or isinstance(ttl_ms, bool) or not MIN_TTL_MS <= ttl_ms <= MAX_TTL_MS:
            raise ValueError(f"ttl_ms must be an integer from {MIN_TTL_MS} to {MAX_TTL_MS}, not {ttl_ms!r}")
        now = self.now_ms()
        key = _HEARTBEAT_PREFIX + member_id
        old = await self.ctx.storage.get(key)
        alive = isinstance(old, dict) and old["expires_ms"] > now
        present_elsewhere = member_id in await self.socket_members()
        joined_at = old["joinedAt"] if alive else now
        await self.ctx.storage.put(key, {"id": member_id, "meta": meta, "joinedAt": joined_at,
                                         "expires_ms": now + ttl_ms})
        await self._schedule(now)
        if not alive and not present_elsewhere:
            return "joined"
        return "updated" if alive and old["meta"] != meta else "renewed"

    async def leave(self, member_id: str) -> bool:
        """A heartbeat member leaves now; whether it was here."""
        key = _HEARTBEAT_PREFIX + member_id
        old = await self.ctx.storage.get(key)
        if old is None:
            return False
        await self.ctx.storage.delete(key)
        await self._schedule(self.now_ms())
        return isinstance(old, dict) and old["expires_ms"] > self.now_ms()

    async def expire(self) -> list[dict[str, Any]]:
        """Remove heartbeat members whose deadline passed (the alarm calls this); returns them."""
        now = self.now_ms()
        stored = await self.ctx.storage.list(prefix=_HEARTBEAT_PREFIX)
        gone = [m for m in stored.values() if isinstance(m, dict) and m["expires_ms"] <= now]
        if gone:
            await self.ctx.storage.delete([_HEARTBEAT_PREFIX + m["id"] for m in gone])
        await self._schedule(now)
        return gone

    async def _schedule(self, now: int) -> None:
        """The alarm at the next heartbeat deadline (kept if an earlier one is already set)."""
        live = await self.heartbeat_members(now)
        if not live:
            return
        next_deadline = min(m["expires_ms"] for m in live.values())
        current = await self.ctx.storage.get_alarm()
        if current is None or current > next_deadline or current <= now:
            await self.ctx.storage.set_alarm(next_deadline)


class PresenceRoom(DurableObject):
    """Presence of one topic. A WebSocket to ``/presence/<topic>?id=<member>&meta=<JSON>`` is a
    member while it is open and receives ``{"type": "members"}`` then ``join``/``update``/``leave``
    events; ``?watch=1`` subscribes without being a member. HTTP: ``POST
    /presence/<topic>/heartbeat`` (``{"id", "meta", "ttl_ms"}``), ``POST .../leave`` (``{"id"}``),
    ``GET /presence/<topic>`` lists the members."""

    def __init__(self, ctx: Context, env: Any) -> None:
        super().__init__(ctx, env)
        self.presence = Presence(ctx)

    async def members(self) -> list[dict[str, Any]]:
        return await self.presence.members()

    async def heartbeat(self, member_id: str, meta: Any = None, ttl_ms: int = 30_000) -> str:
        outcome = await self.presence.heartbeat(member_id, meta, ttl_ms)
        if outcome != "renewed":
            await self._broadcast({"type": "join" if outcome == "joined" else "update", "id": member_id,
                                   "meta": meta or {}})
        return outcome

    async def leave(self, member_id: str) -> bool:
        gone = await self.presence.leave(member_id)
        if gone and not await self.presence.is_here(member_id):
            await self._broadcast({"type": "leave", "id": member_id})
        return gone

    async def alarm(self, info: AlarmInfo) -> None:
        for member in await self.presence.expire():
            if not await self.presence.is_here(member["id"]):
                await self._broadcast({"type": "leave", "id": member["id"], "reason": "expired"})

    async def _broadcast(self, event: dict[str, Any], exclude: WebSocket | None = None) -> None:
        text = json.dumps(event)
        for ws in await self.ctx.get_websockets():
            if ws is not exclude:
                ws.send(text)

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        """A member may change its metadata: ``{"type": "update", "meta": {...}}``."""
        member = ws.deserialize_attachment()
        try:
            data = json.loads(message)
            if not isinstance(data, dict) or data.get("type") != "update" or not isinstance(member, dict):
                raise ValueError("send {\"type\": \"update\", \"meta\": {...}} (members only)")
            _, meta = check_member(member["id"], data.get("meta"))
        except (ValueError, TypeError, RecursionError) as exc:
            ws.send(json.dumps({"type": "error", "error": str(exc)}))
            return
        for other in await self.ctx.get_websockets():
            attached = other.deserialize_attachment()
            if isinstance(attached, dict) and attached.get("id") == member["id"]:
                other.serialize_attachment({**attached, "meta": meta})
        await self._broadcast({"type": "update", "id": member["id"], "meta": meta})

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        member = ws.deserialize_attachment()
        if isinstance(member, dict) and not await self.presence.is_here(member["id"], exclude=ws):
            await self._broadcast({"type": "leave", "id": member["id"]}, exclude=ws)

    async def fetch(self, request: Request) -> Response:
        segments = [s for s in request.path.split("/") if s]
        action = segments[2] if len(segments) > 2 else ""
        try:
            if request.websocket is not None and not action:
                return await self._connect(request)
            if not action and request.method == "GET":
                return Response.json_response(await self.members())
            if action in ("heartbeat", "leave") and len(segments) == 3 and request.method == "POST":
                args = request.json_object()
                if "id" not in args:
                    raise ValueError("the body must name the member: {\"id\": ...}")
                if action == "leave":
                    return Response.json_response({"left": await self.leave(args["id"])})
                outcome = await self.heartbeat(args["id"], args.get("meta"), args.get("ttl_ms", 30_000))
                return Response.json_response({"presence": outcome})
        except (TypeError, ValueError) as exc:
            return Response.json_response({"error": str(exc)}, 400)
        return Response.json_response({"error": "not found"}, 404)

    async def _connect(self, request: Request) -> Response:
        ws = request.websocket
        assert ws is not None
        if request.query_param("watch"):
            self.ctx.accept_websocket(ws, ["watcher"])
            ws.send(json.dumps({"type": "members", "members": await self.members()}))
            return Response(status=101)
        raw_meta = request.query_param("meta")
        member_id, meta = check_member(request.query_param("id"), json.loads(raw_meta) if raw_meta else {})
        first = not await self.presence.is_here(member_id)
        self.ctx.accept_websocket(ws, ["member"])
        ws.serialize_attachment({"id": member_id, "meta": meta, "joinedAt": Presence.now_ms()})
        ws.send(json.dumps({"type": "members", "members": await self.members()}))
        if first:
            await self._broadcast({"type": "join", "id": member_id, "meta": meta}, exclude=ws)
        return Response(status=101)
