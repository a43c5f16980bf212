"""The presence app: who is here, per topic, one PresenceRoom (the library's pattern) each.

- ``/presence/<topic>?id=<member>&meta=<JSON>`` (a WebSocket): a member while the socket is open;
  it gets ``members`` then ``join``/``update``/``leave`` events and may send
  ``{"type": "update", "meta": {...}}``; ``?watch=1`` watches without being a member;
- ``POST /presence/<topic>/heartbeat`` (``{"id", "meta", "ttl_ms"}``): a member without a
  socket, here until its heartbeats stop; ``POST /presence/<topic>/leave`` (``{"id"}``);
- ``GET /presence/<topic>``: the members."""

from __future__ import annotations

from durable import Env, Request, Response


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) >= 2 and segments[0] == "presence":
        return await env.PRESENCE.get_by_name(segments[1]).fetch(request)
    return Response("Not found", 404)
