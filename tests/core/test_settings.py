"""Settings: the development id secret is refused outside `durable dev`; the client's address is
the socket's peer unless it is one of the trusted proxies, which are a list of networks."""

from __future__ import annotations

import pytest
from durable.core.errors import ConfigError
from durable.core.settings import DEV_CHILD_ENV, DEV_ID_SECRET, Settings, client_address, refuse_dev_secret
from pydantic import ValidationError


def test_the_development_secret_is_refused_unless_dev_started_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DURABLE_ID_SECRET", raising=False)
    monkeypatch.delenv(DEV_CHILD_ENV, raising=False)
    assert Settings().id_secret == DEV_ID_SECRET  # what `durable dev` (and `durable id` there) uses
    with pytest.raises(ConfigError, match="DURABLE_ID_SECRET"):
        refuse_dev_secret(Settings(), "worker")
    refuse_dev_secret(Settings(id_secret="a-real-secret"), "worker")  # fine
    monkeypatch.setenv(DEV_CHILD_ENV, "1")  # a worker `durable dev --workers N` started
    refuse_dev_secret(Settings(), "worker")


def test_client_address_believes_forwarded_for_only_from_trusted_proxies() -> None:
    assert client_address("127.0.0.1", ["203.0.113.9"], []) == "127.0.0.1"
    assert client_address("192.0.2.1", ["203.0.113.9"], ["10.0.0.0/8"]) == "192.0.2.1"
    assert client_address("10.1.2.3", ["203.0.113.9"], ["10.0.0.0/8"]) == "203.0.113.9"
    # the right-most untrusted hop: what is left of it was written by the client
    assert client_address("10.1.2.3", ["198.51.100.1, 203.0.113.9, 10.9.9.9"], ["10.0.0.0/8"]) == "203.0.113.9"
    assert client_address("10.1.2.3", ["198.51.100.1", "203.0.113.9"], ["10.0.0.0/8"]) == "203.0.113.9"
    assert client_address("10.1.2.3", [], ["10.0.0.0/8"]) == "10.1.2.3"
    assert client_address("::ffff:10.1.2.3", ["2001:db8::1"], ["10.0.0.0/8"]) == "2001:db8::1"
    assert client_address(None, ["203.0.113.9"], ["10.0.0.0/8"]) == "unknown"


def test_trusted_proxies_setting_is_a_comma_separated_list_of_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().trusted_proxies == []
    monkeypatch.setenv("DURABLE_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1,,2001:db8::/32")
    assert Settings().trusted_proxies == ["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"]
    monkeypatch.setenv("DURABLE_TRUSTED_PROXIES", "10.0.0.0/8,my-proxy")
    with pytest.raises(ValidationError, match="'my-proxy' is not an IP address or CIDR"):
        Settings()
