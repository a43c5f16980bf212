-- Core tables of durable. Applied once, in order, recorded in do_schema_migrations.

-- One row per partition: the epoch fences every storage transaction (FOR SHARE).
CREATE TABLE IF NOT EXISTS do_partitions (
    partition   integer PRIMARY KEY,
    epoch       bigint NOT NULL DEFAULT 0,
    owner       text,
    acquired_at timestamptz
);

-- Object storage. Keys are bytea so that order is the byte order of their UTF-8 encoding
-- (Cloudflare's list() order) and so that they may contain NUL.
CREATE TABLE IF NOT EXISTS do_storage (
    object_id  text NOT NULL,
    key        bytea NOT NULL,
    namespace  text NOT NULL,
    value      bytea NOT NULL,
    PRIMARY KEY (object_id, key)
);
CREATE INDEX IF NOT EXISTS do_storage_namespace ON do_storage (namespace);

-- One alarm per object; Postgres is the source of truth, JetStream only the wake-up.
CREATE TABLE IF NOT EXISTS do_alarms (
    object_id     text PRIMARY KEY,
    namespace     text NOT NULL,
    partition     integer NOT NULL,
    scheduled_ms  bigint NOT NULL,
    generation    bigint NOT NULL DEFAULT 0,
    retry_count   integer NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS do_alarms_due ON do_alarms (partition, scheduled_ms);

-- WebSockets accepted by objects (hibernation): the gateway holds the socket, this the registration.
CREATE TABLE IF NOT EXISTS do_sockets (
    socket_id   text PRIMARY KEY,
    object_id   text NOT NULL,
    namespace   text NOT NULL,
    gateway     text NOT NULL,
    tags        text[] NOT NULL DEFAULT '{}',
    attachment  bytea
);
CREATE INDEX IF NOT EXISTS do_sockets_object ON do_sockets (object_id);

-- Live workers (heartbeat rows), for balancing and `durable status`.
CREATE TABLE IF NOT EXISTS do_workers (
    worker_id   text PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

-- durable.toml [[migrations]] tags applied to this database.
CREATE TABLE IF NOT EXISTS do_class_migrations (
    tag         text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    spec        jsonb NOT NULL
);

-- Per-commit audit (partition, epoch, time) for the fault tests' "no two owners commit" check.
CREATE TABLE IF NOT EXISTS do_commit_audit (
    partition   integer NOT NULL,
    epoch       bigint NOT NULL,
    worker_id   text NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
