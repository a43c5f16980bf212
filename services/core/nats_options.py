"""The credentials, reply prefix and TLS every process connects to NATS with, from the settings.

A NATS server locked down (``deploy/nats/auth.conf``) knows each process by its user: workers,
routers and gateways, application clients and operators each get only the subjects they use,
and each only its own reply subjects (``DURABLE_NATS_INBOX_PREFIX``). Client, worker, router,
gateway and the operator commands all connect through :func:`connect_options`, so a setting
applies to every one of them, and a mistake in one (a key without its certificate, a missing
file) is a ConfigError naming the setting before any connection is tried.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from .errors import ConfigError
from .settings import Settings


def _readable(setting: str, path: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"DURABLE_{setting.upper()}: {path!r} is not a file")
    return path


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for NATS: None when no TLS setting is given and no URL is ``tls://``
    (a server that requires TLS then refuses, and the error says which setting to set)."""
    ca, cert, key = settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key
    if bool(cert) != bool(key):
        raise ConfigError("DURABLE_NATS_TLS_CERT and DURABLE_NATS_TLS_KEY go together: a client "
                          "certificate needs its key (set both, or neither)")
    wants_tls = any(url.lower().startswith("tls://") for url in settings.nats_servers)
    if not (ca or cert or wants_tls):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=_readable("nats_tls_ca", ca) if ca else None)
    if cert:
        try:
            context.load_cert_chain(_readable("nats_tls_cert", cert), _readable("nats_tls_key", key))
        except ssl.SSLError as exc:
            raise ConfigError(f"DURABLE_NATS_TLS_CERT / DURABLE_NATS_TLS_KEY: cannot load the client "
                              f"certificate: {exc}") from None
    return context


def _secret(value: SecretStr | str) -> str:
    """A secret setting's value (a plain str where settings were copied with ``model_copy``)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def connect_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``nats.connect`` for the credentials, inbox prefix and TLS settings."""
    options: dict[str, Any] = {"inbox_prefix": settings.nats_inbox_prefix}
    user, password = settings.nats_user, _secret(settings.nats_password)
    token, creds = _secret(settings.nats_token), settings.nats_creds
    if password and not user:
        raise ConfigError("DURABLE_NATS_PASSWORD is set but DURABLE_NATS_USER is not: set the user too")
    if sum(map(bool, (user, token, creds))) > 1:
        raise ConfigError("set one way to authenticate to NATS: DURABLE_NATS_USER (with "
                          "DURABLE_NATS_PASSWORD), DURABLE_NATS_TOKEN or DURABLE_NATS_CREDS, not several")
    if user:
        options["user"] = user
        options["password"] = password
    elif token:
        options["token"] = token
    elif creds:
        options["user_credentials"] = _readable("nats_creds", creds)
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    return options


def connect_hint(exc: BaseException) -> str:
    """What to set when a connection failed for a reason the settings decide (TLS, credentials)."""
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        return (" The server's TLS certificate was not trusted: set DURABLE_NATS_TLS_CA to the CA "
                "file that signed it.")
    if isinstance(exc, ssl.SSLError) or "tls" in text and "required" in text:
        return (" The server requires TLS: use tls:// URLs in DURABLE_NATS_URL and set "
                "DURABLE_NATS_TLS_CA (and DURABLE_NATS_TLS_CERT/KEY if it verifies clients).")
    if "authorization" in text or "authentication" in text:
        return (" The server refused the credentials: set DURABLE_NATS_USER and DURABLE_NATS_PASSWORD "
                "(or DURABLE_NATS_TOKEN, or DURABLE_NATS_CREDS) to a user it knows.")
    return ""
