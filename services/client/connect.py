"""``durable.connect()``: the bindings of a deployment, from any Python process.

    env = await durable.connect()                 # DURABLE_NATS_URL, ./durable.toml
    await env.COUNTERS.get_by_name("a").increment()
    await env.close()

    async with durable.connect(nats_url="nats://10.0.0.5:4222") as env: ...

The ids of a deployment are keyed by its secret, so the caller needs the same
``DURABLE_ID_SECRET`` and ``durable.toml`` bindings as the workers.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..core.config import load_config
from ..core.errors import ConfigError
from ..core.settings import Settings
from .client import Client
from .namespace import Env


class Connecting:
    """What :func:`connect` returns: await it for an :class:`Env`, or use it with ``async with``
    (closed on exit)."""

    def __init__(self, config: str | Path | None, settings: dict[str, Any]) -> None:
        self._config = config
        self._settings = settings
        self._env: Env | None = None

    async def _open(self) -> Env:
        try:
            settings = Settings(**self._settings)
        except ValidationError as exc:
            raise ConfigError(f"bad DURABLE_* settings:\n{exc}") from None
        if not settings.nats_servers:
            raise ConfigError("durable.connect: no NATS server to connect to: set DURABLE_NATS_URL "
                              "(e.g. nats://127.0.0.1:4222, where `durable dev` listens) or pass nats_url=")
        config = load_config(Path(self._config) if self._config is not None else settings.config_file)
        client = await Client.connect(settings, config)
        return Env(client, config)

    def __await__(self) -> Generator[Any, None, Env]:
        return self._open().__await__()

    async def __aenter__(self) -> Env:
        self._env = await self._open()
        return self._env

    async def __aexit__(self, *exc: object) -> None:
        if self._env is not None:
            await self._env.close()


def connect(config: str | Path | None = None, *, nats_url: str | None = None, **settings: Any) -> Connecting:
    """Connect to the deployment's NATS and return its bindings (``env.COUNTERS``, ...).

    ``config`` is the app's durable.toml (default: ``DURABLE_CONFIG_FILE`` or ``./durable.toml``);
    ``nats_url`` overrides ``DURABLE_NATS_URL``; other keyword arguments override settings
    (``id_secret=``, ``request_timeout=``, ...)."""
    if nats_url is not None:
        settings["nats_url"] = nats_url
    return Connecting(config, settings)
