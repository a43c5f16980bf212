"""The chat page and its browser client, served by the routing code (``/`` and ``/static/*``)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from ..core.http import Response

STATIC_DIR = Path(__file__).with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}


@cache
def _read(name: str) -> bytes | None:
    path = (STATIC_DIR / name).resolve()
    if path.parent != STATIC_DIR.resolve() or not path.is_file():
        return None
    return path.read_bytes()


def serve(path: str) -> Response:
    name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
    body = _read(name)
    if body is None:
        return Response("Not found", 404)
    return Response(body, 200, {"content-type": _TYPES.get(Path(name).suffix, "application/octet-stream"),
                                "cache-control": "no-cache"})
