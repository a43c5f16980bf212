"""Operators' endpoints in tests: free ports, plain HTTP GETs, Prometheus text parsed, and a
TCP proxy that can cut a worker off from Postgres (never the session's shared server itself)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(url: str, timeout: float = 5.0) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as http:
        return await http.get(url)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """One sample's value (KeyError naming what is there when it is missing)."""
    key = (name, tuple(sorted(labels.items())))
    if key not in parsed:
        have = sorted(k for k in parsed if k[0] == name)
        raise KeyError(f"no sample {key}; samples of {name}: {have}")
    return parsed[key]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``block()`` cuts every connection and refuses new
    ones (as a dead or partitioned server would look), ``unblock()`` lets them through again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.blocked = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def block(self) -> None:
        self.blocked = True
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def unblock(self) -> None:
        self.blocked = False

    async def stop(self) -> None:
        self.block()
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if self.blocked:
                        break
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for t in (asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
