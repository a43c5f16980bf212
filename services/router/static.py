"""The chat page and its browser client, served by the routing code (``/`` and ``/static/*``)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import PurePosixPath

from ..core.http import Response

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}


@cache
def _read(name: str) -> bytes | None:
    """A file of the package data ``static/`` (no sub-folders, no ``..``), or None."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    entry = resources.files("durable.router").joinpath("static", name)
    return entry.read_bytes() if entry.is_file() else None


def serve(path: str) -> Response:
    name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
    body = _read(name)
    if body is None:
        return Response("Not found", 404)
    return Response(body, 200, {"content-type": _TYPES.get(PurePosixPath(name).suffix, "application/octet-stream"),
                                "cache-control": "no-cache"})
