"""Regression tests for review findings on WebSockets and the gateway (each showed a bug, now
fixed), on a real nats-server, a real Postgres, a real uvicorn gateway and real ``websockets``
clients.

The worker here binds ``Sock`` to :class:`ReviewSock` (``Sock`` plus a few behaviours the
findings need: a fetch that raises after accepting, a slow accept, an RPC that sets the
auto-response pair, a flood of frames).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from durable.client import Env
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.http import Request, Response
from durable.core.settings import Settings
from durable.core.wire import gateway_subject
from durable.objects import Worker
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers.gateway import ask, inproc_gateway
from tests.helpers.objects import Sock
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.timeout(60)


class ReviewSock(Sock):
    """``Sock`` with the extra behaviours the findings below need."""

    async def fetch(self, request: Request) -> Response:
        if request.websocket is not None and request.query_param("slow"):
            await asyncio.sleep(float(request.query_param("slow") or 0))
        if request.websocket is not None and request.query_param("boom"):
            self.ctx.accept_websocket(request.websocket, ["boom"])
            raise RuntimeError("fetch failed after accepting the socket")
        return await super().fetch(request)

    async def set_auto(self, req: str, res: str) -> None:
        self.ctx.set_websocket_auto_response(req, res)

    async def flood(self, n: int, text: str) -> int:
        sockets = await self.ctx.get_websockets()
        for ws in sockets:
            for _ in range(n):
                ws.send(text)
        return len(sockets)


StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
def review_worker(start_worker: WorkerFactory) -> StartWorker:
    """In-process workers whose ``Sock`` is :class:`ReviewSock`."""

    async def factory(s: Settings | None = None, **overrides: Any) -> Worker:
        return await start_worker(base=s, classes={"Sock": ReviewSock}, **overrides)

    return factory


async def socket_rows(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM do_sockets"))
    finally:
        await conn.close()


class FreezableProxy:
    """A TCP proxy in front of nats-server for one worker: ``freeze()`` stops forwarding (in
    both directions, connections stay open), as a stalled network path or a long GC pause
    would; ``thaw()`` lets everything held back through."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.open.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    def freeze(self) -> None:
        self.open.clear()

    def thaw(self) -> None:
        self.open.set()

    async def close(self) -> None:
        self.thaw()
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# ----- 1. the lost-gateway watch closes the sockets of a live gateway ---------------------------

async def test_a_worker_side_nats_stall_does_not_close_the_sockets_of_a_live_gateway(
        settings: Settings, config: AppConfig, env: Env) -> None:
    fast = settings.model_copy(update={"gateway_heartbeat_interval": 0.2, "gateway_timeout": 1.0})
    host, port = fast.nats_url.removeprefix("nats://").rsplit(":", 1)
    proxy = FreezableProxy(host, int(port))
    worker_nats = await proxy.start()
    worker = Worker(fast.model_copy(update={"nats_url": worker_nats}), config,
                    classes={**config.load_classes(), "Sock": ReviewSock})
    try:
        await worker.start()
        await worker.wait_ready()
        async with inproc_gateway(fast, config) as (gw, _), connect(f"{gw}/sock/stall?user=ada") as ws:
            assert await ask(ws, {"op": "echo", "v": 1}) == {"echo": 1}
            # past the watch's start-up grace: it judges gateways now (the gateway beats every 0.2 s)
            await assert_eventually(worker.gateways.link_trusted, timeout=10, message="the watch trusts its link")
            proxy.freeze()  # the worker's NATS path stalls; the gateway and its client are fine
            await asyncio.sleep(2.5)  # the stall lasts 2.5 gateway timeouts: that long is the fault
            proxy.thaw()
            # what was held back arrives now: room for the watch to (wrongly) close the socket
            await asyncio.sleep(0.5)
            sock = env.SOCKS.get_by_name("stall")
            closes = await sock.closes()
            # the gateway never went away and neither did the client: nothing may be closed
            assert closes == [], f"a live gateway's socket was closed by the watch: {closes}"
            assert len(await sock.sockets()) == 1
            assert await ask(ws, {"op": "echo", "v": 2}) == {"echo": 2}
    finally:
        await worker.stop(grace=2)
        await proxy.close()


# ----- 2. a fetch that fails after accept_websocket leaves a phantom socket ----------------------

