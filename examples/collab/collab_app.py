"""The collab app: ``/collab/<doc>`` is a shared text that everyone on that page edits together.

A plain GET of ``/collab/<doc>`` serves the page; its script and the Yjs bundle are under
``/collab/static/``. The page's Yjs client (``yjs`` + ``y-websocket``'s ``WebsocketProvider``)
is given ``ws://<host>/collab`` as its server URL and ``<doc>`` as its room, so it opens a
WebSocket to ``/collab/<doc>``: that upgrade goes to the CollabDocument object named ``<doc>``
(the library's pattern), which any other Yjs client may join as well. ``/collab`` alone goes to
the document ``scratch``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from durable import Env, Request, Response

STATIC = Path(__file__).resolve().with_name("static")
#: what the page needs; the bundle's build files (package.json, ...) stay private
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
MAX_DOC_NAME = 200


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if not segments or segments[0] != "collab":
        return Response("Not found", 404)
    if len(segments) == 1:
        return Response(None, 302, {"location": "/collab/scratch"})
    if segments[1] == "static":
        return serve_static("/".join(segments[2:]))
    if len(segments) != 2 or len(segments[1]) > MAX_DOC_NAME:
        return Response("Not found", 404)
    if (request.headers.get("upgrade") or "").lower() == "websocket":
        return await env.DOCS.get_by_name(segments[1]).fetch(request)
    if request.method != "GET":
        return Response("use GET", 405, {"allow": "GET"})
    return serve_static("index.html")


@cache
def _read(name: str) -> bytes | None:
    """A file directly in ``static/`` of a type the page uses (no sub-folders, no way out), or None."""
    path = (STATIC / name).resolve()
    if path.parent != STATIC or path.suffix not in _TYPES or not path.is_file():
        return None
    return path.read_bytes()


def serve_static(name: str) -> Response:
    body = _read(name) if name else None
    if body is None:
        return Response("Not found", 404)
    return Response(body, 200, {"content-type": _TYPES[Path(name).suffix], "cache-control": "no-cache"})
