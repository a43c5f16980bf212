"""The worker: the composition root that wires an object host's parts and starts and stops them.

Parts, each in the module named for it: ownership (the lease over partitions), handover (serving,
handing over and losing them), partitions (the live objects, eviction), dispatch (requests to
handlers and replies), flusher (group commit), alarms, the lost-gateway watch and the NATS
micro-service endpoints. Parts receive what they need when they are built; none holds the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import asyncpg
from nats.aio.client import Client as NatsClient

from ..client import Client, Env
from ..client.client import close_nats
from ..core import db
from ..core.config import AppConfig
from ..core.errors import ConfigError
from ..core.health import Check, HealthServer
from ..core.ids import IdFactory, namespace_key
from ..core.logs import ranges
from ..core.metrics import CONTENT_TYPE, WorkerMetrics, render
from ..core.settings import Settings
from ..core.streams import when_jetstream_ready
from . import observe
from .alarm_stream import check_server
from .alarms import Alarms
from .base import DurableObject
from .dispatch import Dispatcher
from .flusher import CommittedAlarm, Flusher
from .gateway_link import GatewayLink
from .gateway_watch import GatewayWatch
from .handover import Handover
from .history import History, Pruner
from .idempotency import Sweeper
from .liveness import NatsLiveness
from .local import LocalDispatcher
from .micro import MicroService
from .names import NameRecorder
from .outbox import EventStream, Publisher, event_max_bytes
from .ownership import Ownership
from .partitions import Partitions, PartitionState
from .sql import ObjectStore
from .subscriptions import Subscriptions
from .tail import Tail

log = logging.getLogger("durable.worker")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections only run our own statements and never change session state (the
    advisory locks live on the ownership connection), so the default reset query, a round
    trip on every release, is skipped."""


