"""The lost-gateway watch: sockets of a gateway that died are closed for their objects.

Each gateway announces itself every ``gateway_heartbeat_interval``; the sockets of one not heard
for ``gateway_timeout`` are closed (1006, not clean) for the objects in this worker's
partitions, so presence kept by objects stays honest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..core.settings import Settings
from ..core.tasks import TaskSet
from ..core.wire import heartbeat_subject, parse_gateway_heartbeat, probe_subject
from .partitions import Partitions, PartitionState
from .sql import ObjectStore

log = logging.getLogger("durable.websockets")


class GatewayWatch:
    """Finds gateways that died: each announces itself every ``gateway_heartbeat_interval``; the
    sockets of one not heard for ``gateway_timeout`` are closed (1006, not clean) for the objects
    in this worker's partitions, so presence kept by objects stays honest.

    Not hearing a gateway only means it died if this worker's own link was carrying messages all
    that time: the worker sends itself a probe each interval, and judges gateways only once its
    probes have come back steadily for a whole ``gateway_timeout`` (after start-up, and again
    after any stall, pause or reconnect). Closing a live gateway's sockets would cut real users
    off from their objects."""

    def __init__(self, nc: NatsClient, settings: Settings, worker_id: str, partitions: Partitions,
                 store: ObjectStore) -> None:
        self.nc = nc
        self.settings = settings
        self.worker_id = worker_id
        self.partitions = partitions
        self.store = store
        self.tasks = TaskSet()
        self.seen: dict[str, float] = {}
        self._subs: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None
        #: since when this worker's own probes have been coming back without a gap (None: not now)
        self._healthy_since: float | None = None
        self._last_probe = 0.0
        self._closing: set[str] = set()
        self.closed_lost = 0

    async def start(self) -> None:
        key = self.settings.deployment_key

        async def on_heartbeat(msg: Msg) -> None:
            gateway = parse_gateway_heartbeat(msg.data)
            if gateway is not None:
                self.seen[gateway] = time.monotonic()

        async def on_probe(msg: Msg) -> None:
            now = time.monotonic()
            if self._healthy_since is None:
                self._healthy_since = now
            self._last_probe = now

        self._subs = [
            await self.nc.subscribe(heartbeat_subject(key), cb=on_heartbeat),
            await self.nc.subscribe(probe_subject(key, self.worker_id), cb=on_probe),
        ]
        self._task = asyncio.create_task(self._run(), name="gateway-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.tasks.close(grace=2.0)  # what is not closed now is closed by the next owner's watch
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - the connection may be gone already
                log.debug("could not unsubscribe the gateway watch: %s", exc)

    def live(self) -> list[str]:
        horizon = time.monotonic() - self.settings.gateway_timeout
        return [g for g, t in self.seen.items() if t >= horizon]

    def link_trusted(self) -> bool:
        """This worker's probes came back steadily for at least a gateway timeout."""
        settings = self.settings
        now = time.monotonic()
        if now - self._last_probe > 2 * settings.gateway_heartbeat_interval + 0.5:
            self._healthy_since = None  # a gap: whatever we did not hear may have been lost
        return self._healthy_since is not None and now - self._healthy_since >= settings.gateway_timeout

    async def _run(self) -> None:
        settings = self.settings
        probe = probe_subject(settings.deployment_key, self.worker_id)
        while True:
            await asyncio.sleep(settings.gateway_heartbeat_interval)
            try:
                await self.nc.publish(probe, b"")
            except Exception as exc:  # noqa: BLE001 - no link: link_trusted() notices the missing probes
                log.debug("could not send the link probe: %s", exc)
            horizon = time.monotonic() - 10 * settings.gateway_timeout
            for gateway in [g for g, t in self.seen.items() if t < horizon]:
                del self.seen[gateway]  # gone long ago: forget it
            if not self.link_trusted():
                continue
            states = {p: s for p, s in self.partitions.states.items() if not s.closing}
            if not states:
                continue
            try:
                rows = await self.store.sockets_of_lost_gateways(list(states), self.live())
            except Exception as exc:  # noqa: BLE001 - next round
                log.warning("could not look for sockets of lost gateways: %s: %s", type(exc).__name__, exc)
                continue
            for r in rows:
                state = states.get(r["partition"])
                if state is not None and r["socket_id"] not in self._closing:
                    self._closing.add(r["socket_id"])
                    self.tasks.spawn(self._close(state, r["namespace"], r["object_id"], r["socket_id"]),
                                     "close-lost-socket")

    async def _close(self, state: PartitionState, namespace: str, object_id: str, socket_id: str) -> None:
        try:
            inst = self.partitions.instance(state, namespace, object_id)

            async def lost(obj: Any) -> None:
                await inst.sockets.load()
                ws = inst.sockets.closed(socket_id)
                if ws is None:  # already gone: make sure the row is too
                    inst.sockets.forget(socket_id)
                    return
                handler = getattr(obj, "websocket_close", None)
                if handler is not None:
                    await handler(ws, 1006, "the gateway holding this WebSocket was lost", False)

            ok, value, seq = await inst.run_event(lost)
            await inst.output.wait_durable(seq)
            if ok:
                self.closed_lost += 1
            else:
                log.warning("websocket_close of %s/%s raised: %s", namespace, object_id, value)
        except Exception as exc:  # noqa: BLE001 - tried again next round
            log.info("could not close socket %s of a lost gateway: %s: %s", socket_id, type(exc).__name__, exc)
        finally:
            self._closing.discard(socket_id)
