"""A worker's health port: ``/livez``, ``/readyz`` and ``/metrics`` over plain HTTP/1.1.

A minimal asyncio responder rather than Starlette under uvicorn: the worker serves no other
HTTP, the three answers are a few bytes each, probes and scrapes come a few times a minute, and
this keeps the worker free of an ASGI server's start-up, lifespan and signal handling (uvicorn
installs its own handlers unless told not to). It reads one request line and the headers,
answers, and closes the connection (``Connection: close``): nothing to keep alive or pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger("durable.health")

#: longest request head read (request line and headers); a probe's is a few hundred bytes
MAX_HEAD = 8192
#: a client that sends nothing is dropped after this long
READ_TIMEOUT = 5.0


@dataclass
class Check:
    """Readiness: ``ready`` with the reasons it is not (empty when ready)."""

    ready: bool
    reasons: list[str]

    def body(self) -> bytes:
        return b"ok\n" if self.ready else ("not ready: " + "; ".join(self.reasons) + "\n").encode()


ReadyFn = Callable[[], Awaitable[Check]]
MetricsFn = Callable[[], Awaitable[bytes]]


def _response(status: int, reason: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class HealthServer:
    """Answers the probes of one worker on ``host:port`` (port 0: a free one, see ``port``)."""

    def __init__(self, host: str, port: int, ready: ReadyFn, metrics: MetricsFn, metrics_type: str) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._metrics = metrics
        self._metrics_type = metrics_type
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True,
                                                      limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigError(f"the health port {self.host}:{self.port} cannot be used ({exc.strerror}): set "
                              "DURABLE_HEALTH_PORT to a free port (or DURABLE_HEALTH_HOST to an address of this "
                              "machine)") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health port listening", extra={"host": self.host, "port": self.port})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def answer(self, method: str, path: str) -> bytes:
        """The response to ``method path`` (what the tests and the socket handler both use)."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _response(405, "Method Not Allowed", b"GET only\n")
        if path == "/livez":
            return _response(200, "OK", b"ok\n")
        if path == "/readyz":
            check = await self._ready()
            return _response(200 if check.ready else 503, "OK" if check.ready else "Service Unavailable",
                             check.body())
        if path == "/metrics":
            return _response(200, "OK", await self._metrics(), self._metrics_type)
        return _response(404, "Not Found", b"/livez, /readyz or /metrics\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                writer.write(_response(400, "Bad Request", b"bad request line\n"))
            else:
                response = await self.answer(parts[0], parts[1])
                writer.write(response if parts[0] != "HEAD" else response.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that went away or sent junk: nothing to answer
        except Exception as exc:  # noqa: BLE001 - a failing check must never take the worker down
            log.warning("health request failed: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                writer.write(_response(500, "Internal Server Error", f"{type(exc).__name__}\n".encode()))
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
