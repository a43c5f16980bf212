"""The auction app: ``POST /auction/<name>/open`` (``{"item", "start_price", "increment",
"duration_ms"}``), ``POST /auction/<name>/bid`` (``{"bidder", "amount", "bid_id"}``),
``GET /auction/<name>`` for the state, or a WebSocket to the same URL to watch it live.

Each name is one Auction object (the library's pattern): it validates bids, extends the end
when someone bids in the last seconds, and closes by its alarm exactly once."""

from __future__ import annotations

from durable import Env, Request, Response


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) >= 2 and segments[0] == "auction":
        return await env.AUCTIONS.get_by_name(segments[1]).fetch(request)
    return Response("Not found", 404)
