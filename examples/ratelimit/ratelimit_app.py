"""The rate-limit app: every ``/api/*`` request passes one RateLimiter per client address first
(100 requests in any 60 s); over the limit it gets 429 with ``retry-after``.

The client address is ``cf-connecting-ip``, which the router sets from the socket's peer (or,
with ``DURABLE_TRUSTED_PROXIES`` configured, from X-Forwarded-For as those proxies wrote it):
a client cannot choose it."""

from __future__ import annotations

from durable import Env, Request, Response


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if not segments or segments[0] != "api":
        return Response("Not found", 404)
    client_ip = request.headers.get("cf-connecting-ip") or "unknown"
    verdict = await env.RATE_LIMITER.get_by_name(client_ip).fetch(Request("http://internal/check"))
    if not verdict.ok:
        return Response("Rate limited", 429, {"retry-after": verdict.headers.get("retry-after") or "60"})
    return await handle_api(request, env)


async def handle_api(request: Request, env: Env) -> Response:
    """The API behind the rate limiter."""
    return Response.json_response({"ok": True, "path": request.path, "method": request.method})
