"""``durable doctor``: what a deployment needs, checked one by one, each with what to fix.

Checks: the app's config, NATS (reachable, version 2.12 or later with JetStream, the partition
mapping raw publishers need, the ping settings that make a paused worker lose its
subscriptions quickly, when the monitoring port tells them), Postgres (reachable, version,
schema applied), the workers (how many answer, clock skew against Postgres).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from ..client import Client
from ..core import wire
from ..core.config import AppConfig
from ..core.db import connect_writable
from ..core.errors import Unavailable
from ..core.nats_private import server_info
from ..core.settings import Settings
from ..objects.alarm_rules import schedule_support_problem
from ..status import micro_stats

#: clocks further apart than this make alarm times and lease reports misleading
MAX_SKEW_MS = 1000
#: the nats-server settings infra/nats-server.conf carries (README: Running several workers)
WANT_PING_INTERVAL_S = 2
WANT_PING_MAX = 2
MIN_POSTGRES = 14


@dataclass
class Check:
    name: str
    ok: bool | None  #: None: could not tell (a warning, not a failure)
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "warn"}[self.ok]
        text = f"[{mark}] {self.name}: {self.detail}"
        return text + (f"\n       fix: {self.fix}" if self.fix and self.ok is not True else "")


async def run(settings: Settings, config: AppConfig, monitor_url: str | None = None) -> list[Check]:
    checks = [Check("config", True, f"{settings.config_file}: {len(config.bindings)} bindings")]
    nats_checks = await _nats(settings, monitor_url)
    checks += nats_checks
    pg_offset_ms, pg_checks = await _postgres(settings)
    checks += pg_checks
    if nats_checks[0].ok is not False:
        checks += await _workers(settings, pg_offset_ms)
    return checks


async def _nats(settings: Settings, monitor_url: str | None) -> list[Check]:
    try:
        client = await Client.connect(settings.model_copy(update={"nats_connect_timeout": 3.0}))
    except Unavailable as exc:
        return [Check("nats", False, f"cannot connect to {settings.nats_url}: {exc.message.split(': ', 1)[-1]}",
                      "start nats-server (2.12+, -js) or set DURABLE_NATS_URL")]
    nc = client.nc
    checks: list[Check] = []
    try:
        info = server_info(nc)
        version = str(info.get("version", "?"))
        problem = schedule_support_problem(version, bool(info.get("jetstream")))
        where = nc.connected_url.netloc if nc.connected_url else "?"
        jetstream = "JetStream on" if info.get("jetstream") else "JetStream off"
        checks.append(Check("nats", problem is None, f"nats-server {version} at {where}, {jetstream}", problem or ""))
        checks.append(await _mapping(nc, settings))
        checks.append(await asyncio.to_thread(_ping_settings, monitor_url or _default_monitor(settings)))
    finally:
        await client.close()
    return checks


async def _mapping(nc: Any, settings: Settings) -> Check:
    """A raw publish on ``do.<ns>.<id>.<verb>`` must arrive on the partition subject."""
    object_id = "0" * 64
    partition = wire.partition_of(object_id, settings.partitions)
    sub = await nc.subscribe(wire.request_subject(partition, "DoctorCheck", object_id, "probe"))
    await nc.publish(f"{wire.CANONICAL_PREFIX}.DoctorCheck.{object_id}.probe", b"")
    try:
        await sub.next_msg(timeout=1.0)
        return Check("partition mapping", True, f"do.* maps to dop.<partition> for {settings.partitions} partitions")
    except Exception:  # noqa: BLE001 - nothing arrived
        return Check("partition mapping", None, "do.<class>.<id>.> is not mapped to the partition subjects: "
                     "raw publishers (nats req) get no answer; durable's own clients do not need it",
                     f"add the mapping of infra/nats-server.conf with P = {settings.partitions}")
    finally:
        await sub.unsubscribe()


def _default_monitor(settings: Settings) -> str:
    host = urlsplit(settings.nats_servers[0]).hostname or "127.0.0.1"
    return f"http://{host}:8222"


def _ping_settings(monitor_url: str) -> Check:
    try:
        with urllib.request.urlopen(f"{monitor_url.rstrip('/')}/varz", timeout=2) as answer:
            varz = json.loads(answer.read())
    except Exception:  # noqa: BLE001 - no monitoring port: cannot tell
        return Check("nats ping settings", None, f"could not read {monitor_url}/varz (monitoring port off?)",
                     f'make sure the server has ping_interval: "{WANT_PING_INTERVAL_S}s" and ping_max: '
                     f"{WANT_PING_MAX} (infra/nats-server.conf), or pass --monitor URL")
    interval_ns = int(varz.get("ping_interval", 0))
    interval_s = interval_ns / 1e9 if interval_ns > 1000 else float(interval_ns)
    ping_max = int(varz.get("ping_max", 0))
    ok = 0 < interval_s <= WANT_PING_INTERVAL_S and 0 < ping_max <= WANT_PING_MAX
    return Check("nats ping settings", ok, f"ping_interval {interval_s:g}s, ping_max {ping_max}",
                 f'set ping_interval: "{WANT_PING_INTERVAL_S}s" and ping_max: {WANT_PING_MAX}: a paused worker '
                 "otherwise keeps its subscriptions for minutes")


async def _postgres(settings: Settings) -> tuple[int | None, list[Check]]:
    try:
        conn = await connect_writable(settings.database_url, timeout=5)
    except Exception as exc:  # noqa: BLE001 - every connect failure is the one finding
        return None, [Check("postgres", False, f"cannot connect: {type(exc).__name__}: {exc}",
                            "start PostgreSQL or set DURABLE_DATABASE_URL")]
    try:
        version = conn.get_server_version()
        checks = [Check("postgres", version.major >= MIN_POSTGRES, f"PostgreSQL {version.major}.{version.minor}",
                        f"use PostgreSQL {MIN_POSTGRES} or later")]
        try:
            applied = [r["name"] for r in await conn.fetch("SELECT name FROM do_schema_migrations ORDER BY name")]
            checks.append(Check("schema", bool(applied), "applied: " + (", ".join(applied) or "none"),
                                "start a worker once: it applies the schema"))
        except asyncpg.UndefinedTableError:
            checks.append(Check("schema", False, "not applied", "start a worker once: it applies the schema"))
        before = time.time()
        pg_now = await conn.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
        after = time.time()
        offset = int(pg_now - (before + after) / 2 * 1000)  # Postgres' clock minus this host's
        checks.append(Check("clock (this host)", abs(offset) <= MAX_SKEW_MS,
                            f"{-offset:+d} ms against Postgres", "run NTP (chrony) on every host"))
        return offset, checks
    finally:
        await conn.close()


async def _workers(settings: Settings, pg_offset_ms: int | None) -> list[Check]:
    asked_ms = time.time() * 1000  # the workers answer within milliseconds of this
    try:
        stats = await micro_stats(settings)
    except Exception as exc:  # noqa: BLE001 - NATS already reported above
        return [Check("workers", None, f"could not ask the workers: {exc}")]
    if not stats:
        return [Check("workers", False, "no worker answered $SRV.STATS.durable",
                      "start `durable worker` (same DURABLE_NATS_URL, DURABLE_DATABASE_URL)")]
    checks = [Check("workers", True, f"{len(stats)} answering")]
    if pg_offset_ms is None:
        return checks
    for s in stats:
        meta = s.get("metadata") or {}
        if "time_ms" not in meta:
            continue
        # against Postgres' clock when they were asked, from the offset measured above
        skew = int(int(meta["time_ms"]) - (asked_ms + pg_offset_ms))
        checks.append(Check(f"clock (worker {meta.get('worker_id', '?')})", abs(skew) <= MAX_SKEW_MS + 500,
                            f"about {skew:+d} ms against Postgres", "run NTP (chrony) on every host"))
    return checks