class Worker:
    """An object host. Use as an async context manager; ``stop()`` hands everything over cleanly."""

    def __init__(self, settings: Settings, config: AppConfig, classes: dict[str, type] | None = None,
                 audit_commits: bool | None = None) -> None:
        self.settings = settings
        self.config = config
        self.classes = classes if classes is not None else config.load_classes()
        for name, cls in self.classes.items():
            if not (isinstance(cls, type) and issubclass(cls, DurableObject)):
                raise TypeError(f"{name}: object classes must subclass DurableObject")
        check_handlers(config, self.classes)
        self.worker_id = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.audit_commits = settings.audit_commits if audit_commits is None else audit_commits
        self.ids = {
            b.class_name: IdFactory(b.class_name, namespace_key(settings.id_secret, b.identity))
            for b in config.bindings
        }
        self.ownership = Ownership(settings, self.worker_id, self._acquired, self._lost, self._hand_over,
                                   nats_reachable=self._nats_reachable)
        self.ownership.on_session_lost = self._session_lost
        self.started_at = time.time()
        #: request-path metrics in a registry of this worker's own (several may share a process)
        self.metrics = WorkerMetrics(self.classes)
        self._scrape_caches = observe.register(self)
        #: set when a stop begins: /readyz answers 503 from then on, before the drain
        self.draining = False
        self.schema_ready = False
        self.last_ready = False
        self.health: HealthServer | None = None
        if settings.health_port:
            self.health = HealthServer(settings.health_host, settings.health_port, self.readiness,
                                       self.scrape, CONTENT_TYPE)
        # built by start(), once NATS and Postgres are connected
        self.nc: NatsClient
        self.pool: asyncpg.Pool
        self.client: Client
        self.env: Env
        self.store: ObjectStore
        self.flusher: Flusher
        self.partitions: Partitions
        self.alarms: Alarms
        self.micro: MicroService
        self.names: NameRecorder
        self.tail: Tail
        self.dispatcher: Dispatcher
        self.handover: Handover
        self.history: History
        self.history_pruner: Pruner
        #: requests from a Client in this process, without NATS (``client.local = worker.local``)
        self.local: LocalDispatcher
        self.gateways: GatewayWatch
        self.nats_liveness: NatsLiveness | None = None
        self.subscriptions: Subscriptions
        self.events: Publisher

    @property
    def parts(self) -> dict[int, PartitionState]:
        """The owned partitions by number."""
        return self.partitions.states

    def live_objects(self) -> int:
        return self.partitions.live_objects()

    # ----- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.health is not None:  # first: /livez answers (and /readyz says why not) during start-up
            await self.health.start()
        try:
            await self._start()
        except BaseException:
            if self.health is not None:
                await self.health.stop()
            raise
        log.info("worker started", extra={"worker": self.worker_id, "classes": sorted(self.classes),
                                          "health_port": self.health.port if self.health else None})

    async def readiness(self) -> Check:
        """What /readyz answers (see observe.readiness)."""
        check = await observe.readiness(self)
        self.last_ready = check.ready
        return check

    async def scrape(self) -> bytes:
        """What /metrics answers: the queries behind a few gauges refresh first (rate limited)."""
        if self.schema_ready:
            for cache in self._scrape_caches:
                await cache.refresh()
        return render(self.metrics.registry)

    async def _start(self) -> None:
        settings = self.settings
        # bounded first connect with a clear error (DURABLE_NATS_CONNECT_TIMEOUT), reconnects for ever
        self.client = await Client.connect(settings, self.config, name=f"durable-worker:{self.worker_id}",
                                           pending_size=8 * 1024 * 1024)
        self.nc = self.client.nc
        try:
            check_server(self.nc)  # alarms need JetStream message schedules: refuse to start without
            self.subscriptions = Subscriptions(self.nc, self.client, self.config.subscriptions, self.ids,
                                               settings, lambda: self.parts, self.config.streams)
            # a missing stream stops start-up, before any partition; a JetStream still forming
            # (a cluster electing its meta leader) is waited for
            await when_jetstream_ready(self.subscriptions.check, "the subscriptions' streams")
            # events (ctx.emit) are published there
            await when_jetstream_ready(EventStream(self.nc, settings).ensure, "the events stream")
        except BaseException:
            await close_nats(self.nc)
            raise
        self.pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=8,
                                              reset=_keep_session, command_timeout=settings.lease_ttl,
                                              init=db.require_primary,  # never a read-only standby
                                              connect=db.connect_writable,  # see its docstring
                                              # history off: the triggers of 005_history.sql record nothing
                                              server_settings=None if settings.history else {"durable.history": "off"})
        async with self.pool.acquire() as conn:
            await db.apply_schema(conn, settings.partitions)
            await db.apply_class_migrations(conn, self.config)
        self.schema_ready = True
        self.env = Env(self.client, self.config)
        self._build()
        self.flusher.start()
        self.events.start()
        self.names.start()
        await self.tail.start()
        await self.micro.start()
        await self.alarms.start()
        await self.gateways.start()
        self.nats_liveness = NatsLiveness(self.nc, settings.heartbeat_interval,
                                          settings.nats_liveness_timeout or settings.lease_ttl / 2,
                                          live=self._live_workers, peers_timeout=settings.lease_ttl,
                                          me=self.worker_id)
        self.nats_liveness.start()
        await self.ownership.start()
        self.partitions.start_eviction(settings.idle_timeout)
        self.idempotency.start()
        self.subscriptions.start()
        self.history_pruner.start()

    def _build(self) -> None:
        """Wire the parts: each gets the few collaborators it uses."""
        settings = self.settings
        self.store = ObjectStore(self.pool)
        self.flusher = Flusher(self.store, self._fenced, self._alarms_committed,
                               audit_worker=self.worker_id if self.audit_commits else None,
                               concurrency=settings.flush_concurrency, metrics=self.metrics,
                               on_events=self._events_committed)
        self.events = Publisher(self.nc, settings, self.store, lambda: sorted(self.parts))
        self.names = NameRecorder(self.store)
        self.tail = Tail(self.nc, settings.deployment_key)
        self.partitions = Partitions(settings.partitions, self.classes, self.ids, self.env, self.store,
                                     GatewayLink(self.nc, settings.deployment_key), self.flusher,
                                     self.ownership.owns, self.names.note)
        self.partitions.event_max_bytes = event_max_bytes(settings, self.nc.max_payload)
        self.alarms = Alarms(self.nc, settings, self.partitions, self.store, self.client, self.tail)
        self.alarms.lateness = self.metrics.alarm_lateness
        self.micro = MicroService(self.nc, [b.class_name for b in self.config.bindings], self._metadata,
                                  self.partitions.live_by_namespace)
        self.dispatcher = Dispatcher(self.nc, self.partitions, self.alarms, self.micro, self.ownership.owns,
                                     settings.max_request_bytes, self.tail, self.metrics,
                                     idempotency_ttl=settings.idempotency_ttl,
                                     accepting=self.ownership.reaching_postgres,
                                     message_handlers=message_handlers(self.config))
        # expired records are never answered from: sweeping them only frees space, so often enough
        self.idempotency = Sweeper(self.store, lambda: sorted(self.parts),
                                   min(60.0, max(1.0, settings.idempotency_ttl / 4)))
        self.history = History(self.pool, settings.history, settings.history_retention)
        self.partitions.history = self.history if settings.history else None
        self.history_pruner = Pruner(self.history, lambda: 0 in self.parts,
                                     min(60.0, max(0.5, settings.history_retention / 4)))
        self.handover = Handover(self.nc, self.partitions, self.dispatcher, self.alarms, self.flusher,
                                 self.ownership.release, self._taken_over, settings.lease_ttl,
                                 deployment_key=settings.deployment_key)
        self.local = LocalDispatcher(self.partitions, self.dispatcher, self.ownership.owns, self.handover.tasks)
        self.gateways = GatewayWatch(self.nc, settings, self.worker_id, self.partitions, self.store)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the desired partitions are owned and subscribed."""
        deadline = time.monotonic() + timeout
        want: set[int] = set()
        while time.monotonic() < deadline:
            want = self.ownership.desired()
            serving = {p for p, s in self.parts.items() if s.sub is not None}
            if self.ownership.live and want <= serving:
                await self.nc.flush()
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"worker owns {len(self.parts)} of the {len(want)} partitions assigned to it "
                           f"after {timeout}s")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking requests, finish in-flight events, flush, release the partitions.
        Readiness is false from the first line (see :meth:`begin_stop`)."""
        self.begin_stop()
        log.info("worker stopping: draining its partitions",
                 extra={"worker": self.worker_id, "partitions": ranges(self.parts)})
        await self.partitions.stop_eviction()
        await self.idempotency.stop()
        await self.subscriptions.stop()  # held stream messages go back (in order) for the next puller
        await self.history_pruner.stop()
        await self.alarms.withdraw()  # alarm wake-ups go to the other workers from now on
        states = list(self.parts.values())
        # stragglers can only be on their way if requests were flowing, or someone takes over
        linger = len(self.ownership.live) > 1 or time.monotonic() - self.dispatcher.last_request < 1.0
        await self.handover.quiesce(states, grace)
        await self.flusher.stop()
        await self.events.stop()  # what is left unpublished, the next owners publish
        await self.ownership.stop()
        if self.nats_liveness is not None:
            await self.nats_liveness.stop()
        if linger:  # refuse (rather than drop) what is still routed here
            await self.handover.linger(states)
        await self.handover.tasks.wait(2.0)  # the last refusals go out
        await self.partitions.tasks.wait(2.0)
        await self.alarms.stop()
        await self.gateways.stop()
        await self.micro.stop()
        await self.tail.stop()
        await self.names.stop()
        await self.pool.close()
        await close_nats(self.nc)
        if self.health is not None:
            await self.health.stop()
        log.info("worker stopped", extra={"worker": self.worker_id})

    def begin_stop(self) -> None:
        """/readyz answers 503 from now on (a SIGTERM calls this before waiting out
        DURABLE_SHUTDOWN_DELAY and draining)."""
        self.draining = True

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----- what the parts report back ------------------------------------------------------

    async def _acquired(self, partition: int, epoch: int) -> None:
        await self.handover.acquired(partition, epoch)
        self.events.wake()  # what the previous owner committed and did not publish goes out now

    def _events_committed(self) -> None:
        self.events.wake()

    async def _taken_over(self, partition: int, epoch: int) -> bool:
        """Another worker took ``partition`` after we released it at ``epoch`` (a hand-over)."""
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT epoch > $2 FROM do_partitions WHERE partition = $1",
                                            partition, epoch, timeout=2))

    def _live_workers(self) -> set[str]:
        """The ids of the workers with a lock session at the last heartbeat (ours included)."""
        return set(self.ownership.live)

    def _nats_reachable(self) -> bool:
        return self.nats_liveness is None or self.nats_liveness.reachable()

    def _lost(self, partition: int, reason: str) -> None:
        self.subscriptions.lost(partition)  # first: a new owner may pull as soon as it acquires
        self.handover.lost(partition, reason)

    def _session_lost(self) -> None:
        """The lock session failed: the database may be gone or have moved (a standby promoted).
        The pool's idle connections are replaced on their next use instead of being tried: one to
        a primary that hangs would hold a flush for command_timeout (the lease) each."""
        pool = getattr(self, "pool", None)
        if pool is not None:
            self.partitions.tasks.spawn(pool.expire_connections(), "expire-pool")

    async def _hand_over(self, partition: int) -> None:
        await self.subscriptions.leaving(partition)  # its held messages go back before the release
        await self.handover.hand_over(partition)

    def _fenced(self, partition: int, epoch: int) -> None:
        """A flush found ``partition``'s epoch superseded: step down, unless that ownership is
        already gone (a slow batch fenced on an epoch we stepped down from and re-acquired since)."""
        if self.ownership.epochs.get(partition) == epoch:
            self.ownership.step_down(partition, "fenced: its epoch was superseded")

    def _alarms_committed(self, items: list[CommittedAlarm]) -> None:
        self.alarms.committed(items)

    def _metadata(self) -> dict[str, str]:
        return {
            "worker_id": self.worker_id,
            "partitions_owned": str(len(self.parts)),
            "partitions_total": str(self.settings.partitions),
            "live_objects": str(self.live_objects()),
            "alarms_run": str(self.alarms.fired),
            "alarms_abandoned": str(self.alarms.abandoned),
            # the worker's wall clock when it answered: `durable doctor` compares it with Postgres'
            "time_ms": str(int(time.time() * 1000)),
        }



def check_handlers(config: AppConfig, classes: dict[str, type]) -> None:
    """Every subscription's handler is a method of its binding's class (a ConfigError otherwise)."""
    for sub in config.subscriptions:
        cls = classes.get(sub.namespace)
        if cls is not None and (sub.handler in DurableObject.EVENT_HANDLERS
                                or not callable(getattr(cls, sub.handler, None))):
            raise ConfigError(f"{config.path}: subscription {sub.name!r}: {cls.__name__} (binding {sub.binding}) has "
                              f"no method {sub.handler}() to receive its messages: define "
                              f"`async def {sub.handler}(self, msg)`")


def message_handlers(config: AppConfig) -> dict[str, set[str]]:
    """Per class name, the methods its subscriptions deliver messages to (not callable over RPC)."""
    out: dict[str, set[str]] = {}
    for sub in config.subscriptions:
        out.setdefault(sub.namespace, set()).add(sub.handler)
    return out
