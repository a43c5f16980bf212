"""TLS to NATS and to Postgres, with certificates made at test time: a worker and a client run
end to end over TLS only, and a process that does not trust the servers' CA is refused with an
error that says what to set."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from durable.client import Client, Env
from durable.core.config import AppConfig
from durable.core.errors import ConfigError, Unavailable
from durable.core.nats_options import connect_options

from tests.helpers.secure import Certs, SecureNats, TlsPostgres, make_certs, user_settings
from tests.helpers.settings import PARTITIONS, make_settings
from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.slow


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


@pytest.fixture
async def tls_postgres(tmp_path: Path, certs: Certs) -> AsyncIterator[TlsPostgres]:
    server = TlsPostgres(tmp_path / "pg", certs)
    await server.start()
    yield server
    await server.stop()


async def _nats(tmp_path: Path, certs: Certs, **options: bool) -> SecureNats:
    server = SecureNats(tmp_path / "nats", PARTITIONS, certs=certs, **options)
    await server.start()
    return server


@pytest.fixture
async def tls_nats(tmp_path: Path, certs: Certs) -> AsyncIterator[SecureNats]:
    server = await _nats(tmp_path, certs)
    yield server
    await server.stop()


async def test_a_worker_and_a_client_run_over_tls_to_nats_and_postgres(
        tls_nats: SecureNats, tls_postgres: TlsPostgres, certs: Certs, start_worker: WorkerFactory,
        config: AppConfig) -> None:
    assert tls_nats.url.startswith("tls://") and "sslmode=verify-full" in tls_postgres.url
    settings = make_settings(tls_nats.url, tls_postgres.url, nats_tls_ca=str(certs.ca))
    worker = await start_worker(base=settings)
    client = await Client.connect(settings, config)
    try:
        counter = Env(client, config).COUNTERS.get_by_name("tls")
        assert await counter.increment(4) == 4
        assert await counter.increment(1) == 5
        # the server takes TLS connections only (the next test: a plain one is refused)
        for nc in (client.nc, worker.nc):
            assert nc.connected_url is not None and nc.connected_url.scheme == "tls"
        conn = await asyncpg.connect(tls_postgres.url)
        try:
            # the worker's pool and lock session, and this connection: every one encrypted
            rows = await conn.fetch("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                                    "WHERE a.backend_type = 'client backend'")
            assert len(rows) >= 3 and all(r["ssl"] for r in rows)
            stored = await conn.fetchval("SELECT count(*) FROM do_storage WHERE namespace = 'Counter'")
            assert stored == 1
        finally:
            await conn.close()
    finally:
        await client.close()


async def test_postgres_refuses_plain_connections_and_the_client_refuses_a_server_it_cannot_verify(
        tls_postgres: TlsPostgres, certs: Certs) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(f"{tls_postgres.plain_url}?sslmode=disable")
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(f"{tls_postgres.plain_url}?sslmode=verify-full&sslrootcert={certs.other_ca}")


async def test_a_client_without_the_ca_is_refused_with_what_to_set(tls_nats: SecureNats, certs: Certs,
                                                                   tls_postgres: TlsPostgres) -> None:
    settings = make_settings(tls_nats.url, tls_postgres.url, nats_connect_timeout=3.0)
    with pytest.raises(Unavailable, match="not trusted: set DURABLE_NATS_TLS_CA"):
        await Client.connect(settings)
    with pytest.raises(Unavailable, match="not trusted: set DURABLE_NATS_TLS_CA"):
        await Client.connect(settings.model_copy(update={"nats_tls_ca": str(certs.other_ca)}))
    # a nats:// URL to a server that requires TLS: the same, and the plain connection goes nowhere
    plain = settings.model_copy(update={"nats_url": tls_nats.url.replace("tls://", "nats://")})
    with pytest.raises(Unavailable, match="DURABLE_NATS_TLS_CA"):
        await Client.connect(plain)


async def test_a_server_that_verifies_clients_takes_only_a_client_certificate_it_signed(
        tmp_path: Path, certs: Certs, config: AppConfig) -> None:
    server = await _nats(tmp_path, certs, verify_clients=True)
    try:
        settings = make_settings(server.url, "", nats_tls_ca=str(certs.ca), nats_connect_timeout=3.0)
        with pytest.raises(Unavailable, match="cannot connect to NATS"):
            await Client.connect(settings)
        mutual = settings.model_copy(update={"nats_tls_cert": str(certs.client_cert),
                                             "nats_tls_key": str(certs.client_key)})
        client = await Client.connect(mutual, config)
        await client.nc.flush()
        await client.close()
    finally:
        await server.stop()


async def test_auth_and_tls_together_on_the_shipped_users(tmp_path: Path, certs: Certs,
                                                          config: AppConfig) -> None:
    server = SecureNats(tmp_path / "nats", PARTITIONS, auth=True, certs=certs)
    await server.start()
    try:
        settings = user_settings(make_settings(server.url, "", nats_tls_ca=str(certs.ca)), "app")
        client = await Client.connect(settings, config)
        await client.nc.flush()
        await client.close()
    finally:
        await server.stop()


def test_tls_settings_that_cannot_work_are_config_errors(certs: Certs) -> None:
    base = make_settings("tls://127.0.0.1:4222", "")
    with pytest.raises(ConfigError, match="DURABLE_NATS_TLS_CERT and DURABLE_NATS_TLS_KEY go together"):
        connect_options(base.model_copy(update={"nats_tls_cert": str(certs.client_cert)}))
    with pytest.raises(ConfigError, match="DURABLE_NATS_TLS_CA: '/nowhere/ca.pem' is not a file"):
        connect_options(base.model_copy(update={"nats_tls_ca": "/nowhere/ca.pem"}))
    with pytest.raises(ConfigError, match="cannot load the client certificate"):
        connect_options(base.model_copy(update={"nats_tls_cert": str(certs.client_cert),
                                                "nats_tls_key": str(certs.server_key)}))
    assert "tls" in connect_options(base)  # a tls:// URL: TLS with the system's CAs
    assert "tls" not in connect_options(base.model_copy(update={"nats_url": "nats://127.0.0.1:4222"}))
