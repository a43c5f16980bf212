-- Idempotency keys (services/objects/idempotency.py): the reply of a call made with a key,
-- committed in the same do_flush as the call's writes, so a repeat of the key returns it
-- without running the method again. reply NULL: the call made writes durable before it ended
-- (it awaited an outgoing call or sync()) and has not finished: its outcome is partial.
CREATE TABLE IF NOT EXISTS do_idempotency (
    object_id   text NOT NULL,
    idem_key    text NOT NULL,
    namespace   text NOT NULL,
    partition   integer NOT NULL,
    fingerprint text NOT NULL,
    reply       bytea,
    expires_ms  bigint NOT NULL,
    PRIMARY KEY (object_id, idem_key)
);
-- the owners' sweep of expired records, by partition
CREATE INDEX IF NOT EXISTS do_idempotency_expiry ON do_idempotency (partition, expires_ms);
CREATE INDEX IF NOT EXISTS do_idempotency_namespace ON do_idempotency (namespace);

-- do_flush gains the idempotency records: every signature it had before is dropped first, since
-- CREATE OR REPLACE with other parameters would leave the old one beside the new as an overload.
DROP FUNCTION IF EXISTS do_flush(int[], bigint[], text[], text[], bytea[], text[], bytea[], text[], bytea[], text);
DROP FUNCTION IF EXISTS do_flush(int[], bigint[], text[], text[], bytea[], text[], bytea[], text[], bytea[],
    text[], text[], text[], int[], bigint[], bigint[], bigint[], int[], text);
DROP FUNCTION IF EXISTS do_flush(int[], bigint[], text[], text[], bytea[], text[], bytea[], text[], bytea[],
    text[], text[], text[], int[], bigint[], bigint[], bigint[], int[], text[], text[], text[], text[], int[],
    text[], text[], bytea[], text[], text[], text);

-- One flush = one statement = one round trip: the epoch fence (FOR SHARE, first), then the
-- writes of every object in the batch (storage, alarm rows, socket registrations, idempotency
-- records: atomic with each other). Runs as its own transaction (autocommit). Returns the
-- partitions whose epoch still matched; if any did not, nothing is written and the caller steps
-- those partitions down and retries without them.
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
    idem_o text[], idem_k text[], idem_ns text[], idem_p int[], idem_fp text[], idem_reply bytea[],
    idem_exp bigint[],
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
    IF cardinality(idem_o) > 0 THEN
        INSERT INTO do_idempotency (object_id, idem_key, namespace, partition, fingerprint, reply, expires_ms)
        SELECT * FROM unnest(idem_o, idem_k, idem_ns, idem_p, idem_fp, idem_reply, idem_exp)
        ON CONFLICT (object_id, idem_key) DO UPDATE SET
            fingerprint = EXCLUDED.fingerprint, reply = EXCLUDED.reply, expires_ms = EXCLUDED.expires_ms;
    END IF;
    IF audit_worker IS NOT NULL THEN
        INSERT INTO do_commit_audit (partition, epoch, worker_id)
        SELECT p, e, audit_worker FROM unnest(parts, epochs) AS u(p, e);
    END IF;
    RETURN ok;
END
$$;
