"""The private nats-py calls durable relies on, against a real nats-server: if an upgrade of
nats-py renames them, this fails here rather than hand-overs failing silently."""

from __future__ import annotations

import asyncio

import nats
import pytest
from durable.core.embedded import EmbeddedNats
from durable.core.nats_private import NatsInternalsChanged, send_ping, server_info, withdraw_interest


async def test_server_info_names_the_version_and_jetstream(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        info = server_info(nc)
        assert isinstance(info["version"], str) and info["version"][0].isdigit()
        assert info["jetstream"] is True
    finally:
        await nc.close()


async def test_a_withdrawn_subscription_gets_nothing_new_but_stays_registered(nats_server: EmbeddedNats) -> None:
    # one connection publishes and subscribes: the server answers in order on it, so a message it
    # routed to the subscription arrives before the PONG of the flush that follows the publish
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("np.withdraw")
        await nc.publish("np.withdraw", b"before")
        await nc.flush()
        assert (await sub.next_msg(timeout=10)).data == b"before"
        await withdraw_interest(nc, sub)
        await nc.publish("np.withdraw", b"after")
        await nc.flush()  # had the server still routed it, the message would be here by now
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)  # the one deliberate wait: nothing may come
        await sub.unsubscribe()  # still known to the client: unsubscribing it works as usual
    finally:
        await nc.close()


async def test_missing_internals_fail_loudly() -> None:
    class Bare:
        pass

    with pytest.raises(NatsInternalsChanged, match="Client._server_info"):
        server_info(Bare())  # type: ignore[arg-type]
    with pytest.raises(NatsInternalsChanged, match="_send_unsubscribe"):
        await withdraw_interest(Bare(), Bare())  # type: ignore[arg-type]
    with pytest.raises(NatsInternalsChanged, match="_send_ping"):
        await send_ping(Bare())  # type: ignore[arg-type]


async def test_a_ping_whose_pong_is_waited_out_leaves_the_connection_working(nats_server: EmbeddedNats) -> None:
    # nc.flush(timeout) cancels its PONG future on a timeout, and the late PONG then breaks the
    # read loop; a send_ping future is never cancelled: waiting it out changes nothing
    nc = await nats.connect(nats_server.url)
    try:
        futures = [await send_ping(nc) for _ in range(3)]
        await asyncio.wait(futures, timeout=0)  # "timed out" before any PONG could arrive
        assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [True, True, True]
        sub = await nc.subscribe("np.ping")
        await nc.publish("np.ping", b"still working")
        assert (await sub.next_msg(timeout=10)).data == b"still working"
    finally:
        await nc.close()
