"""The stream app: one StreamChannel (the library's pattern) per name.

- ``/stream/<name>?role=publisher&id=<client>[&takeover=1]`` (a WebSocket): the publisher sends
  ``{"type": "publish", "data": ...}`` and is answered ``{"type": "published", "offset": n}``;
- ``/stream/<name>?role=viewer&id=<client>[&since=<offset>][&window=<n>]`` (a WebSocket): the
  viewer gets ``message`` frames in offset order and acknowledges them (``{"type": "ack",
  "offset": n}``) so a slow viewer is skipped ahead instead of holding anyone up;
- ``GET /stream/<name>``: head offset, oldest kept, viewers, publisher;
  ``GET /stream/<name>/messages?since=<offset>``: the kept messages after ``since``."""

from __future__ import annotations

from durable import Env, Request, Response


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) >= 2 and segments[0] == "stream":
        return await env.STREAMS.get_by_name(segments[1]).fetch(request)
    return Response("Not found", 404)
