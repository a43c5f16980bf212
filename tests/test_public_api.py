"""The names users import from ``durable`` are the public API: pinned here, so a change to them is
a decision, not an accident of a refactor."""

from __future__ import annotations

import durable
import durable.errors

PUBLIC = {
    "AlarmInfo", "Client", "Context", "DurableObject", "Env", "Headers", "Message", "Request", "Response", "Storage",
    "Transaction", "WebSocket", "connect",
}

ERRORS = {
    "ConfigError", "DurableError", "InvalidId", "InvalidRequest", "ObjectReset", "Overloaded", "PayloadTooLarge",
    "ProtocolError", "RemoteError", "RequestTimeout", "StorageError", "StorageUnavailable", "Unavailable",
    "UnknownMethod", "UnknownNamespace", "UnknownSocket",
}


def test_the_public_names_are_exactly_these() -> None:
    assert set(durable.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(durable, name) is not None


def test_errors_are_one_family() -> None:
    assert set(durable.errors.__all__) == ERRORS
    for name in ERRORS:
        assert issubclass(getattr(durable.errors, name), durable.errors.DurableError)


async def test_connect_without_a_nats_url_names_the_setting(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("DURABLE_NATS_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    try:
        await durable.connect()
    except durable.errors.ConfigError as exc:
        assert "DURABLE_NATS_URL" in str(exc)
    else:
        raise AssertionError("connect() without a NATS URL did not fail")


async def test_connect_calls_objects_with_the_apps_bindings(worker, settings) -> None:
    async with durable.connect(settings.config_file, nats_url=settings.nats_url, id_secret=settings.id_secret,
                               partitions=settings.partitions) as env:
        assert await env.COUNTERS.get_by_name("api").increment(3) == 3
    env2 = await durable.connect(settings.config_file, nats_url=settings.nats_url, partitions=settings.partitions,
                                 id_secret=settings.id_secret)
    try:
        assert await env2.COUNTERS.get_by_name("api").increment(1) == 4
    finally:
        await env2.close()
