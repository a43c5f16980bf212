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

-- A database made by the unreleased migration files may still hold a do_flush of another
-- signature; CREATE OR REPLACE below would leave it beside the new one as an overload.
DROP FUNCTION IF EXISTS do_flush(int[], bigint[], text[], text[], bytea[], text[], bytea[], text[], bytea[], text);
DROP FUNCTION IF EXISTS do_flush(int[], bigint[], text[], text[], bytea[], text[], bytea[], text[], bytea[],
    text[], text[], text[], int[], bigint[], bigint[], bigint[], int[], text);

-- One flush = one statement = one round trip: the epoch fence (FOR SHARE, first), then the
-- writes of every object in the batch (storage, alarm rows, socket registrations: atomic with
-- each other). Runs as its own transaction (autocommit). Returns the partitions whose epoch
-- still matched; if any did not, nothing is written and the caller steps those partitions down
-- and retries without them.
CREATE OR REPLACE FUNCTION do_flush(
    parts int[], epochs bigint[],
    wiped text[],
    del_o text[], del_k bytea[],
    up_o text[], up_k bytea[], up_ns text[], up_v bytea[],
    alarm_del text[],
    alarm_o text[], alarm_ns text[], alarm_p int[], alarm_sched bigint[], alarm_due bigint[],
    alarm_gen bigint[], alarm_retry int[],
    sock_del text[],
    sock_id text[], sock_o text[], sock_ns text[], sock_p int[], sock_gw text[], sock_tags text[],
    sock_att bytea[], sock_auto_req text[], sock_auto_res text[],
    audit_worker text
) RETURNS int[] LANGUAGE plpgsql AS $$
DECLARE
    ok int[];
BEGIN
    -- lock every row of the batch's partitions (in a fixed order), then keep those whose
    -- epoch is still ours: a concurrent epoch bump either waits for this transaction or has
    -- committed already, and then the locked (latest) row shows the new epoch
    SELECT coalesce(array_agg(s.partition), '{}') INTO ok FROM (
        SELECT d.partition, d.epoch FROM do_partitions d
        WHERE d.partition = ANY(parts)
        ORDER BY d.partition
        FOR SHARE
    ) s JOIN unnest(parts, epochs) AS u(p, e) ON s.partition = u.p AND s.epoch = u.e;
    IF cardinality(ok) <> cardinality(parts) THEN
        RETURN ok;
    END IF;
    IF cardinality(wiped) > 0 THEN
        DELETE FROM do_storage WHERE object_id = ANY(wiped);
        DELETE FROM do_alarms WHERE object_id = ANY(wiped);
    END IF;
    IF cardinality(del_o) > 0 THEN
        DELETE FROM do_storage s USING unnest(del_o, del_k) AS d(o, k)
        WHERE s.object_id = d.o AND s.key = d.k;
    END IF;
    IF cardinality(up_o) > 0 THEN
        INSERT INTO do_storage (object_id, key, namespace, value)
        SELECT * FROM unnest(up_o, up_k, up_ns, up_v)
        ON CONFLICT (object_id, key) DO UPDATE SET value = EXCLUDED.value, written_at = now();
    END IF;
    IF cardinality(alarm_del) > 0 THEN
        DELETE FROM do_alarms WHERE object_id = ANY(alarm_del);
    END IF;
    IF cardinality(alarm_o) > 0 THEN
        INSERT INTO do_alarms (object_id, namespace, partition, scheduled_ms, due_ms, generation, retry_count)
        SELECT * FROM unnest(alarm_o, alarm_ns, alarm_p, alarm_sched, alarm_due, alarm_gen, alarm_retry)
        ON CONFLICT (object_id) DO UPDATE SET
            namespace = EXCLUDED.namespace, partition = EXCLUDED.partition,
            scheduled_ms = EXCLUDED.scheduled_ms, due_ms = EXCLUDED.due_ms,
            generation = EXCLUDED.generation, retry_count = EXCLUDED.retry_count;
    END IF;
    IF cardinality(sock_del) > 0 THEN
        DELETE FROM do_sockets WHERE socket_id = ANY(sock_del);
    END IF;
    IF cardinality(sock_id) > 0 THEN
        INSERT INTO do_sockets (socket_id, object_id, namespace, partition, gateway, tags, attachment,
                                auto_request, auto_response)
        SELECT u.i, u.o, u.ns, u.p, u.gw, ARRAY(SELECT jsonb_array_elements_text(u.t::jsonb)), u.att, u.rq, u.rs
        FROM unnest(sock_id, sock_o, sock_ns, sock_p, sock_gw, sock_tags, sock_att, sock_auto_req, sock_auto_res)
             AS u(i, o, ns, p, gw, t, att, rq, rs)
        ON CONFLICT (socket_id) DO UPDATE SET
            tags = EXCLUDED.tags, attachment = EXCLUDED.attachment,
            auto_request = EXCLUDED.auto_request, auto_response = EXCLUDED.auto_response;
    END IF;
    IF audit_worker IS NOT NULL THEN
        INSERT INTO do_commit_audit (partition, epoch, worker_id)
        SELECT p, e, audit_worker FROM unnest(parts, epochs) AS u(p, e);
    END IF;
    RETURN ok;
END
$$;
