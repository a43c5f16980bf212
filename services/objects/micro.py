"""The worker's NATS micro-services registration (ADR-32): ``$SRV.PING/INFO/STATS``.

Written here rather than with ``nats.micro`` because the data plane is a set of dynamic
per-partition subscriptions, not static endpoints: each bound class is reported as one
endpoint with its own request, error and processing-time counters. The replies follow the
ADR-32 schemas exactly (``nats micro info/stats`` validates them).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..core.errors import DurableError

log = logging.getLogger("durable.worker")

SERVICE_NAME = "durable"
SERVICE_VERSION = "0.1.0"


@dataclass
class EndpointStats:
    num_requests: int = 0
    num_errors: int = 0
    #: errors of the runtime (status >= 500), not of the caller: what the status card's health counts
    server_errors: int = 0
    last_error: str = ""
    processing_ns: int = 0


class MicroService:
    def __init__(self, nc: NatsClient, namespaces: Iterable[str], metadata: Callable[[], dict[str, str]],
                 live_objects: Callable[[], dict[str, int]] | None = None) -> None:
        self.nc = nc
        self._metadata = metadata
        #: live instances by class, reported per endpoint
        self._live_objects = live_objects or dict
        self.id = uuid.uuid4().hex
        self.stats: dict[str, EndpointStats] = {name: EndpointStats() for name in namespaces}
        self._subs: list[Subscription] = []
        self.started = dt.datetime.now(dt.UTC)

    def record(self, namespace: str, seconds: float, error: DurableError | None) -> None:
        stats = self.stats.get(namespace)
        if stats is None:
            return
        stats.num_requests += 1
        stats.processing_ns += int(seconds * 1e9)
        if error is not None:
            stats.num_errors += 1
            if error.status >= 500:
                stats.server_errors += 1
            stats.last_error = f"{error.status}:{error.message}"[:500]

    def _identity(self, kind: str) -> dict[str, Any]:
        return {"type": f"io.nats.micro.v1.{kind}_response", "name": SERVICE_NAME, "id": self.id,
                "version": SERVICE_VERSION, "metadata": self._metadata()}

    def ping(self) -> dict[str, Any]:
        return self._identity("ping")

    def info(self) -> dict[str, Any]:
        return {
            **self._identity("info"),
            "description": "durable object host: Durable Objects on NATS and PostgreSQL",
            "endpoints": [
                {"name": name, "subject": f"do.{name}.*.>",
                 "metadata": {"routing": "dop.<partition>.> in queue group p<partition>"}}
                for name in self.stats
            ],
        }

    def stats_response(self) -> dict[str, Any]:
        live = self._live_objects()
        return {
            **self._identity("stats"),
            "started": self.started.isoformat().replace("+00:00", "Z"),
            "endpoints": [
                {"name": name, "subject": f"do.{name}.*.>",
                 "num_requests": s.num_requests, "num_errors": s.num_errors, "last_error": s.last_error,
                 "processing_time": s.processing_ns,
                 "average_processing_time": s.processing_ns // s.num_requests if s.num_requests else 0,
                 "data": {"server_errors": s.server_errors, "live_objects": live.get(name, 0)}}
                for name, s in self.stats.items()
            ],
        }

    async def start(self) -> None:
        nc = self.nc
        for verb, build in (("PING", self.ping), ("INFO", self.info), ("STATS", self.stats_response)):
            async def handler(msg: Msg, build: Any = build) -> None:
                await msg.respond(json.dumps(build()).encode())

            for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{SERVICE_NAME}", f"$SRV.{verb}.{SERVICE_NAME}.{self.id}"):
                self._subs.append(await nc.subscribe(subject, cb=handler))

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - the connection may be gone already
                log.debug("could not unsubscribe a micro-service endpoint: %s", exc)
        self._subs = []
