"""Process settings from ``DURABLE_*`` environment variables and ``.env`` (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything a worker, router or client process needs to know.

    ``nats_url`` / ``database_url`` left empty means: run the embedded servers (``durable dev``).
    """

    model_config = SettingsConfigDict(env_prefix="DURABLE_", env_file=".env", extra="ignore")

    nats_url: str = ""
    database_url: str = ""
    config_file: Path = Path("durable.toml")
    data_dir: Path = Path(".durable")

    #: Fixed per deployment: changing it moves almost every object (a migration, not a setting).
    partitions: int = Field(default=256, ge=1, le=65536)
    #: First key of the two-int advisory lock, so several deployments can share one database.
    deployment_key: int = Field(default=0x0D0B, ge=0, le=2**31 - 1)
    #: Secret that keys object ids; ids from one secret are rejected under another.
    id_secret: str = "durable-dev-secret"

    #: Lease: the lock session is killed by Postgres after this much silence.
    lease_ttl: float = Field(default=10.0, gt=0.5)
    heartbeat_interval: float = Field(default=2.5, gt=0.05)
    #: Idle objects are evicted after this many seconds (the constructor runs again on next use).
    idle_timeout: float = Field(default=60.0, gt=0)
    #: How long a caller waits for one reply.
    request_timeout: float = Field(default=10.0, gt=0)
    #: How long a caller keeps retrying requests that met no responder (failover window).
    retry_deadline: float = Field(default=10.0, ge=0)
    #: Flush transactions a worker keeps in flight at once (each on its own connection).
    flush_concurrency: int = Field(default=1, ge=1, le=16)
    #: Record (partition, epoch, worker, time) of every commit in do_commit_audit (fault tests).
    audit_commits: bool = False
    #: Largest request a worker accepts (the NATS default max_payload is 1 MiB).
    max_request_bytes: int = 1024 * 1024
    #: Alarms: replicas of the JetStream stream that holds their wake-ups (3 on a 3-node cluster).
    alarm_replicas: int = Field(default=1, ge=1, le=5)
    #: How often an owner looks in Postgres for alarms overdue by this long (a lost wake-up).
    alarm_sweep_interval: float = Field(default=5.0, gt=0)
    #: First retry delay of a failed alarm; each further retry doubles it (Cloudflare: 2 s).
    alarm_retry_base: float = Field(default=2.0, gt=0)
    #: WebSocket gateways announce themselves this often; silent this long, their sockets are
    #: closed (1006) for the objects that had them.
    gateway_heartbeat_interval: float = Field(default=1.0, gt=0)
    gateway_timeout: float = Field(default=3.0, gt=0)
    gateway_port: int = 8788
    #: The routing code every HTTP request and WebSocket upgrade goes through (a Worker's fetch).
    routes: str = "durable.router.routes:fetch"

    http_host: str = "127.0.0.1"
    http_port: int = 8787
    nats_port: int = 4222
    postgres_port: int = 5433
    worker_name: str = ""

    @property
    def nats_servers(self) -> list[str]:
        """``DURABLE_NATS_URL`` may list several servers of a cluster, comma-separated."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @model_validator(mode="after")
    def _heartbeat_fits_lease(self) -> Settings:
        if self.heartbeat_interval > self.lease_ttl / 4:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval}s) must be at most lease_ttl/4 "
                f"({self.lease_ttl / 4}s)"
            )
        return self
