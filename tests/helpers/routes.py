"""The routing code of the tests' gateways (``DURABLE_ROUTES=tests.helpers.routes:fetch`` for subprocesses)."""

from __future__ import annotations

from durable.client import Env
from durable.core.http import Request, Response

from examples import routes

#: /quickgame/<name>, /clockedgame/<name>: tests.helpers.objects' Game subclasses
_GAME_VARIANTS = {"quickgame": "QUICK_GAMES", "clockedgame": "CLOCKED_GAMES"}


async def fetch(request: Request, env: Env) -> Response:
    """/sock/<name> -> the Sock named <name>, /short-stream/<name> -> a ShortStream, /quickgame/...
    and /clockedgame/... -> those Games; everything else as the examples' routes."""
    segments = [s for s in request.path.split("/") if s]
    if len(segments) == 2 and segments[0] == "sock":
        return await env.SOCKS.get_by_name(segments[1]).fetch(request)
    if len(segments) >= 2 and segments[0] == "short-stream":
        return await env.SHORT_STREAMS.get_by_name(segments[1]).fetch(request)
    if len(segments) >= 2 and segments[0] in _GAME_VARIANTS:  # the Game pattern with short timeouts
        return await getattr(env, _GAME_VARIANTS[segments[0]]).get_by_name(segments[1]).fetch(request)
    return await routes.fetch(request, env)
