"""``durable status``: the live cluster as Postgres and the workers' NATS micro endpoints see it.

Workers are the live lock sessions (their presence in ``pg_stat_activity``, the same liveness
the workers balance on); partitions and epochs come from ``do_partitions``; live objects and
request counters from each worker's ``$SRV.STATS`` reply.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats

from .core.config import AppConfig
from .core.db import connect_writable
from .core.nats_options import connect_options
from .core.settings import Settings
from .objects.ownership import SESSION_PREFIX

_BY_NAMESPACE = {
    "keys": "SELECT namespace, count(*) AS n FROM do_storage GROUP BY namespace",
    "alarms": "SELECT namespace, count(*) AS n FROM do_alarms GROUP BY namespace",
    "sockets": "SELECT namespace, count(*) AS n FROM do_sockets GROUP BY namespace",
}

_WORKERS = """
SELECT a.application_name AS session, w.worker_id, w.host, w.pid, w.started_at, w.last_seen
FROM pg_stat_activity a
LEFT JOIN do_workers w ON a.application_name = left($1 || w.worker_id, 63)
WHERE a.datname = current_database() AND a.application_name LIKE $1 || '%'
ORDER BY a.application_name
"""


def _ranges(numbers: list[int]) -> str:
    """0,1,2,5,7,8 -> '0-2,5,7-8'."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and n == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ",".join(out)


