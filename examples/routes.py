"""All the examples as one app (the repository's own ``durable.toml`` names this function): each
request goes to the example that owns its first path segment."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from durable import Env, Request, Response

from .auction import auction_app
from .chat import chat_app
from .collab import collab_app
from .counter import counter_app
from .game import game_app
from .lock import lock_app
from .orders import orders_app
from .presence import presence_app
from .ratelimit import ratelimit_app
from .session import session_app
from .stream import stream_app

_BY_SEGMENT: dict[str, Callable[[Request, Env], Awaitable[Response]]] = {
    "": chat_app.fetch, "index.html": chat_app.fetch, "static": chat_app.fetch, "room": chat_app.fetch,
    "counter": counter_app.fetch,
    "presence": presence_app.fetch,
    "auction": auction_app.fetch,
    "lock": lock_app.fetch,
    "session": session_app.fetch,
    "api": ratelimit_app.fetch,
    "game": game_app.fetch,
    "stream": stream_app.fetch,
    "collab": collab_app.fetch,
    "orders": orders_app.fetch,
}


async def fetch(request: Request, env: Env) -> Response:
    first = next((s for s in request.path.split("/") if s), "")
    app = _BY_SEGMENT.get(first)
    if app is None:
        return Response("Not found", 404)
    return await app(request, env)
