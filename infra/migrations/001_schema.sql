-- The schema of durable. Applied once, in name order, recorded in do_schema_migrations. Every
-- statement is idempotent (IF NOT EXISTS, OR REPLACE), so this also runs on a database that an
-- earlier, unreleased series of migration files made (the same tables, indexes and function).

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
    -- when the key was last written, for operators (durable objects ls)
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (object_id, key)
);
CREATE INDEX IF NOT EXISTS do_storage_namespace ON do_storage (namespace);

-- One alarm per object; Postgres is the source of truth, JetStream only the wake-up.
-- scheduled_ms is what the object set (as Cloudflare reports it); due_ms is when the alarm next
-- wakes (the scheduled time, or a retry's time after a failed run). generation is a random token
-- naming one set_alarm (or one retry): a wake-up for another generation is stale.
CREATE TABLE IF NOT EXISTS do_alarms (
    object_id     text PRIMARY KEY,
    namespace     text NOT NULL,
    partition     integer NOT NULL,
    scheduled_ms  bigint NOT NULL,
    generation    bigint NOT NULL DEFAULT 0,
    retry_count   integer NOT NULL DEFAULT 0,
    due_ms        bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS do_alarms_partition_due ON do_alarms (partition, due_ms);

-- WebSockets accepted by objects (hibernation): the gateway holds the client socket, this row
-- the registration (tags, attachment, the object's auto-response pair), written in the object's
-- own flush so an accept is atomic with the event's other writes and survives eviction/failover.
CREATE TABLE IF NOT EXISTS do_sockets (
    socket_id     text PRIMARY KEY,
    object_id     text NOT NULL,
    namespace     text NOT NULL,
    gateway       text NOT NULL,
    tags          text[] NOT NULL DEFAULT '{}',
    attachment    bytea,
    partition     integer NOT NULL DEFAULT 0,
    auto_request  text,
    auto_response text,
    accepted_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS do_sockets_object ON do_sockets (object_id);
CREATE INDEX IF NOT EXISTS do_sockets_partition_gateway ON do_sockets (partition, gateway);

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
