"""The game app: Connect Four for two players in a browser, anyone else watching.

``/game/<name>`` is the page (open it in two browsers to play, a third to watch); the same URL
with a WebSocket upgrade joins the game (``?name=<you>`` for a seat, ``?token=<token>`` to take
yours again, ``?spectate=1`` to watch, ``&since=<seq>`` to resume); ``/game/<name>/state``
answers the state as JSON; ``/game/static/`` holds the page's script, so ``static`` is not a
game name. Each game is one Game object (the library's pattern): it judges every move, sends
numbered diffs, keeps seats for players who come back and forfeits those who do not."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from durable import Env, Request, Response

STATIC = Path(__file__).resolve().with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if not segments or segments[0] != "game":
        return Response("Not found", 404)
    if len(segments) >= 2 and segments[1] == "static":
        return _static(segments[2] if len(segments) == 3 else "")
    upgrade = (request.headers.get("upgrade") or "").lower() == "websocket"
    if len(segments) == 1 or (len(segments) == 2 and not upgrade and request.method == "GET"):
        return _static("index.html")  # the page; its script finds the game's name in the URL
    return await env.GAMES.get_by_name(segments[1]).fetch(request)


@cache
def _read(name: str) -> bytes | None:
    """A file directly in ``static/`` (no sub-folders, no way out of it), or None."""
    path = (STATIC / name).resolve()
    if not name or path.parent != STATIC or not path.is_file():
        return None
    return path.read_bytes()


def _static(name: str) -> Response:
    body = _read(name)
    if body is None:
        return Response("Not found", 404)
    return Response(body, 200, {"content-type": _TYPES.get(Path(name).suffix, "application/octet-stream"),
                                "cache-control": "no-cache"})
