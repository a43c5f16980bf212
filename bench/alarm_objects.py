"""The object class of bench_alarms.py (bound in durable.bench-alarms.toml).

``alarm()`` records, first thing, when it started and the time it was scheduled for, in the
object's own storage (key ``fired``): the bench reads the records back from Postgres, which
works the same for in-process and subprocess workers. Each run also writes a key of its own
(``ran.<random>``, no read needed), so an alarm that ran twice shows as two such keys.
"""

from __future__ import annotations

import secrets
import time

from durable.objects import AlarmInfo, DurableObject


class BenchAlarmer(DurableObject):
    async def arm(self, when_ms: int) -> None:
        """Set this object's alarm for ``when_ms`` (epoch milliseconds)."""
        await self.ctx.storage.set_alarm(when_ms)

    async def alarm(self, info: AlarmInfo) -> None:
        started_ms = time.time() * 1000
        await self.ctx.storage.put({"fired": [info.scheduled_time, started_ms, info.retry_count],
                                    f"ran.{secrets.token_hex(6)}": started_ms})
