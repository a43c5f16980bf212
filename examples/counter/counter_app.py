"""The counter app: ``GET /counter/<name>`` reads, ``POST /counter/<name>/increment[?by=N]`` adds.

Each name is one Counter object (the library's pattern), so increments of one counter are
serialised by its input gate and durable before they are answered."""

from __future__ import annotations

from durable import Env, Request, Response


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) >= 2 and segments[0] == "counter":
        return await env.COUNTERS.get_by_name(segments[1]).fetch(request)
    return Response("Not found", 404)
