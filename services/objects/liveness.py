"""Whether this worker can still be reached over NATS.

A worker cut from NATS but not from Postgres keeps renewing its lease: its lock session is
alive, so no other worker takes its partitions, while no request reaches them (issue 14:
objects unreachable for the whole cut, and nothing logged). nats-py notices a dead connection
only through its own pings, minutes apart by default, and a black-holed TCP connection looks
healthy meanwhile.

So the worker does a PING/PONG round trip (``nc.flush``) every heartbeat. When none has come
back for ``timeout`` seconds, :meth:`reachable` turns false and the lease loop
(ownership.py) gives every partition up and closes its lock session: Postgres releases the
locks at once and the other workers, which see it leave, take them. It rejoins when a round
trip succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NatsClient

log = logging.getLogger("durable.worker")


class NatsLiveness:
    """PING/PONG round trips to the NATS server; :meth:`reachable` is false once none came back
    for ``timeout`` seconds (counted from the send time of the last one that did)."""

    def __init__(self, nc: NatsClient, interval: float, timeout: float) -> None:
        self.nc = nc
        self.interval = interval
        self.timeout = timeout
        self.last_ok = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._down_logged = False

    def reachable(self) -> bool:
        ok = time.monotonic() - self.last_ok < self.timeout
        if not ok and not self._down_logged:
            self._down_logged = True
            log.warning("NATS unreachable: no PING/PONG round trip for %.1fs (DURABLE_NATS_LIVENESS_TIMEOUT)",
                        time.monotonic() - self.last_ok)
        return ok

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nats-liveness")

    async def _run(self) -> None:
        while True:
            sent = time.monotonic()
            try:
                await self.nc.flush(timeout=max(1, round(self.timeout)))
            except Exception as exc:  # noqa: BLE001 - unreachable, reconnecting or closed: just not alive
                log.debug("NATS round trip failed: %s: %s", type(exc).__name__, exc)
            else:
                self.last_ok = sent
                if self._down_logged:
                    self._down_logged = False
                    log.warning("NATS reachable again")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - sent)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
