"""Giving up sooner on requests a dead owner will never answer.

A request delivered to a worker that then dies (kill -9, a lost host) or is paused past its
lease gets no reply: its caller would wait out the whole request timeout (10 s) to learn that
its outcome is unknown. The runtime knows sooner: the next owner takes the partition (within
about a lease; at once for a worker whose lock session ended) and announces it on
``dpa.<key>.<partition>`` before it subscribes (handover.py). A caller that hears it gives its
requests to that partition sent before the announcement a short grace to be answered (a worker
handing over finishes its events first, and its replies may still be on the way), then ends them
as a RequestTimeout saying the owner changed. The outcome is still unknown, as for any timeout:
a keyed call is repeated at once (idempotency keys), any other is reported.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..core.wire import acquired_wildcard

log = logging.getLogger("durable.client")

#: how long a request sent before a partition changed hands may still be answered by the
#: previous owner (a hand-over finishes its events before the next owner takes the partition)
GRACE = 1.0


class OwnerWatch:
    """The requests in flight per partition, each with the time it was sent and its timeout."""

    def __init__(self) -> None:
        self._inflight: dict[int, dict[asyncio.Timeout, float]] = {}
        self._sub: Subscription | None = None
        #: requests ended early because their partition changed hands (tests, metrics)
        self.ended = 0

    async def start(self, nc: NatsClient, deployment_key: int) -> None:
        self._sub = await nc.subscribe(acquired_wildcard(deployment_key), cb=self._on_acquired)

    def add(self, partition: int, timeout: asyncio.Timeout) -> None:
        self._inflight.setdefault(partition, {})[timeout] = asyncio.get_running_loop().time()

    def discard(self, partition: int, timeout: asyncio.Timeout) -> None:
        waiting = self._inflight.get(partition)
        if waiting is not None:
            waiting.pop(timeout, None)
            if not waiting:
                del self._inflight[partition]

    async def _on_acquired(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        if not token.isdigit():
            return
        partition = int(token)
        if partition in self._inflight:
            loop = asyncio.get_running_loop()
            loop.call_later(GRACE, self._end_before, partition, loop.time())

    def _end_before(self, partition: int, announced: float) -> None:
        """End the requests to ``partition`` sent before it was taken (still unanswered)."""
        loop = asyncio.get_running_loop()
        for timeout, sent in list(self._inflight.get(partition, {}).items()):
            if sent < announced and not timeout.expired():
                self.ended += 1
                timeout.reschedule(loop.time())