async def test_a_fetch_that_raises_after_accepting_leaves_no_registered_socket(
        review_worker: StartWorker, settings: Settings, config: AppConfig, env: Env) -> None:
    await review_worker()
    async with inproc_gateway(settings, config) as (gw, _):
        with pytest.raises(InvalidStatus) as err:
            async with connect(f"{gw}/sock/boom?boom=1"):
                pass
        assert err.value.response.status_code == 500  # the client never got a socket
    sock = env.SOCKS.get_by_name("boom")
    assert await sock.sockets() == [], "get_websockets() lists a socket whose upgrade was refused"
    assert await socket_rows(settings) == 0


# ----- 3. a client gone while the object accepts: leaked Conn + phantom socket --------------------

async def test_a_client_gone_during_a_slow_accept_is_closed_for_the_object(
        review_worker: StartWorker, settings: Settings, config: AppConfig, env: Env) -> None:
    worker = await review_worker()
    async with inproc_gateway(settings, config) as (gw, gateway):
        port = int(gw.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /sock/slow?slow=1.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        await writer.drain()
        # the upgrade reached the object (its instance is up), which takes 1 s to accept it
        await assert_eventually(worker.live_objects, timeout=5, message="the upgrade reaches the object")
        writer.close()  # the user navigated away while the object was still accepting
        sock = env.SOCKS.get_by_name("slow")

        # the object accepts after 1 s; the gateway tries to complete the upgrade, finds the
        # client gone and closes the socket for the object
        closes = await assert_eventually(sock.closes, timeout=10, message="a websocket_close for the object")
        assert [c["code"] for c in closes] == [1006], closes
        listed = await sock.sockets()
        assert not gateway.conns and listed == [], (
            f"client gone: the gateway still holds Conns {list(gateway.conns)}, the object lists sockets {listed}")


# ----- 4. set_websocket_auto_response before the sockets were loaded ------------------------------

async def test_an_auto_response_set_after_eviction_reaches_existing_sockets(
        review_worker: StartWorker, settings: Settings, config: AppConfig, env: Env) -> None:
    worker = await review_worker(idle_timeout=0.3)
    async with inproc_gateway(settings, config) as (gw, _), connect(f"{gw}/sock/auto") as ws:
        assert await ask(ws, {"op": "echo", "v": 1}) == {"echo": 1}

        async def evicted() -> bool:
            return worker.live_objects() == 0

        await assert_eventually(evicted, timeout=5, message="the idle object is evicted")
        await env.SOCKS.get_by_name("auto").set_auto("ping", "pong")
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 3) == "pong"


# ----- 5. a socket the gateway closes itself (slow client, 1013) is never closed for the object ---

async def test_a_socket_the_gateway_gives_up_on_is_closed_for_the_object(
        review_worker: StartWorker, settings: Settings, config: AppConfig, env: Env) -> None:
    await review_worker()
    async with inproc_gateway(settings, config) as (gw, _):
        async with connect(f"{gw}/sock/flood") as ws:
            assert await ask(ws, {"op": "echo", "v": 1}) == {"echo": 1}
            sock = env.SOCKS.get_by_name("flood")
            # a client that does not read: frames go straight into the socket until the kernel's
            # buffers and then the transport's (64 KiB) are full; after that they queue in the
            # gateway, and past 10,000 queued it gives up on the client. 30 MB in events of 500 KB
            # is well past the few MB loopback buffers take.
            assert await sock.flood(500, "x" * 1000) == 1
            for _ in range(59):
                await sock.flood(500, "x" * 1000)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013

        async def forgotten() -> bool:
            return await sock.sockets() == []

        await assert_eventually(forgotten, timeout=5, message="the object forgets the socket the gateway closed")


# ----- 6. one malformed operation on dgw.<key>.<gateway> kills a socket's writer --------------------

async def test_a_malformed_gateway_operation_does_not_silence_a_socket(
        review_worker: StartWorker, settings: Settings, config: AppConfig, env: Env) -> None:
    await review_worker()
    async with inproc_gateway(settings, config) as (gw, gateway), connect(f"{gw}/sock/malformed") as ws:
        assert await ask(ws, {"op": "echo", "v": 1}) == {"echo": 1}
        (sid,) = list(gateway.conns)
        await gateway.nc.publish(gateway_subject(settings.deployment_key, gateway.id),
                                 codec.dumps({"ops": [["send", [sid], 5]]}, False))
        await gateway.nc.flush()
        # the echo comes back on the same subject, after the malformed op, through the same writer
        assert await ask(ws, {"op": "echo", "v": 2}, timeout=3) == {"echo": 2}
        writer = gateway.conns[sid].writer  # a writer task exists only while frames queue
        assert writer is None or not writer.done(), "the socket's writer task died on the malformed op"

