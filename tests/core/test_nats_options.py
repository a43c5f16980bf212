"""The NATS credentials, reply prefix and TLS settings, as every process's connection gets them
(no server needed: tests/deploy/test_nats_auth.py and test_tls.py run them against servers)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from durable.core.errors import ConfigError
from durable.core.nats_options import connect_hint, connect_options
from durable.core.settings import Settings
from pydantic import ValidationError

from tests.helpers.settings import make_settings


def settings(url: str = "nats://127.0.0.1:4222", **values: object) -> Settings:
    return make_settings(url, "", **values)


def test_anonymous_by_default_with_the_standard_inbox_and_no_tls() -> None:
    assert connect_options(settings()) == {"inbox_prefix": "_INBOX"}


def test_a_user_a_token_or_a_creds_file(tmp_path: Path) -> None:
    options = connect_options(settings(nats_user="worker", nats_password="pw", nats_inbox_prefix="_INBOX.worker"))
    assert (options["user"], options["password"], options["inbox_prefix"]) == ("worker", "pw", "_INBOX.worker")
    assert connect_options(settings(nats_token="tok"))["token"] == "tok"
    creds = tmp_path / "app.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    assert connect_options(settings(nats_creds=str(creds)))["user_credentials"] == str(creds)


def test_secrets_are_not_shown_with_the_settings() -> None:
    s = settings(nats_user="worker", nats_password="very-secret", nats_token="")
    assert "very-secret" not in repr(s) and "very-secret" not in str(s.model_dump())


def test_settings_that_cannot_work_are_config_errors_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="DURABLE_NATS_PASSWORD is set but DURABLE_NATS_USER is not"):
        connect_options(settings(nats_password="x"))
    with pytest.raises(ConfigError, match="one way to authenticate"):
        connect_options(settings(nats_user="u", nats_token="t"))
    with pytest.raises(ConfigError, match="DURABLE_NATS_CREDS: '/nowhere/app.creds' is not a file"):
        connect_options(settings(nats_creds="/nowhere/app.creds"))
    with pytest.raises(ConfigError, match="DURABLE_NATS_TLS_CA: '/nowhere/ca.pem' is not a file"):
        connect_options(settings(nats_tls_ca="/nowhere/ca.pem"))
    with pytest.raises(ConfigError, match="DURABLE_NATS_TLS_CERT and DURABLE_NATS_TLS_KEY go together"):
        connect_options(settings(nats_tls_key="/some/key.pem"))


@pytest.mark.parametrize("prefix", ["", "_INBOX.", "_INBOX.a b", "_INBOX.*", "_INBOX.>", "a..b"])
def test_an_inbox_prefix_must_be_subject_tokens(prefix: str) -> None:
    with pytest.raises(ValidationError, match="nats_inbox_prefix"):
        Settings(nats_inbox_prefix=prefix)


def test_a_tls_url_gets_tls_with_the_system_cas_unless_a_ca_is_given() -> None:
    context = connect_options(settings("tls://127.0.0.1:4222"))["tls"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_the_hint_says_what_to_set() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed: unable to get local issuer certificate")
    assert "set DURABLE_NATS_TLS_CA" in connect_hint(verify)
    assert "DURABLE_NATS_USER" in connect_hint(Exception("nats: 'Authorization Violation'"))
    assert connect_hint(ConnectionRefusedError(111, "Connect call failed")) == ""
