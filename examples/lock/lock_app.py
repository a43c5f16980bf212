"""The lock app: ``GET /lock/<name>`` shows the holder and the queue; ``POST
/lock/<name>/acquire|renew|release|write`` with a JSON body of arguments, for example
``{"owner": "job-7", "ttl_ms": 30000, "wait_ms": 5000}`` to acquire.

Each name is one Lock object (the library's pattern): it grants fencing tokens that only ever
grow, frees a hold at its TTL by an alarm, and refuses a write with a stale token."""

from __future__ import annotations

from durable import Env, Request, Response


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) >= 2 and segments[0] == "lock":
        return await env.LOCKS.get_by_name(segments[1]).fetch(request)
    return Response("Not found", 404)