async def micro_stats(settings: Settings, wait: float = 0.5) -> list[dict[str, Any]]:
    nc = await nats.connect(servers=settings.nats_servers, connect_timeout=2, max_reconnect_attempts=0,
                            **connect_options(settings))
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.STATS.durable", b"", reply=inbox)
        replies: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while (left := end - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            replies.append(json.loads(msg.data))
        return replies
    finally:
        await nc.close()


def _pattern(class_path: str) -> str:
    """The library pattern a binding uses (its module's name), or ``custom`` for the app's own."""
    module = class_path.partition(":")[0]
    prefix = "durable.objects.patterns."
    return module[len(prefix):] if module.startswith(prefix) else "custom"


def health(owned_share: float, requests: int, server_errors: int) -> float:
    """Health of a binding, 0..1: the share of partitions owned (a request to an unowned one waits
    for a hand-over) times the share of its requests the runtime served without a server error
    (status >= 500) since the workers started."""
    served = 1.0 if requests == 0 else 1.0 - server_errors / requests
    return max(0.0, min(1.0, owned_share * served))


def status_line(value: float) -> str:
    if value >= 0.99:
        return "healthy"
    if value >= 0.5:
        return "degraded"
    return "down"


def _cards(config: AppConfig, counts: dict[str, dict[str, int]], stats: list[dict[str, Any]],
           owned_share: float) -> list[dict[str, Any]]:
    """One card per binding: the specification's status card fields."""
    cards = []
    for b in config.bindings:
        endpoints = [e for s in stats for e in s.get("endpoints", []) if e.get("name") == b.class_name]
        requests = sum(int(e.get("num_requests", 0)) for e in endpoints)
        busy_ns = sum(int(e.get("processing_time", 0)) for e in endpoints)
        server_errors = sum(int((e.get("data") or {}).get("server_errors", 0)) for e in endpoints)
        value = health(owned_share, requests, server_errors)
        cards.append({
            "class": b.class_name, "pattern": _pattern(b.class_path), "binding": b.name,
            "active_instances": sum(int((e.get("data") or {}).get("live_objects", 0)) for e in endpoints)
            if stats else None,
            "websocket_conns": counts["sockets"].get(b.class_name, 0),
            "storage_keys": counts["keys"].get(b.class_name, 0),
            "alarms_active": counts["alarms"].get(b.class_name, 0),
            "requests": requests, "server_errors": server_errors,
            "avg_latency_ms": round(busy_ns / requests / 1e6, 3) if requests else None,
            "health": round(value, 4), "status": status_line(value),
        })
    return cards


async def collect(settings: Settings, config: AppConfig | None = None) -> dict[str, Any]:
    prefix = f"{SESSION_PREFIX}{settings.deployment_key}:"
    conn = await connect_writable(settings.database_url, timeout=5)
    try:
        workers = [dict(r) for r in await conn.fetch(_WORKERS, prefix)]
        partitions = [dict(r) for r in await conn.fetch(
            "SELECT partition, epoch, owner FROM do_partitions ORDER BY partition")]
        held = {r[0] for r in await conn.fetch(
            "SELECT objid::int FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = $1::int::oid "
            "AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            settings.deployment_key)}
        alarms = dict(await conn.fetchrow(
            "SELECT count(*) AS pending, count(*) FILTER (WHERE due_ms < $1) AS overdue FROM do_alarms",
            int(time.time() * 1000) - 60_000))
        sockets = dict(await conn.fetchrow(
            "SELECT count(*) AS sockets, count(DISTINCT gateway) AS gateways, count(DISTINCT object_id) AS objects "
            "FROM do_sockets"))
        counts = {name: {r["namespace"]: r["n"] for r in await conn.fetch(sql)} for name, sql in _BY_NAMESPACE.items()}
    finally:
        await conn.close()
    try:
        stats = await micro_stats(settings)
    except Exception as exc:  # noqa: BLE001 - Postgres alone still tells most of the story
        stats = []
        nats_error: str | None = f"{type(exc).__name__}: {exc}"
    else:
        nats_error = None
    by_worker = {s.get("metadata", {}).get("worker_id"): s for s in stats}
    out_workers = []
    for w in workers:
        worker_id = w["worker_id"] or w["session"][len(prefix):]
        owned = [p["partition"] for p in partitions if p["owner"] == worker_id and p["partition"] in held]
        s = by_worker.get(worker_id, {})
        endpoints = s.get("endpoints", [])
        requests = sum(e["num_requests"] for e in endpoints)
        busy_ns = sum(e["processing_time"] for e in endpoints)
        out_workers.append({
            "worker_id": worker_id, "host": w["host"], "pid": w["pid"],
            "started_at": w["started_at"].isoformat() if w["started_at"] else None,
            "partitions": owned,
            "epochs": {str(p["partition"]): p["epoch"] for p in partitions if p["partition"] in owned},
            "live_objects": int(s.get("metadata", {}).get("live_objects", 0)) if s else None,
            "alarms_run": int(s.get("metadata", {}).get("alarms_run", 0)) if s else None,
            "requests": requests if s else None,
            "errors": sum(e["num_errors"] for e in endpoints) if s else None,
            "avg_latency_ms": round(busy_ns / requests / 1e6, 3) if requests else None,
        })
    return {
        "partitions_total": settings.partitions,
        "partitions_owned": len(held),
        "unowned_partitions": sorted(set(range(settings.partitions)) - held),
        "workers": out_workers,
        "websockets": sockets["sockets"],
        "websocket_gateways": sockets["gateways"],
        "websocket_objects": sockets["objects"],
        "alarms_pending": alarms["pending"],
        "alarms_overdue": alarms["overdue"],
        "nats_error": nats_error,
        "bindings": _cards(config, counts, stats, len(held) / settings.partitions) if config is not None else [],
    }


def _bar(value: float, width: int = 20) -> str:
    filled = round(value * width)
    return "\u2588" * filled + "\u2591" * (width - filled)


def render_cards(status: dict[str, Any]) -> str:
    """The specification's status card, one per binding."""
    out: list[str] = []
    width = 44
    for card in status.get("bindings", []):
        def show(v: Any, unit: str = "") -> str:
            return "-" if v is None else f"{v}{unit}"
        rows = [("Pattern", card["pattern"]), ("Binding", card["binding"]),
                ("Active Instances", show(card["active_instances"])),
                ("WebSocket Conns", show(card["websocket_conns"])),
                ("Storage Keys", show(card["storage_keys"])), ("Alarms Active", show(card["alarms_active"])),
                ("Avg Latency", show(card["avg_latency_ms"], " ms")),
                ("Health", f"{_bar(card['health'])} {card['health'] * 100:.0f}%"), ("Status", card["status"])]
        title = f"\u250c\u2500 {card['class']} "
        out.append(title + "\u2500" * (width - len(title) + 1) + "\u2510")
        out += [f"\u2502 {name:<17}{value:<{width - 18}}\u2502" for name, value in rows]
        out.append("\u2514" + "\u2500" * width + "\u2518")
    return "\n".join(out)


def render(status: dict[str, Any]) -> str:
    lines = [f"durable status: {len(status['workers'])} worker(s), "
             f"{status['partitions_owned']}/{status['partitions_total']} partitions owned"]
    header = f"{'WORKER':<36} {'HOST':<14} {'PID':>7} {'PARTS':>5} {'OBJECTS':>7} {'REQUESTS':>9} " \
             f"{'ERRORS':>6} {'AVG MS':>7}"
    lines.append(header)
    for w in status["workers"]:
        def show(v: Any) -> str:
            return "-" if v is None else str(v)
        lines.append(f"{w['worker_id'][:36]:<36} {show(w['host'])[:14]:<14} {show(w['pid']):>7} "
                     f"{len(w['partitions']):>5} {show(w['live_objects']):>7} {show(w['requests']):>9} "
                     f"{show(w['errors']):>6} {show(w['avg_latency_ms']):>7}")
    for w in status["workers"]:
        epochs = sorted(set(w["epochs"].values()))
        span = f"epochs {epochs[0]}..{epochs[-1]}" if epochs else "no epochs"
        lines.append(f"  {w['worker_id'][:36]}: partitions {_ranges(w['partitions']) or '-'} ({span})")
    lines.append(f"alarms: {status['alarms_pending']} pending, {status['alarms_overdue']} overdue by over a "
                 f"minute; run since start: "
                 + ", ".join(f"{w['worker_id'][:36]} {'-' if w['alarms_run'] is None else w['alarms_run']}"
                             for w in status["workers"]))
    lines.append(f"websockets: {status['websockets']} open on {status['websocket_gateways']} gateway(s), "
                 f"held by {status['websocket_objects']} object(s)")
    if status["unowned_partitions"]:
        lines.append(f"unowned partitions: {_ranges(status['unowned_partitions'])}")
    if status["nats_error"]:
        lines.append(f"(NATS unreachable, no live-object counts: {status['nats_error']})")
    cards = render_cards(status)
    return "\n".join(lines) + ("\n\n" + cards if cards else "")
