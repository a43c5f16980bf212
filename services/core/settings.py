"""Process settings from ``DURABLE_*`` environment variables and ``.env`` (pydantic-settings)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .dburl import check_database_url
from .errors import ConfigError

#: The id secret ``durable dev`` uses; a worker, router or gateway refuses to run with it.
DEV_ID_SECRET = "durable-dev-secret"
#: Set by ``durable dev`` in the environment of the workers it starts as child processes: they
#: share its development secret.
DEV_CHILD_ENV = "DURABLE_DEV_CHILD"


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
    id_secret: str = DEV_ID_SECRET

    #: Lease: the lock session is killed by Postgres after this much silence.
    lease_ttl: float = Field(default=10.0, gt=0.5)
    heartbeat_interval: float = Field(default=2.5, gt=0.05)
    #: Idle objects are evicted after this many seconds (the constructor runs again on next use).
    idle_timeout: float = Field(default=60.0, gt=0)
    #: How long a client keeps trying its first connection to NATS before it gives up
    #: (reconnecting after a connection was made is never given up).
    nats_connect_timeout: float = Field(default=5.0, gt=0)
    #: How long a caller waits for one reply.
    request_timeout: float = Field(default=10.0, gt=0)
    #: How long a caller keeps retrying requests that met no responder (failover window).
    retry_deadline: float = Field(default=10.0, ge=0)
    #: How long a call's idempotency key is remembered: a repeat within it gets the recorded
    #: reply, a repeat after it runs the method again (Stripe keeps keys 24 h).
    idempotency_ttl: float = Field(default=86400.0, gt=0)
    #: Keep a change history of every object's storage, for point-in-time restore (history.py).
    #: Off by default: a second row per changed key costs about a quarter of the write throughput
    #: under load, and its disk grows with the write rate times the retention.
    history: bool = False
    #: How far back a restore may go; older history is pruned (3 days).
    history_retention: float = Field(default=259200.0, gt=0)
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
    #: Streams into objects: how long JetStream waits for a message's ack before redelivering it
    #: (a live puller extends it; after a puller crashed, its successor waits up to this long).
    subscription_ack_wait: float = Field(default=30.0, ge=1)
    #: First retry delay of a stream message whose handler raised; each further retry doubles it.
    subscription_retry_base: float = Field(default=1.0, gt=0)
    #: Replicas of the dead-letter stream of parked messages (3 on a 3-node cluster).
    dlq_replicas: int = Field(default=1, ge=1, le=5)
    #: Events (ctx.emit, README "Events"): the JetStream stream that holds them (subjects ``evt.>``),
    #: how long it keeps an event, its replicas, and how long it remembers a message id to drop
    #: a repeat (a new owner republishing what its predecessor had published but not marked).
    events_stream: str = Field(default="DURABLE_EVENTS", pattern=r"^[A-Za-z0-9_-]+$")
    events_max_age: float = Field(default=7 * 86400.0, gt=0)
    events_replicas: int = Field(default=1, ge=1, le=5)
    events_duplicate_window: float = Field(default=120.0, gt=0)
    #: The largest event payload ctx.emit accepts (also capped below the NATS server's max_payload).
    event_max_bytes: int = Field(default=1024 * 1024, ge=1)
    #: Seconds the event publisher waits after a commit before it reads the outbox (more events per
    #: round; the events stay committed in Postgres meanwhile). 0: publish at once.
    events_publish_delay: float = Field(default=0.0, ge=0)
    #: WebSocket gateways announce themselves this often; silent this long, their sockets are
    #: closed (1006) for the objects that had them.
    gateway_heartbeat_interval: float = Field(default=1.0, gt=0)
    gateway_timeout: float = Field(default=3.0, gt=0)
    gateway_port: int = 8788
    #: The routing code every HTTP request and WebSocket upgrade goes through (a Worker's fetch),
    #: ``module:function``; empty: the ``routes`` key of durable.toml.
    routes: str = ""

    #: Proxies (IPs or CIDRs, comma-separated in DURABLE_TRUSTED_PROXIES) whose X-Forwarded-For
    #: is believed. Empty (the default): the client's address is the socket's peer, whatever
    #: headers it sends. See :func:`client_address`.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    #: A worker's health port (/livez, /readyz, /metrics); 0 (the default): none. `durable dev`
    #: gives it to its in-process worker only (its child workers would collide on the port).
    health_port: int = Field(default=0, ge=0, le=65535)
    #: Where the health port listens: every interface, so a kubelet or Prometheus can reach it.
    health_host: str = "0.0.0.0"
    #: On SIGTERM, /readyz answers 503 for this many seconds before the drain begins, so load
    #: balancers stop sending first (Kubernetes: a few seconds; 0 in `durable dev`).
    shutdown_delay: float = Field(default=0.0, ge=0, le=300)
    #: Log lines: ``auto`` (JSON when stderr is not a terminal), ``json`` or ``text``.
    log_format: str = Field(default="auto", pattern="^(auto|json|text)$")

    http_host: str = "127.0.0.1"
    http_port: int = 8787
    nats_port: int = 4222
    postgres_port: int = 5433
    worker_name: str = ""
    #: ``durable dev``: the router hands requests for partitions its in-process worker serves to
    #: that worker directly (services/objects/local.py) instead of over NATS.
    local_dispatch: bool = True
    #: A worker whose NATS round trips (PING/PONG) have all failed for this long gives its
    #: partitions up and leaves the lock session, so workers that can be reached take them
    #: (a worker nobody can reach must not keep a lease). 0: half the lease.
    nats_liveness_timeout: float = Field(default=0.0, ge=0)

    #: NATS credentials (README "Locking NATS down"): a user and password, a token, or a
    #: ``.creds`` file (a JWT and NKey seed, for servers run with an operator); empty: anonymous.
    nats_user: str = ""
    nats_password: SecretStr = SecretStr("")
    nats_token: SecretStr = SecretStr("")
    nats_creds: str = ""
    #: The prefix of this process's reply subjects. A server that locks NATS down lets each user
    #: subscribe only to its own prefix, so nobody reads another's replies.
    nats_inbox_prefix: str = Field(default="_INBOX", pattern=r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$")
    #: TLS to NATS: the CA that signed the servers' certificates (``tls://`` URLs need one unless
    #: the system's CAs signed them), and a client certificate and key for servers that verify clients.
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""

    def or_dev_servers(self) -> Settings:
        """These settings, pointing at the servers `durable dev` runs where no NATS or Postgres URL
        is set: what commands that look at a deployment (status, objects, state...) use."""
        overrides: dict[str, object] = {}
        if not self.nats_url:
            overrides["nats_url"] = f"nats://127.0.0.1:{self.nats_port}"
        if not self.database_url:
            overrides["database_url"] = f"postgresql://postgres@127.0.0.1:{self.postgres_port}/postgres"
        return self.model_copy(update=overrides) if overrides else self

    @property
    def nats_servers(self) -> list[str]:
        """``DURABLE_NATS_URL`` may list several servers of a cluster, comma-separated."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            entries = [str(v).strip() for v in value if str(v).strip()]
            for entry in entries:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or CIDR "
                                     "network (such as 10.0.0.0/8)") from None
            return entries
        return value

    @field_validator("database_url")
    @classmethod
    def _writable_database(cls, value: str) -> str:
        check_database_url(value)  # several hosts (primary + standbys): only ever the writable one
        return value

    @model_validator(mode="after")
    def _dedupe_fits_retention(self) -> Settings:
        if self.events_duplicate_window > self.events_max_age:
            raise ValueError(f"events_duplicate_window ({self.events_duplicate_window}s) must be at most "
                             f"events_max_age ({self.events_max_age}s): JetStream refuses a longer one")
        return self

    @model_validator(mode="after")
    def _heartbeat_fits_lease(self) -> Settings:
        if self.heartbeat_interval > self.lease_ttl / 4:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval}s) must be at most lease_ttl/4 "
                f"({self.lease_ttl / 4}s)"
            )
        return self


