"""The baseline of bench_ws.py: a bare `websockets` broadcast server, no NATS, in its own process.

    ws_bare_server.py <port>

Every frame a client sends goes to every connected client (the sender included) with the
library's own ``broadcast()``, which writes each frame without waiting on any one client.
Prints ``ready`` once it listens.
"""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve

CLIENTS: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    CLIENTS.add(ws)
    try:
        async for message in ws:
            broadcast(CLIENTS, message)
    finally:
        CLIENTS.discard(ws)


async def main(port: int) -> None:
    # the same frame limit as the gateway's uvicorn (1 MiB); the clients do not offer compression
    async with serve(handler, "127.0.0.1", port, max_size=1024 * 1024, backlog=2048):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
