"""The Restate side of bench/bench_http.py: the counter app as a Restate Virtual Object.

``POST /Counter/<name>/increment`` at Restate's ingress runs ``increment`` on the object keyed
``<name>``: Restate serialises the invocations of one key, as a Durable Object's input gate
does, and the state it sets is written to Restate's log (RocksDB, WAL fsync on) before the
ingress answers. Served over HTTP/2 by hypercorn, as Restate's Python SDK recommends:

    hypercorn --bind 127.0.0.1:<port> counter_service:app
"""

from __future__ import annotations

import restate

counter = restate.VirtualObject("Counter")


@counter.handler()
async def increment(ctx: restate.ObjectContext) -> dict[str, int]:
    value = (await ctx.get("value", type_hint=int) or 0) + 1
    ctx.set("value", value)
    return {"value": value}


@counter.handler(kind="shared")
async def get(ctx: restate.ObjectSharedContext) -> dict[str, int]:
    return {"value": await ctx.get("value", type_hint=int) or 0}


app = restate.app(services=[counter])
