"""Connecting with a URL that names several Postgres hosts: every host is tried at once, so a
host that accepts TCP connections but never answers (a frozen primary, a black-holed machine)
does not hold the connection until its timeout; asyncpg alone tries the hosts one after another
under one timeout and never reaches the second."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import asyncpg
import pytest
from durable.core.db import connect_writable, single_host_urls
from durable.core.embedded import EmbeddedPostgres, free_port


@pytest.fixture
def silent_host() -> Iterator[int]:
    """A port whose kernel completes the TCP handshake (listen backlog) but where nothing ever
    answers: what a frozen or unreachable primary looks like to a client."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def test_a_multi_host_url_is_split_into_one_url_per_host_keeping_the_rest() -> None:
    url = "postgresql://app:pw@db-a:5432,db-b:5433/durable?target_session_attrs=read-write"
    assert single_host_urls(url) == [
        "postgresql://app:pw@db-a:5432/durable?target_session_attrs=read-write",
        "postgresql://app:pw@db-b:5433/durable?target_session_attrs=read-write",
    ]
    assert single_host_urls("postgresql://db-a,db-b/x") == ["postgresql://db-a/x", "postgresql://db-b/x"]
    one = "postgresql://postgres@127.0.0.1:5433/postgres"
    assert single_host_urls(one) == [one]


async def test_a_silent_first_host_does_not_hold_the_connection(pg_server: EmbeddedPostgres,
                                                                silent_host: int) -> None:
    url = f"postgresql://postgres@127.0.0.1:{silent_host},127.0.0.1:{pg_server.port}/postgres"
    # asyncpg alone waits on the silent host and gives up without trying the other
    with pytest.raises(TimeoutError):
        await asyncpg.connect(url, timeout=1)
    # each host at once: the one that answers wins, long before the silent one's timeout
    conn = await asyncio.wait_for(connect_writable(url, timeout=120), 60)
    try:
        assert await conn.fetchval("SELECT inet_server_port()") == pg_server.port
    finally:
        await conn.close()


async def test_when_no_host_is_usable_the_error_names_each_one(silent_host: int) -> None:
    refused = free_port()
    url = f"postgresql://postgres@127.0.0.1:{silent_host},127.0.0.1:{refused}/postgres"
    with pytest.raises(ConnectionError) as failed:
        await connect_writable(url, timeout=0.5)
    text = str(failed.value)
    assert f"127.0.0.1:{silent_host} (TimeoutError" in text
    assert f"127.0.0.1:{refused} (ConnectionRefusedError" in text


async def test_a_host_that_said_no_is_asked_again_while_another_is_silent(
        pg_server: EmbeddedPostgres, silent_host: int) -> None:
    """What a standby promoted while the old primary hangs looks like: the third host refuses
    at first and accepts a moment later; it is found before the silent host's timeout."""
    late = free_port()
    url = f"postgresql://postgres@127.0.0.1:{silent_host},127.0.0.1:{late}/postgres"

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forwards one client to the real server (the host "promoted" at ``late``)."""
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", pg_server.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def promote_later() -> asyncio.Server:
        await asyncio.sleep(1.0)  # refused until then: the connect attempt must ask again
        return await asyncio.start_server(relay, "127.0.0.1", late)

    promotion = asyncio.ensure_future(promote_later())
    try:
        conn = await asyncio.wait_for(connect_writable(url, timeout=120), 60)
        try:
            assert await conn.fetchval("SELECT inet_server_port()") == pg_server.port
        finally:
            await conn.close()
    finally:
        server = await promotion
        server.close()
