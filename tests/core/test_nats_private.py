"""The two private nats-py calls durable relies on, against a real nats-server: if an upgrade of
nats-py renames them, this fails here rather than hand-overs failing silently."""

from __future__ import annotations

import asyncio

import nats
import pytest
from durable.core.embedded import EmbeddedNats
from durable.core.nats_private import NatsInternalsChanged, server_info, withdraw_interest


async def test_server_info_names_the_version_and_jetstream(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        info = server_info(nc)
        assert isinstance(info["version"], str) and info["version"][0].isdigit()
        assert info["jetstream"] is True
    finally:
        await nc.close()


async def test_a_withdrawn_subscription_gets_nothing_new_but_stays_registered(nats_server: EmbeddedNats) -> None:
    nc, other = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    got: list[bytes] = []
    arrived = asyncio.Event()

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        got.append(msg.data)
        arrived.set()

    try:
        sub = await nc.subscribe("np.test", cb=on_msg)
        await nc.flush()
        await other.publish("np.test", b"before")
        await other.flush()
        await asyncio.wait_for(arrived.wait(), 5)
        await withdraw_interest(nc, sub)
        await nc.flush()  # the server has the UNSUB once the PONG is back
        await other.publish("np.test", b"after")
        await other.flush()
        await nc.flush()  # anything routed to nc before this PONG would have arrived by now
        assert got == [b"before"], "the server still routes to a withdrawn subscription"
        await sub.unsubscribe()  # still known to the client: unsubscribing it works as usual
    finally:
        await nc.close()
        await other.close()


async def test_missing_internals_fail_loudly() -> None:
    class Bare:
        pass

    with pytest.raises(NatsInternalsChanged, match="Client._server_info"):
        server_info(Bare())  # type: ignore[arg-type]
    with pytest.raises(NatsInternalsChanged, match="_send_unsubscribe"):
        await withdraw_interest(Bare(), Bare())  # type: ignore[arg-type]
