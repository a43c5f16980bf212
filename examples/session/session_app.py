"""The session app: ``/session/<id>``: ``PUT`` a JSON object (``?ttl=<seconds>``), ``GET`` it
(renews its time to live), ``DELETE`` it. Expiry is the Session object's alarm."""

from __future__ import annotations

from durable import Env, Request, Response


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) == 2 and segments[0] == "session":
        return await env.SESSIONS.get_by_name(segments[1]).fetch(request)
    return Response("Not found", 404)
