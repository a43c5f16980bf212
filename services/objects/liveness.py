"""Whether this worker can still be reached over NATS.

A worker cut from NATS but not from Postgres keeps renewing its lease: its lock session is
alive, so no other worker takes its partitions, while no request reaches them (issue 14:
objects unreachable for the whole cut, and nothing logged). nats-py notices a dead connection
only through its own pings, minutes apart by default, and a black-holed TCP connection looks
healthy meanwhile.

So the worker does a PING/PONG round trip every heartbeat (nats_private.send_ping). When none has come
back for ``timeout`` seconds, :meth:`reachable` turns false and the lease loop
(ownership.py) gives every partition up and closes its lock session: Postgres releases the
locks at once and the other workers, which see it leave, take them. It rejoins when a round
trip succeeds again.

A worker attached to a NATS node that is cut off from the rest of its cluster still gets its
PONGs, while requests from the rest of the cluster no longer reach it. So each heartbeat it also
pings the workers' micro-service (``$SRV.PING.durable``) and counts the live workers (those with
a lock session, ownership.py) that answer: hearing no more than half of them for ``peers_timeout``
seconds, with three or more live, it counts as unreachable too (the majority hears each other,
so they keep serving and take its partitions; two workers split one against one is a tie and
both keep what they have).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ..core.nats_private import send_ping
from .micro import SERVICE_NAME

log = logging.getLogger("durable.worker")


class NatsLiveness:
    """PING/PONG round trips to the NATS server; :meth:`reachable` is false once none came back
    for ``timeout`` seconds (counted from the send time of the last one that did)."""

    def __init__(self, nc: NatsClient, interval: float, timeout: float,
                 live: Callable[[], set[str]] | None = None, peers_timeout: float = 0.0, me: str = "") -> None:
        self.nc = nc
        #: our own worker id: our own micro-service answers our ping unless the ping went nowhere
        self.me = me
        self.interval = interval
        self.timeout = timeout
        #: the live workers' ids (us included), and how long we may hear too few of them (0: never checked)
        self._live = live
        self.peers_timeout = peers_timeout
        self.last_ok = time.monotonic()
        self.peers_last_ok = self.last_ok
        self._task: asyncio.Task[None] | None = None
        self._down_logged = False

    def reachable(self) -> bool:
        now = time.monotonic()
        core = now - self.last_ok < self.timeout
        peers = not self.peers_timeout or now - self.peers_last_ok < self.peers_timeout
        if not (core and peers) and not self._down_logged:
            self._down_logged = True
            if not core:
                log.warning("NATS unreachable: no PING/PONG round trip for %.1fs (DURABLE_NATS_LIVENESS_TIMEOUT)",
                            now - self.last_ok)
            else:
                log.warning("NATS unreachable: for %.1fs this worker heard no more than half of the live "
                            "workers (is its NATS node cut off from the rest of the cluster?)",
                            now - self.peers_last_ok)
        return core and peers

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nats-liveness")

    async def _run(self) -> None:
        pending: list[tuple[float, asyncio.Future[bool]]] = []  # PINGs sent, oldest first
        while True:
            sent = time.monotonic()
            try:
                # while reconnecting there is no round trip to have (nats-py's flush() would
                # return at once): not alive
                if not self.nc.is_connected:
                    raise ConnectionError("not connected (reconnecting)")
                pending.append((sent, await send_ping(self.nc)))
                # wait a little for this PONG, never cancelling it (see send_ping)
                await asyncio.wait({pending[-1][1]}, timeout=min(self.interval, self.timeout))
            except Exception as exc:  # noqa: BLE001 - unreachable, reconnecting or closed: just not alive
                log.debug("NATS round trip failed: %s: %s", type(exc).__name__, exc)
            answered = [at for at, f in pending if f.done() and not f.cancelled() and f.exception() is None]
            # PONGs come in order; a reconnect drops the queue (those futures never resolve)
            pending = [(at, f) for at, f in pending if not f.done() and sent - at < 60]
            if answered and self.nc.is_connected:
                self.last_ok = max(self.last_ok, answered[-1])
                if self.peers_timeout and self._live is not None and answered[-1] == sent:
                    await self._hear_peers(sent, self._live())
                if self._down_logged and self.reachable():
                    self._down_logged = False
                    log.warning("NATS reachable again")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - sent)))

    async def _hear_peers(self, sent: float, live: set[str]) -> None:
        """Ping the workers' micro-service; enough of the live workers answered: peers_last_ok."""
        if len(live) < 3:
            self.peers_last_ok = sent  # one or two live: hearing too few proves nothing (a tie at most)
            return
        heard: set[str] = set()

        async def answer(msg: Msg) -> None:
            try:
                heard.add(str(json.loads(msg.data)["metadata"]["worker_id"]))
            except (ValueError, KeyError, TypeError):
                pass  # not a worker's answer

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=answer)
        try:
            await self.nc.publish(f"$SRV.PING.{SERVICE_NAME}", b"", reply=inbox)
            await asyncio.sleep(min(1.0, self.interval))  # answers come within a round trip or two
        finally:
            await sub.unsubscribe()
        # not even our own answer: the ping went nowhere (a publish permission missing, say), so
        # this round tells nothing about the others; the PING/PONG check covers our connection
        if self.me not in heard:
            log.debug("no answer to our own micro-service ping: peers not counted this round")
            self.peers_last_ok = sent
            return
        # a live id is the worker id as its lock session's name holds it (possibly truncated)
        answered = sum(1 for w in live if any(h.startswith(w) for h in heard))
        if answered * 2 > len(live):
            self.peers_last_ok = sent

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
