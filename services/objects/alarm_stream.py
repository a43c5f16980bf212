"""The JetStream side of alarms: one work-queue stream of schedules and fires per deployment.

``set_alarm`` commits a ``do_alarms`` row; then the worker publishes a schedule on the object's
own subject (``Nats-Schedule: @at <ms>``), so a new alarm replaces the old one; at the due time
the server puts the fire message on the object's fire subject in the same stream, where one
durable consumer, delivered to all workers as a queue group, holds it until it is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from ..core.errors import ConfigError
from ..core.nats_private import server_info
from ..core.settings import Settings
from ..core.streams import put_stream
from ..core.wire import ALARM_CONSUMER, AlarmSubjects, alarm_schedule_body
from .alarm_rules import AlarmRow, at_header, schedule_support_problem

log = logging.getLogger("durable.alarms")

#: a fire is redelivered if not acknowledged in this long (the owner died holding it)
ACK_WAIT = 30.0


def check_server(nc: NatsClient) -> None:
    """Alarms need message schedules: nats-server 2.12 or later with JetStream enabled."""
    info = server_info(nc)
    problem = schedule_support_problem(str(info.get("version", "?")), bool(info.get("jetstream")))
    if problem is not None:
        raise ConfigError(problem)


class AlarmStream:
    """The stream, the fires consumer, and schedule publishing."""

    CONSUMER = ALARM_CONSUMER

    def __init__(self, nc: NatsClient, settings: Settings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.subjects = AlarmSubjects(settings.deployment_key)
        self.name = self.subjects.stream

    @property
    def deliver_subject(self) -> str:
        return self.subjects.deliver

    async def ensure_stream(self) -> None:
        config = StreamConfig(
            name=self.name, subjects=[self.subjects.schedules, self.subjects.fires],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            num_replicas=self.settings.alarm_replicas, allow_msg_schedules=True,
            description="durable alarms: a schedule per object (s), fired wake-ups (f)",
        )
        await put_stream(self.js, config)

    async def ensure_consumer(self) -> None:
        """One durable push consumer on the fire subjects (never on the schedule subjects, whose
        acknowledgement would delete, that is cancel, the schedules of a work queue), delivered
        to a queue group of every worker. Measured: nats-server delivers a burst of fires 3-4x
        slower through one consumer per partition (256) than through one consumer."""
        await self.js.add_consumer(self.name, ConsumerConfig(
            durable_name=self.CONSUMER, deliver_subject=self.deliver_subject, deliver_group=self.CONSUMER,
            filter_subject=self.subjects.fires, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=ACK_WAIT, max_ack_pending=100_000,
        ))

    async def publish(self, items: list[tuple[int, str, str, AlarmRow]]) -> None:
        """Publish (replace) the schedules of ``(partition, object id, namespace, row)``."""
        futures = []
        for partition, object_id, namespace, row in items:
            futures.append(await self.js.publish_async(
                self.subjects.schedule(partition, object_id),
                alarm_schedule_body(namespace, row.generation),
                headers={"Nats-Schedule": at_header(row.due_ms),
                         "Nats-Schedule-Target": self.subjects.fire(partition, object_id)},
            ))
        if futures:
            await asyncio.gather(*futures)
