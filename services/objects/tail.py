"""Live events for ``durable tail``: published only while someone is tailing.

A tailer announces itself on ``dtail.<key>.interest`` every couple of seconds (wire.py). The
worker remembers the last announcement and, for a few seconds after it, publishes each request
it answers, each alarm run and each log line an object writes during one of its events, on a
subject naming the object, so ``durable tail COUNTERS demo`` subscribes to just that object.
With nobody tailing, the cost on the request path is one comparison of two floats: tailing
is an operator's tool, never a tax on traffic.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..core import wire
from ..core.context import current_event
from ..core.tasks import TaskSet

log = logging.getLogger("durable.worker")


class Tail:
    """The worker's side of ``durable tail``."""

    def __init__(self, nc: NatsClient, deployment_key: int) -> None:
        self.nc = nc
        self.key = deployment_key
        #: events are published until this time.monotonic() (a tailer's last interest + linger)
        self.until = 0.0
        self._sub: Subscription | None = None
        self._tasks = TaskSet()
        self._handler = _ObjectLogHandler(self)

    @property
    def active(self) -> bool:
        return time.monotonic() < self.until

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(wire.tail_interest_subject(self.key), cb=self._on_interest)
        logging.getLogger().addHandler(self._handler)

    async def stop(self) -> None:
        logging.getLogger().removeHandler(self._handler)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - the connection may be closing already
                log.debug("tail: unsubscribe failed: %s", exc)
            self._sub = None
        await self._tasks.wait(2.0)

    async def _on_interest(self, msg: Msg) -> None:
        self.until = time.monotonic() + wire.TAIL_LINGER_S

    def emit(self, kind: str, namespace: str, object_id: str, **fields: Any) -> None:
        """Publish one event if someone is tailing (a no-op otherwise). Never raises."""
        if not self.active:
            return
        event = {"ts": time.time(), "kind": kind, "namespace": namespace, "object_id": object_id, **fields}
        subject = wire.tail_event_subject(self.key, namespace, object_id, kind)
        try:
            self._tasks.spawn(self._publish(subject, wire.encode_tail_event(event)))
        except RuntimeError:  # no running loop (a log line from another thread): dropped
            pass

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except Exception:  # noqa: BLE001 - a lost tail event is only a gap in an operator's view
            pass


class _ObjectLogHandler(logging.Handler):
    """Log records written while an object's event runs go to the tail as that object's lines."""

    def __init__(self, tail: Tail) -> None:
        super().__init__(level=logging.DEBUG)
        self.tail = tail

    def emit(self, record: logging.LogRecord) -> None:
        if not self.tail.active or record.name.startswith(("nats", "asyncio")):
            return
        guard = current_event.get(None)
        inst = getattr(guard, "instance", None)
        if inst is None:
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string in user code
            message = str(record.msg)
        self.tail.emit("log", inst.namespace, inst.object_id, level=record.levelname, logger=record.name,
                       message=message[:4096])
