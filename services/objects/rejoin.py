"""When a worker that lost its lock session to a failure may open a new one.

A worker whose Postgres link flaps would otherwise rejoin in every short window the link is up:
the others see it live, hand it its share of the partitions, and the link goes down again with
the partitions on it, unserved until its new lease lapses too (issue 14: partitions handed back
to a worker while its Postgres link was still down). So after losing its session to a failure
the worker probes Postgres from a connection that does not count as live (another
application_name) and rejoins only once Postgres has answered every probe for a whole lease,
or at once if no other worker is live (then nobody else could serve: availability first, as
after a restart of Postgres, when every worker lost its session).
"""

from __future__ import annotations

import logging
import time

import asyncpg

from ..core.db import connect_writable, require_primary
from ..core.settings import Settings

log = logging.getLogger("durable.ownership")

PROBE_PREFIX = "durable-probe:"

_OWNERS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'durable-owner:' || $1::int || ':%'
"""


class RejoinProbe:
    """Armed when the lock session was lost to a failure; :meth:`ready` says when to rejoin."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.armed = False
        #: send time of the first probe of the current unbroken run of answered probes
        self._since: float | None = None
        self._conn: asyncpg.Connection | None = None

    def arm(self) -> None:
        if not self.armed:
            log.warning("lock session lost: rejoining once Postgres has answered for %.1fs (or no other worker "
                        "is live)", self.settings.lease_ttl, extra={"worker": self.worker_id})
        self.armed = True
        self._since = None

    async def ready(self, timeout: float) -> bool:
        """Probe once; True when this worker may open its lock session again."""
        if not self.armed:
            return True
        sent = time.monotonic()
        try:
            if self._conn is None or self._conn.is_closed():
                # as the lock session connects: every host of the URL at once, the primary only
                # (a frozen old primary must not hold the probe while a standby is promoted)
                self._conn = await connect_writable(
                    self.settings.database_url, timeout=timeout, statement_cache_size=0,
                    server_settings={"application_name": f"{PROBE_PREFIX}{self.worker_id}"[:63]})
                await require_primary(self._conn)
            others = await self._conn.fetchval(_OWNERS, self.settings.deployment_key, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - any failure breaks the run of answered probes
            log.debug("rejoin probe failed: %s: %s", type(exc).__name__, exc)
            self._since = None
            await self.close()
            return False
        if self._since is None:
            self._since = sent
        if others and time.monotonic() - self._since < self.settings.lease_ttl:
            return False
        log.warning("Postgres answered for %.1fs (%d other worker(s) live): rejoining",
                    time.monotonic() - self._since, others, extra={"worker": self.worker_id})
        self.armed = False
        await self.close()
        return True

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
