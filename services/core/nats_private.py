"""The few things durable needs from nats-py that it has no public call for.

Both reach into the client's private state. They live here, behind functions that fail loudly
with the nats-py version named, so an upstream rename breaks one test
(tests/core/test_nats_private.py) instead of silently changing behaviour; nats-py is pinned
below its next major version in pyproject.toml.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.client import __version__ as NATS_PY_VERSION
from nats.aio.subscription import Subscription


class NatsInternalsChanged(RuntimeError):
    """nats-py no longer has the private attribute durable relies on."""


def _missing(what: str) -> NatsInternalsChanged:
    return NatsInternalsChanged(f"nats-py {NATS_PY_VERSION} has no {what}; durable needs updating for it")


def server_info(nc: NatsClient) -> dict[str, Any]:
    """The INFO the server sent on connect (version, jetstream, max_payload, ...)."""
    try:
        info = nc._server_info
    except AttributeError:
        raise _missing("Client._server_info") from None
    if not isinstance(info, dict):
        raise _missing("dict Client._server_info")
    return info


async def withdraw_interest(nc: NatsClient, sub: Subscription) -> None:
    """Tell the server to route no more messages to ``sub``, but keep it registered in the
    client, so a message the server sent just before it saw the UNSUB is still delivered to the
    subscription's callback instead of being dropped (``sub.unsubscribe()`` forgets it at once).
    Raises what the connection raises (e.g. when it is closed)."""
    send = getattr(nc, "_send_unsubscribe", None)
    sid = getattr(sub, "_id", None)
    if send is None or sid is None:
        raise _missing("Client._send_unsubscribe / Subscription._id")
    await send(sid)


async def send_ping(nc: NatsClient) -> asyncio.Future[bool]:
    """Send a PING; the returned future is resolved when its PONG comes back.

    Not ``nc.flush(timeout)``: on a timeout that cancels its PONG future, which stays in the
    client's queue of PONG futures, and the late PONG then fails the read loop
    (``set_result`` on a cancelled future: "nats: encountered error"), the very stall a
    liveness check is for. Callers wait on this future without cancelling it (``asyncio.wait``);
    a reconnect drops the queue, and with it futures never resolved."""
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    try:
        send = nc._send_ping
    except AttributeError:
        raise _missing("Client._send_ping") from None
    await send(future)
    return future
