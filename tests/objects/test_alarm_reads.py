"""Alarm rows for a burst of wake-ups are read in a few queries, each fire getting its own row."""

from __future__ import annotations

import asyncio

import asyncpg
from durable.core.settings import Settings
from durable.objects import Worker
from durable.objects.alarm_reads import AlarmRowReader


async def test_a_burst_of_reads_shares_queries_and_each_gets_its_row(worker: Worker, settings: Settings) -> None:
    ids = [f"alarm-reads-{i:04d}" for i in range(500)]
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "INSERT INTO do_alarms (object_id, namespace, partition, scheduled_ms, due_ms, generation, retry_count) "
            "SELECT id, 'Alarmer', 0, 1000 + n, 2000 + n, 7 * n, 0 FROM unnest($1::text[]) WITH ORDINALITY AS u(id, n) "
            "WHERE n % 2 = 1", ids)
    finally:
        await conn.close()
    reader = AlarmRowReader(worker.store, max_batch=200)
    rows = await asyncio.gather(*(reader.read(i) for i in ids), reader.read(ids[0]))
    for n, (object_id, row) in enumerate(zip(ids, rows, strict=False), start=1):
        if n % 2:
            assert row is not None and (row.scheduled_ms, row.due_ms, row.generation) == (1000 + n, 2000 + n, 7 * n), \
                object_id
        else:
            assert row is None, object_id
    assert rows[-1] == rows[0]  # the same object asked twice in one burst
    assert reader.reads == 501 and reader.queries <= 4, reader.queries  # 500 distinct ids in batches of 200
    # a lone read later is answered at once, in a query of its own
    assert await reader.read(ids[0]) == rows[0] and reader.queries <= 5
    await reader.close()
