"""The object class and routing code of bench_ws.py (bound in durable.bench-ws.toml).

``BenchRoom`` accepts every WebSocket upgrade and broadcasts each frame it receives, unchanged,
to all its sockets (the sender included): the frame carries the client's sequence number and
send timestamp, so the broadcast is "a timestamped message". The gateways route with
``DURABLE_ROUTES=bench.ws_objects:fetch``: ``/room/<name>`` -> the BenchRoom named <name>.
"""

from __future__ import annotations

from typing import Any

from durable.client import Env
from durable.core.http import Request, Response
from durable.objects import DurableObject


class BenchRoom(DurableObject):
    async def fetch(self, request: Request) -> Response:
        if request.websocket is None:
            return Response("expected a WebSocket upgrade", 426)
        self.ctx.accept_websocket(request.websocket)
        return Response(None, 101)

    async def websocket_message(self, ws: Any, message: str | bytes) -> None:
        for other in await self.ctx.get_websockets():
            other.send(message)

    async def websocket_close(self, ws: Any, code: int, reason: str, was_clean: bool) -> None:
        pass

    async def sockets(self) -> int:
        return len(await self.ctx.get_websockets())


async def fetch(request: Request, env: Env) -> Response:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) == 2 and segments[0] == "room":
        return await env.ROOMS.get_by_name(segments[1]).fetch(request)
    return Response("no such route", 404)
