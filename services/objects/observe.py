"""What an operator sees of one worker: readiness, and the metrics read at scrape time.

Readiness (``/readyz``) is the worker's own view: connected to NATS, Postgres answering,
migrations applied, and holding every partition it is assigned (or having none to take); false
from the moment a stop begins, before the drain. Metrics that cost nothing per event are read
here, from the counters the parts keep, when Prometheus scrapes (see core/metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any, Protocol

import asyncpg
from nats.aio.client import Client as NatsClient
from prometheus_client.core import Metric

from ..core.health import Check
from ..core.metrics import ScrapeCache, WorkerMetrics, counter, gauge, register_callback
from .alarms import Alarms
from .flusher import Flusher
from .handover import Handover
from .outbox import Publisher
from .ownership import Ownership
from .partitions import Partitions, PartitionState


class Worker(Protocol):
    """What this module reads of a worker (worker.py implements it; parts never import it)."""

    draining: bool
    schema_ready: bool
    last_ready: bool
    nc: NatsClient
    pool: asyncpg.Pool
    classes: dict[str, type]
    metrics: WorkerMetrics
    ownership: Ownership
    partitions: Partitions
    handover: Handover
    flusher: Flusher
    alarms: Alarms
    events: Publisher

    @property
    def parts(self) -> dict[int, PartitionState]: ...

log = logging.getLogger("durable.worker")

#: how long a readiness probe waits for Postgres to answer ``SELECT 1``
PG_PING_TIMEOUT = 2.0
#: the queries behind alarms pending and storage bytes run at most this often (on scrape)
QUERY_EVERY = 15.0
STORAGE_EVERY = 60.0

_ALARMS_PENDING = "SELECT count(*) FROM do_alarms WHERE partition = ANY($1::int[])"
#: up to this many rows (Postgres' own estimate) storage bytes are summed exactly; above, from a
#: block sample of about this many rows, scaled up: the scrape never reads a whole large table
EXACT_ROWS = 200_000
_STORAGE_ROWS = "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'do_storage'::regclass"
_STORAGE_BYTES = ("SELECT namespace, sum(octet_length(key) + octet_length(value))::float8 AS bytes "
                  "FROM do_storage {sample} GROUP BY namespace")


async def readiness(worker: Worker) -> Check:
    """Why ``worker`` should not get traffic now (nothing: ready)."""
    reasons: list[str] = []
    if worker.draining:
        reasons.append("stopping (draining)")
    nc = getattr(worker, "nc", None)
    if nc is None or not nc.is_connected:
        reasons.append("not connected to NATS")
    if not worker.schema_ready:
        reasons.append("migrations not applied yet")
    else:
        try:
            async with asyncio.timeout(PG_PING_TIMEOUT):
                await worker.pool.fetchval("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any failure to answer means: not ready
            reasons.append(f"Postgres does not answer ({type(exc).__name__})")
        ownership = worker.ownership
        if not ownership.lease_valid():
            reasons.append("no valid lease on its partitions (the lock session is not up)")
        else:
            want = ownership.desired()
            serving = {p for p, s in worker.parts.items() if s.sub is not None}
            missing = want - serving
            if missing:
                reasons.append(f"serves {len(want) - len(missing)} of the {len(want)} partitions assigned to it")
    return Check(not reasons, reasons)


def scrape_cache(worker: Worker, every: float, query: str) -> ScrapeCache:
    async def alarms_pending() -> dict[str, Any]:
        parts = sorted(worker.parts)
        try:
            async with asyncio.timeout(PG_PING_TIMEOUT):
                return {"alarms_pending": await worker.pool.fetchval(_ALARMS_PENDING, parts) if parts else 0}
        except Exception as exc:  # noqa: BLE001 - a scrape shows what it has; the rest next time
            log.debug("alarms pending query failed: %s", exc)
            return {}

    async def storage_bytes() -> dict[str, Any]:
        try:
            async with asyncio.timeout(PG_PING_TIMEOUT * 5):
                estimate = await worker.pool.fetchval(_STORAGE_ROWS) or 0
                percent = 100.0 * EXACT_ROWS / estimate if estimate > EXACT_ROWS else 100.0
                sample = f"TABLESAMPLE SYSTEM ({percent:.6f})" if percent < 100.0 else ""
                rows = await worker.pool.fetch(_STORAGE_BYTES.format(sample=sample))
        except Exception as exc:  # noqa: BLE001 - as above
            log.debug("storage bytes query failed: %s", exc)
            return {}
        scale = 100.0 / percent
        return {"storage_bytes": {r["namespace"]: float(r["bytes"] or 0) * scale for r in rows}}

    return ScrapeCache(alarms_pending if query == "alarms" else storage_bytes, every)


def register(worker: Worker) -> tuple[ScrapeCache, ScrapeCache]:
    """Add the scrape-time metrics of ``worker`` to its registry; returns the query caches a
    scrape refreshes first."""
    alarms = scrape_cache(worker, QUERY_EVERY, "alarms")
    storage = scrape_cache(worker, STORAGE_EVERY, "storage")

    def build() -> Iterator[Metric]:
        if not hasattr(worker, "partitions"):  # not started yet: nothing to read
            return
        live = worker.partitions.live_by_namespace()
        yield gauge("durable_live_objects", "Live object instances in memory, by class",
                    {ns: float(live.get(ns, 0)) for ns in worker.classes})
        yield gauge("durable_partitions_owned", "Partitions this worker owns", float(len(worker.parts)))
        yield gauge("durable_partitions_assigned", "Partitions assigned to this worker by the balance",
                    float(len(worker.ownership.desired())))
        yield gauge("durable_workers_live", "Live workers this worker sees", float(len(worker.ownership.live)))
        yield gauge("durable_ready", "1 when /readyz would answer 200 (as of the last probe)",
                    1.0 if worker.last_ready else 0.0)
        h = worker.handover
        yield counter("durable_partitions_acquired", "Partitions taken (each under a new epoch)", h.acquired_count)
        yield counter("durable_handovers", "Partitions handed over to another worker (rebalancing, stopping)",
                      h.handed_over)
        yield counter("durable_partitions_lost", "Partitions stepped down from at once (lease lapsed, fenced)",
                      h.lost_count)
        yield counter("durable_epochs_fenced", "Partitions whose epoch a flush found superseded",
                      worker.flusher.fenced)
        yield counter("durable_flushes", "Group commits", worker.flusher.commits)
        yield counter("durable_evictions", "Idle instances evicted", worker.partitions.evicted)
        a = worker.alarms
        yield counter("durable_alarms_fired", "Alarm handlers that returned", a.fired)
        yield counter("durable_alarms_failed", "Alarm handlers that raised", a.failed)
        yield counter("durable_alarms_retried", "Alarm runs that were retries of a failed run", a.retried)
        yield counter("durable_alarms_abandoned", "Alarms abandoned after their last retry", a.abandoned)
        yield counter("durable_alarms_late", "Alarm runs that started over 1 s after their due time", a.late)
        yield counter("durable_events_published", "Events (ctx.emit) this worker published to JetStream",
                      worker.events.published)
        yield counter("durable_events_publish_failures", "Event publishes that failed (retried; the events "
                      "stay in the outbox)", worker.events.failures)
        if "alarms_pending" in alarms.values:
            yield gauge("durable_alarms_pending", "Alarms set in the partitions this worker owns "
                        f"(refreshed at most every {QUERY_EVERY:g} s)", float(alarms.values["alarms_pending"]))
        if "storage_bytes" in storage.values:
            yield gauge("durable_storage_bytes", "Bytes of keys and values stored, by class, whole deployment "
                        f"(every worker reports it; refreshed at most every {STORAGE_EVERY:g} s)",
                        storage.values["storage_bytes"])

    register_callback(worker.metrics.registry, build)
    return alarms, storage