def refuse_dev_secret(settings: Settings, command: str) -> None:
    """A ``durable worker``/``router``/``gateway`` (anything but ``durable dev``) must not run with
    the development id secret: ids would be forgeable by anyone who read the source."""
    if settings.id_secret != DEV_ID_SECRET or os.environ.get(DEV_CHILD_ENV) == "1":
        return
    raise ConfigError(
        f"durable {command} refuses to run with the development id secret ({DEV_ID_SECRET!r}), which "
        "is public: anyone could forge object ids. Set DURABLE_ID_SECRET to a long random string "
        "(for example `python -c 'import secrets; print(secrets.token_urlsafe(32))'`), the same "
        "in every worker, router and gateway of the deployment and in every client; ids made under "
        "one secret are refused under another, so keep it fixed. Only `durable dev` uses the "
        "development secret."
    )


def _networks(entries: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(e, strict=False) for e in entries]


def _trusted(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def client_address(peer: str | None, forwarded_for: list[str], trusted_proxies: list[str]) -> str:
    """The client's address: the socket's ``peer``, unless the peer is a trusted proxy; then the
    right-most address of ``X-Forwarded-For`` (every header, in order) that is not itself a
    trusted proxy (each proxy appends the address it saw, so what is left of the last untrusted
    hop was written by the client and proves nothing)."""
    if peer is None:
        return "unknown"
    if not trusted_proxies:
        return peer
    networks = _networks(trusted_proxies)
    if not _trusted(peer, networks):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    address = peer
    for hop in reversed(hops):
        address = hop
        if not _trusted(hop, networks):
            break
    return address
