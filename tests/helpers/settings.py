"""The tests' app and settings: where things are, and the settings (and the environment of a
``durable worker`` subprocess) for one test's servers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from durable.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
#: The tests' app: its objects (tests/helpers/objects.py) and routing code (tests/helpers/routes.py).
TEST_CONFIG = ROOT / "tests" / "durable.test.toml"
PARTITIONS = 16
TEST_ID_SECRET = "durable-tests-id-secret"


def make_settings(nats_url: str, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_url, "database_url": database_url, "partitions": PARTITIONS,
        "config_file": TEST_CONFIG, "lease_ttl": 4.0, "heartbeat_interval": 0.5,
        "request_timeout": 5.0, "retry_deadline": 10.0,
        # not the development secret: `durable worker`/`router`/`gateway` refuse that one
        "id_secret": TEST_ID_SECRET,
        # on in the tests (off by default): every test's writes go through the history triggers
        "history": True,
    }
    values.update(overrides)
    return Settings(**values)


def worker_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `durable worker` subprocess running with these settings."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DURABLE_NATS_URL": s.nats_url, "DURABLE_DATABASE_URL": s.database_url,
        "DURABLE_PARTITIONS": str(s.partitions), "DURABLE_CONFIG_FILE": str(s.config_file),
        "DURABLE_LEASE_TTL": str(s.lease_ttl), "DURABLE_HEARTBEAT_INTERVAL": str(s.heartbeat_interval),
        "DURABLE_IDLE_TIMEOUT": str(s.idle_timeout), "DURABLE_ID_SECRET": s.id_secret,
        **({"DURABLE_NATS_LIVENESS_TIMEOUT": str(s.nats_liveness_timeout)} if s.nats_liveness_timeout else {}),
        **({"DURABLE_EVENTS_PUBLISH_DELAY": str(s.events_publish_delay)} if s.events_publish_delay else {}),
        "DURABLE_HISTORY": "true" if s.history else "false",
        **extra,
    }
