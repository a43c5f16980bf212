"""The WebSocket gateway: holds client sockets and bridges them to objects over NATS.

An upgrade request goes through the user's routing code (``routes.fetch``) like any request,
carrying the socket's id and this gateway's id in ``do-websocket-*`` headers; the object's
``fetch`` accepts it (``ctx.accept_websocket``, answering 101) or refuses it with a status the
client sees. After that each client frame is one ``ws.message`` request to the object, sent in
order (the next frame waits for the object's reply), so frames reach the object in order and
one at a time under its input gate. Objects hold no sockets: they can be evicted or fail over
while every client stays connected; the gateway retries through a failover like any caller.

Frames from objects arrive on ``dgw.<key>.<gateway>``, one NATS message per object event and
gateway, naming every socket a payload goes to. The gateway answers an object's auto-response
request itself, without waking the object, and announces itself every heartbeat so workers can
close (1006) the sockets of a gateway that died.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind
from starlette.datastructures import Address, Headers
from starlette.responses import Response as StarletteResponse
from starlette.websockets import WebSocket as StarletteWebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..client import Client, Env
from ..core import telemetry
from ..core.errors import DurableError, RemoteError, RequestTimeout, StorageError, UnknownMethod, UnknownSocket
from ..core.http import Request, Response
from ..core.settings import Settings, client_address
from ..core.tasks import TaskSet
from ..core.wire import (
    AUTO_RESPONSE_HEADER,
    GATEWAY_HEADER,
    OBJECT_HEADER,
    SOCKET_ID_HEADER,
    AutoOp,
    CloseOp,
    SendOp,
    decode_ops,
    gateway_heartbeat,
    gateway_query_subject,
    gateway_subject,
    heartbeat_subject,
    op_from_wire,
    parse_auto_response_header,
    parse_socket_query,
    socket_query_answer,
    ws_close,
    ws_message,
)
from .direct import DirectWriter, direct_writer, encode, release_handshake

log = logging.getLogger("durable.gateway")

UserFetch = Callable[[Request, Env], Awaitable[Response]]
#: frames queued for one slow client before the gateway gives up on it (close 1013, try again later)
MAX_QUEUED_FRAMES = 10_000
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(eq=False, slots=True)
class Conn:
    """One client socket held by this gateway.

    Frames go straight to the socket's transport (``direct``) while nothing is queued; a frame
    that cannot (the socket not open yet, the client not reading fast enough) is queued in
    ``pending``, and a writer task exists only while that queue drains, so that an idle socket
    costs no task and later frames never overtake queued ones."""

    socket_id: str
    ws: StarletteWebSocket
    namespace: str = ""
    object_id: str = ""
    auto: tuple[str, str] | None = None
    auto_ts: int | None = None
    #: frames waiting for the writer task, in order; None when none wait
    pending: deque[tuple[str, Any]] | None = None
    #: the socket is open (accepted): frames may leave
    opened: bool = False
    direct: DirectWriter | None = None
    #: the object closed it: it gets no websocket_close for that
    closed_by_object: bool = False
    #: the gateway closed it itself (code, reason): the object is told, as of a client's close
    gateway_close: tuple[int, str] | None = None
    writer: asyncio.Task[None] | None = None


def client_headers(headers: Headers, peer: Address | None, trusted_proxies: list[str]) -> list[tuple[str, str]]:
    """A request's headers as the user's fetch sees them: minus those only the runtime sets (a
    client must not claim a socket or an address), plus ``cf-connecting-ip``: the socket's peer,
    or with DURABLE_TRUSTED_PROXIES the client a trusted proxy names in X-Forwarded-For."""
    out = [(k, v) for k, v in headers.items()
           if k.lower() != "cf-connecting-ip" and not k.lower().startswith("do-websocket-")]
    address = client_address(peer.host if peer else None, headers.getlist("x-forwarded-for"), trusted_proxies)
    out.append(("cf-connecting-ip", address))
    return out


def _ctx(conn: Conn) -> dict[str, str]:
    """A log line's context: the socket and the object it belongs to."""
    return {"namespace": conn.namespace, "object_id": conn.object_id, "socket_id": conn.socket_id}


