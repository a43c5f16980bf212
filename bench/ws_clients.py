"""The load client of bench_ws.py: holds many WebSocket client sockets, in a process of its own.

    ws_clients.py            (commands on stdin, one JSON object a line; one JSON reply a line)

- ``{"cmd": "open", "urls": [...], "n": N, "sender": bool, "deflate": bool}``: open N sockets
  (the `websockets` asyncio client; offering permessage-deflate only with ``deflate``),
  round-robin over ``urls``; with ``sender``, socket 0 (on ``urls[0]``) is the one that sends.
- ``{"cmd": "send", "first": s, "count": k, "size": b}``: the sender sends frames s..s+k-1 back
  to back, each ``"<seq>|<monotonic send time>|"`` padded to b characters; replies ``t0``, the
  clock just before the first send.
- ``{"cmd": "wait", "first": s, "last": e, "timeout": t}``: replies once every socket of this
  process received every frame s..e: ``last`` is the clock at the last of those arrivals,
  ``first`` at the first arrival of frame s.
- ``{"cmd": "stats"}``: frames out of order (per socket), sockets closed under us.
- ``{"cmd": "close"}``: close every socket, reply, exit.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process of the machine),
so arrivals in one client process compare with a send in another.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import defaultdict
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


class Clients:
    def __init__(self) -> None:
        self.sockets: list[ClientConnection] = []
        self.readers: list[asyncio.Task[None]] = []
        self.sender: ClientConnection | None = None
        self.counts: defaultdict[int, int] = defaultdict(int)
        self.lasts: dict[int, float] = {}
        self.firsts: dict[int, float] = {}
        self.out_of_order = 0
        self.closed_under_us = 0
        self.closing = False
        # the range a "wait" is for, how many deliveries it needs, how many arrived
        self.range: tuple[int, int] | None = None
        self.need = 0
        self.got = 0
        self.done = asyncio.Event()

    async def _read(self, ws: ClientConnection) -> None:
        previous = -1
        counts, lasts, firsts = self.counts, self.lasts, self.firsts
        try:
            async for message in ws:
                now = time.monotonic()
                assert isinstance(message, str)
                seq = int(message[:message.index("|")])
                if seq <= previous:
                    self.out_of_order += 1
                previous = seq
                counts[seq] += 1
                lasts[seq] = now
                if seq not in firsts:
                    firsts[seq] = now
                r = self.range
                if r is not None and r[0] <= seq <= r[1]:
                    self.got += 1
                    if self.got >= self.need:
                        self.done.set()
        except ConnectionClosed:
            pass
        if not self.closing:
            self.closed_under_us += 1

    async def open(self, urls: list[str], n: int, sender: bool, deflate: bool = False,
                   concurrency: int = 64) -> dict[str, Any]:
        started = time.monotonic()
        slots: list[ClientConnection | None] = [None] * n
        next_index = 0

        async def opener() -> None:
            nonlocal next_index
            while next_index < n:
                i = next_index
                next_index += 1
                slots[i] = await connect(urls[i % len(urls)], compression="deflate" if deflate else None,
                                         max_size=2**20, ping_interval=None, open_timeout=60)

        await asyncio.gather(*(opener() for _ in range(min(concurrency, n))))
        opened = [s for s in slots if s is not None]
        self.sockets.extend(opened)
        self.readers.extend(asyncio.create_task(self._read(ws)) for ws in opened)
        if sender:
            self.sender = opened[0]
        return {"opened": len(opened), "seconds": time.monotonic() - started}

    async def send(self, first: int, count: int, size: int) -> dict[str, Any]:
        assert self.sender is not None
        frames = [f"{seq}|" for seq in range(first, first + count)]
        t0 = time.monotonic()
        for frame in frames:
            text = f"{frame}{time.monotonic():.6f}|"
            await self.sender.send(text.ljust(size, "."))
        return {"t0": t0, "t_sent": time.monotonic()}

    async def wait(self, first: int, last: int, timeout: float) -> dict[str, Any]:
        need = len(self.sockets) * (last - first + 1)
        self.done.clear()
        self.need = need
        self.got = sum(self.counts.get(s, 0) for s in range(first, last + 1))
        self.range = (first, last)
        if self.got < need:
            try:
                await asyncio.wait_for(self.done.wait(), timeout)
            except TimeoutError:
                pass
        self.range = None
        arrivals = [self.lasts[s] for s in range(first, last + 1) if s in self.lasts]
        return {"got": self.got, "need": need, "last": max(arrivals) if arrivals else None,
                "first": self.firsts.get(first)}

    async def close(self) -> dict[str, Any]:
        self.closing = True
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        await asyncio.gather(*self.readers, return_exceptions=True)
        return {"closed": len(self.sockets)}


async def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    clients = Clients()
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line)
        try:
            name = cmd["cmd"]
            if name == "open":
                reply = await clients.open(cmd["urls"], cmd["n"], cmd.get("sender", False), cmd.get("deflate", False))
            elif name == "send":
                reply = await clients.send(cmd["first"], cmd["count"], cmd.get("size", 100))
            elif name == "wait":
                reply = await clients.wait(cmd["first"], cmd["last"], cmd.get("timeout", 60.0))
            elif name == "stats":
                reply = {"out_of_order": clients.out_of_order, "closed_under_us": clients.closed_under_us}
            elif name == "close":
                reply = await clients.close()
            else:
                reply = {"error": f"unknown command {name!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the bench, which stops
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd.get("cmd") == "close":
            return


if __name__ == "__main__":
    asyncio.run(main())
