"""The client's connection to NATS: its first connect is bounded and says what failed; once
connected, it reconnects for as long as it takes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from durable.client import Client
from durable.core.embedded import EmbeddedNats, free_port
from durable.core.errors import Unavailable
from durable.core.settings import Settings

from tests.helpers.waiting import assert_eventually


async def test_a_first_connect_to_nats_that_is_down_fails_fast_and_clearly(
        caplog: pytest.LogCaptureFixture) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.DEBUG), pytest.raises(Unavailable) as err:
        # bounded: before the fix it retried for ever (the outer 30 s only guards against a hang)
        await asyncio.wait_for(Client.connect(Settings(nats_url=url, nats_connect_timeout=2)), 30)
    message = err.value.message
    assert url in message and "DURABLE_NATS_URL" in message and "ConnectionRefusedError" in message, message
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


@pytest.mark.fault
async def test_reconnecting_after_a_first_connect_is_never_given_up(tmp_path: Path) -> None:
    port = free_port()
    async with EmbeddedNats(tmp_path / "nats", port=port, partitions=1) as first:
        client = await Client.connect(Settings(nats_url=first.url, nats_connect_timeout=1))
    try:
        # down for longer than the first connect may take: the client must not give up meanwhile
        await asyncio.sleep(3)
        assert not client.nc.is_closed
        async with EmbeddedNats(tmp_path / "nats", port=port, partitions=1):
            async def reconnected() -> bool:
                return bool(client.nc.is_connected)

            await assert_eventually(reconnected, timeout=15)
            sub = await client.nc.subscribe("ping")
            await client.nc.publish("ping", b"pong")
            assert (await sub.next_msg(timeout=5)).data == b"pong"
    finally:
        await client.close()