class Gateway:
    def __init__(self, settings: Settings, client: Client, env: Env, user_fetch: UserFetch) -> None:
        self.settings = settings
        self.client = client
        self.env = env
        self.user_fetch = user_fetch
        self.id = _UNSAFE.sub("-", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.conns: dict[str, Conn] = {}
        self._subs: list[Subscription] = []
        self._heartbeat: asyncio.Task[None] | None = None
        #: telling objects their sockets closed (retried through a failover)
        self._tasks = TaskSet()
        self.frames_in = 0
        self.frames_out = 0
        self.auto_responses = 0

    @property
    def nc(self) -> Any:
        return self.client.nc

    async def start(self) -> None:
        key = self.settings.deployment_key
        self._subs = [
            await self.nc.subscribe(gateway_subject(key, self.id), cb=self._on_ops,
                                    pending_msgs_limit=500_000, pending_bytes_limit=512 * 1024 * 1024),
            await self.nc.subscribe(gateway_query_subject(key, self.id), cb=self._on_query),
        ]
        await self._beat()
        self._heartbeat = asyncio.create_task(self._heartbeats(), name="gateway-heartbeat")

    async def stop(self, grace: float = 5.0) -> None:
        """Going away: close every client socket (1001) and tell the objects, cleanly."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        shutting = [asyncio.create_task(self._shut(c)) for c in list(self.conns.values())]
        if shutting:
            await asyncio.wait(shutting, timeout=grace)
        # the objects' close events; what is still retrying after the grace is left to the
        # lost-gateway watch
        await self._tasks.close(grace)
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass

    async def _shut(self, conn: Conn) -> None:
        try:
            await conn.ws.close(1001, "the gateway is shutting down")
        except Exception:  # noqa: BLE001 - already closed
            pass

    async def _beat(self) -> None:
        await self.nc.publish(heartbeat_subject(self.settings.deployment_key),
                              gateway_heartbeat(self.id, len(self.conns)))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.gateway_heartbeat_interval)
            try:
                await self._beat()
            except Exception as exc:  # noqa: BLE001 - NATS reconnecting: next beat
                log.debug("heartbeat failed: %s", exc)

    # ----- client sockets ------------------------------------------------------------------

    async def serve(self, ws: StarletteWebSocket) -> None:
        """One client socket, from the upgrade request to its close."""
        socket_id = uuid.uuid4().hex
        url = str(ws.url)
        url = "http" + url[2:] if url.startswith("ws") else url
        headers = client_headers(ws.headers, ws.client, self.settings.trusted_proxies)
        headers += [(SOCKET_ID_HEADER, socket_id), (GATEWAY_HEADER, self.id)]
        # registered before the object sees it: frames it sends while accepting (a welcome) may
        # arrive before its 101 does, and wait in the queue until the socket is open
        conn = Conn(socket_id, ws)
        self.conns[socket_id] = conn
        try:
            response = await self.user_fetch(Request(url, "GET", headers), self.env)
        except DurableError as exc:
            self.conns.pop(socket_id, None)
            status = 504 if isinstance(exc, RequestTimeout) else \
                503 if exc.retryable or exc.overloaded else (exc.status if exc.status < 500 else 500)
            await self._deny(ws, Response.json_response({"error": exc.to_wire()}, status))
            return
        except BaseException:
            self.conns.pop(socket_id, None)
            raise
        address = response.headers.get(OBJECT_HEADER)
        if response.status != 101 or address is None:
            self.conns.pop(socket_id, None)
            if response.status == 101:  # routing code answered 101 itself: no object took the socket
                response = Response.json_response({"error": "no object accepted this WebSocket"}, 500)
            await self._deny(ws, response)
            return
        conn.namespace, conn.object_id = address.split(".", 1)
        raw_auto = response.headers.get(AUTO_RESPONSE_HEADER)
        if raw_auto:
            conn.auto = parse_auto_response_header(raw_auto)
        # this frame lives as long as the socket: what only the upgrade needed goes now
        del url, headers, response, raw_auto, address
        code, reason, clean = 1006, "", False
        try:
            # inside the try: a client that left while the object was accepting must still be
            # closed for the object, which has registered the socket by now
            await ws.accept()
            conn.direct = direct_writer(ws._send)
            release_handshake(ws)
            conn.opened = True
            if conn.pending:  # frames the object sent while accepting
                conn.writer = asyncio.create_task(self._write(conn))
            code, reason, clean = await self._read(conn)
        except (RuntimeError, WebSocketDisconnect, OSError) as exc:
            log.info("socket %s lost while opening: %s", socket_id, exc)
        finally:
            self.conns.pop(socket_id, None)
            if conn.writer is not None:
                conn.writer.cancel()
            if conn.gateway_close is not None:  # the gateway gave up on the client (too slow)
                code, reason, clean = *conn.gateway_close, True
            if not conn.closed_by_object:
                self._tasks.spawn(self._tell_close(conn, ws_close(socket_id, code, reason, clean)), "tell-close")

    async def _deny(self, ws: StarletteWebSocket, response: Response) -> None:
        """Refuse the upgrade with the object's (or routing code's) HTTP status and body."""
        try:
            await ws.send_denial_response(StarletteResponse(response.body, response.status,
                                                            dict(response.headers.items())))
        except RuntimeError:  # the server cannot send an HTTP response here: close before accepting
            await ws.close(1008, f"refused: HTTP {response.status}")

    async def _read(self, conn: Conn) -> tuple[int, str, bool]:
        """Client frames to the object, in order; returns how the socket closed."""
        ws = conn.ws
        while True:
            try:
                message = await ws.receive()
            except (RuntimeError, WebSocketDisconnect):
                return 1006, "", False
            if message["type"] == "websocket.disconnect":
                code = int(message.get("code") or 1005)
                if "reason" not in message and code in (1005, 1006):
                    # uvicorn (websockets-sansio) reports a connection lost without a close frame
                    # as 1005 with no reason; a close frame always comes with one
                    return 1006, "", False
                return code, str(message.get("reason") or ""), code != 1006
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
            if data is None:
                continue
            self.frames_in += 1
            if conn.auto is not None and isinstance(data, str) and data == conn.auto[0]:
                conn.auto_ts = int(time.time() * 1000)
                self.auto_responses += 1
                self._deliver(conn, conn.auto[1])
                continue
            try:
                if telemetry.tracing_enabled():  # a frame starts a trace of its own
                    with telemetry.tracer.start_as_current_span(
                        f"{conn.namespace} ws.frame", kind=SpanKind.SERVER,
                        attributes={"do.namespace": conn.namespace, "do.object_id": conn.object_id,
                                    "do.socket_id": conn.socket_id},
                    ):
                        await self.client.call(conn.namespace, conn.object_id, "ws.message",
                                               ws_message(conn.socket_id, data))
                else:
                    await self.client.call(conn.namespace, conn.object_id, "ws.message",
                                           ws_message(conn.socket_id, data))
            except (RemoteError, StorageError, UnknownMethod) as exc:
                # the object's handler raised (a storage call it made refused a value, say): that
                # frame failed, the object did not; the socket stays open
                log.info("websocket_message of %s/%s raised: %s", conn.namespace, conn.object_id, exc, extra=_ctx(conn))
            except UnknownSocket:
                conn.closed_by_object = True
                await self._close(conn, 1011, "the object no longer knows this WebSocket")
                return 1011, "", True
            except DurableError as exc:  # unavailable, reset, timed out: the client should reconnect
                log.warning("frame to %s/%s failed: %s", conn.namespace, conn.object_id, exc, extra=_ctx(conn))
                await self._close(conn, 1011, f"the object is unavailable ({exc.code}); reconnect")
                return 1011, exc.code, False

    async def _close(self, conn: Conn, code: int, reason: str) -> None:
        try:
            if conn.ws.application_state != WebSocketState.DISCONNECTED:
                await conn.ws.close(code, reason[:120])
        except Exception:  # noqa: BLE001 - already gone
            pass

    async def _tell_close(self, conn: Conn, event: bytes, attempts: int = 6) -> None:
        """Tell the object its socket closed; keep trying for about a minute (through a failover),
        or it would keep a socket nobody holds."""
        for attempt in range(attempts):
            try:
                await self.client.call(conn.namespace, conn.object_id, "ws.close", event)
                return
            except RemoteError:
                return  # delivered; the object's websocket_close raised
            except Exception as exc:  # noqa: BLE001 - unavailable meanwhile: try again
                log.info("could not deliver ws.close to %s/%s (attempt %d): %s", conn.namespace, conn.object_id,
                         attempt + 1, exc, extra=_ctx(conn))
                await asyncio.sleep(min(2 ** attempt, 15))
        log.warning("gave up telling %s/%s that socket %s closed", conn.namespace, conn.object_id, conn.socket_id,
                    extra=_ctx(conn))

    # ----- frames from objects -------------------------------------------------------------

    def _deliver(self, conn: Conn, data: str | bytes, frame: bytes | None = None) -> bytes | None:
        """Send ``data`` on ``conn``: written at once when the socket can take it, else queued
        behind the frames already waiting. ``frame``: ``data`` already encoded (one encoding per
        broadcast); returns the encoding when it made one, for the next socket."""
        if conn.pending is None and conn.direct is not None and conn.gateway_close is None:
            if frame is None:
                frame = encode(data)
            if conn.direct.write(frame):
                self.frames_out += 1
                return frame
        self._enqueue(conn, "text" if isinstance(data, str) else "bytes", data)
        return frame

    def _enqueue(self, conn: Conn, kind: str, value: Any) -> None:
        if conn.gateway_close is not None:
            return  # being closed: nothing more goes out
        if conn.pending is None:
            conn.pending = deque()
        elif len(conn.pending) >= MAX_QUEUED_FRAMES:
            log.warning("client of socket %s is too slow; closing it", conn.socket_id, extra=_ctx(conn))
            conn.gateway_close = (1013, "too many frames queued: the client is too slow")
            conn.pending = deque([("close", (*conn.gateway_close, False))])
            return
        conn.pending.append((kind, value))
        if conn.opened and conn.writer is None:
            conn.writer = asyncio.create_task(self._write(conn))

    async def _write(self, conn: Conn) -> None:
        """Drain ``conn.pending`` through ASGI (it awaits the client's flow control), in order;
        then end, so that later frames are written directly again."""
        ws = conn.ws
        try:
            while conn.pending:
                kind, value = conn.pending.popleft()
                if kind == "close":
                    code, reason, by_object = value
                    conn.closed_by_object = conn.closed_by_object or by_object
                    await self._close(conn, code, reason)
                    return
                try:
                    if kind == "text":
                        await ws.send_text(value)
                    else:
                        await ws.send_bytes(value)
                    self.frames_out += 1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the client went away (the reader sees it), or a bad frame
                    if ws.application_state == WebSocketState.DISCONNECTED or \
                            ws.client_state == WebSocketState.DISCONNECTED:
                        return
                    log.warning("dropped a frame for socket %s: %s: %s", conn.socket_id, type(exc).__name__, exc,
                                extra=_ctx(conn))
        finally:
            if conn.writer is asyncio.current_task():
                conn.writer = None
                if conn.gateway_close is None or not conn.pending:
                    conn.pending = None

    async def _on_ops(self, msg: Msg) -> None:
        try:
            ops = decode_ops(msg.data)
        except Exception as exc:  # noqa: BLE001 - not ours
            log.warning("dropping a malformed gateway message: %s", exc)
            return
        for raw in ops:
            try:
                self._apply(op_from_wire(raw))
            except Exception as exc:  # noqa: BLE001 - one bad operation must not stop the others
                log.warning("dropping a malformed gateway operation %.200r: %s", raw, exc)
        if msg.reply:  # the object waits for auto-response changes to be in place
            try:
                await msg.respond(b"")
            except Exception as exc:  # noqa: BLE001 - the object logs the missing confirmation
                log.debug("could not confirm gateway operations: %s", exc)

    def _apply(self, op: SendOp | CloseOp | AutoOp) -> None:
        """One operation of gateway_message.json."""
        if isinstance(op, SendOp):
            frame: bytes | None = None  # encoded once for all the sockets it goes to
            for sid in op.socket_ids:
                conn = self.conns.get(sid)
                if conn is not None:
                    frame = self._deliver(conn, op.data, frame)
        elif isinstance(op, CloseOp):
            conn = self.conns.get(op.socket_id)
            if conn is not None:
                conn.closed_by_object = True
                self._enqueue(conn, "close", (op.code, op.reason, True))
        else:
            for sid in op.socket_ids:
                conn = self.conns.get(sid)
                if conn is not None:
                    conn.auto = op.pair

    async def _on_query(self, msg: Msg) -> None:
        try:
            conn = self.conns.get(parse_socket_query(msg.data))
            await msg.respond(socket_query_answer(None if conn is None else conn.auto_ts))
        except Exception as exc:  # noqa: BLE001 - the asker times out
            log.debug("bad gateway query: %s", exc)
