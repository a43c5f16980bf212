"""The chat app: the page at ``/`` (two browser tabs make a conversation), its script under
``/static/``, and the rooms: ``/room/<name>?userId=<id>&name=<name>`` upgrades to a WebSocket,
``/room/<name>/messages`` and ``/room/<name>/users`` answer JSON. Each room is one ChatRoom
object (the library's pattern): presence, history and broadcast, surviving eviction and
failover because its sockets are held by the gateway (the hibernation API)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from durable import Env, Request, Response

STATIC = Path(__file__).resolve().with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if request.path in ("/", "/index.html") or (segments and segments[0] == "static"):
        return serve_static(request.path)
    if len(segments) >= 2 and segments[0] == "room":
        return await env.ROOMS.get_by_name(segments[1]).fetch(request)
    return Response("Not found", 404)


@cache
def _read(name: str) -> bytes | None:
    """A file directly in ``static/`` (no sub-folders, no way out of it), or None."""
    path = (STATIC / name).resolve()
    if path.parent != STATIC or not path.is_file():
        return None
    return path.read_bytes()


def serve_static(path: str) -> Response:
    name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
    body = _read(name)
    if body is None:
        return Response("Not found", 404)
    return Response(body, 200, {"content-type": _TYPES.get(Path(name).suffix, "application/octet-stream"),
                                "cache-control": "no-cache"})
