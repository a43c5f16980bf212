"""The orders app's HTTP side: ``GET /orders/<id>`` reads an order, ``POST /orders/<id>/pay``
with ``{"amount": <cents>}`` pays it (the Order object answers both). Orders are created by the
stream (``orders.<id>.created``), not over HTTP."""

from __future__ import annotations

from durable import Env, Request, Response


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) in (2, 3) and segments[0] == "orders":
        return await env.ORDERS.get_by_name(segments[1]).fetch(request)
    return Response("Not found", 404)
