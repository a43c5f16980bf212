"""The user's routing code: the equivalent of a Cloudflare Worker's ``fetch(request, env)``.

Edit this file to route your own paths to your own objects.
"""

from __future__ import annotations

from ..client import Env
from ..core.http import Request, Response
from . import static


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]

    # / -> the chat page; /static/<file> -> its script and styles
    if request.path in ("/", "/index.html") or (segments and segments[0] == "static"):
        return static.serve(request.path)

    # /room/<name> (WebSocket), /room/<name>/messages, /room/<name>/users -> the ChatRoom <name>
    if len(segments) >= 2 and segments[0] == "room":
        return await env.ROOMS.get_by_name(segments[1]).fetch(request)

    # /counter/<name>[/increment] -> the Counter named <name>
    if len(segments) >= 2 and segments[0] == "counter":
        return await env.COUNTERS.get_by_name(segments[1]).fetch(request)

    # /session/<id> -> the Session named <id>: PUT (JSON body, ?ttl=seconds), GET (renews), DELETE
    if len(segments) == 2 and segments[0] == "session":
        return await env.SESSIONS.get_by_name(segments[1]).fetch(request)

    # /api/* -> guarded by one RateLimiter per client IP (100 requests a minute)
    if segments and segments[0] == "api":
        client_ip = request.headers.get("cf-connecting-ip") or "unknown"
        limiter = env.RATE_LIMITER.get_by_name(client_ip)
        verdict = await limiter.fetch(Request("http://internal/check"))
        if not verdict.ok:
            return Response("Rate limited", 429, {"retry-after": verdict.headers.get("retry-after") or "60"})
        return await handle_api(request, env)

    return Response("Not found", 404)


async def handle_api(request: Request, env: Env) -> Response:
    """The API behind the rate limiter."""
    return Response.json_response({"ok": True, "path": request.path, "method": request.method})
