-- The transactional outbox (services/objects/outbox.py): events an object emits (ctx.emit) are
-- rows committed by the same do_flush as the event's storage writes, numbered per object in
-- commit order; the owner of the object's partition publishes them to JetStream after the commit
-- (message id = msg_id, so the stream drops a repeat) and then deletes them.
CREATE TABLE IF NOT EXISTS do_outbox (
    object_id    text NOT NULL,
    seq          bigint NOT NULL,
    partition    integer NOT NULL,
    subject      text NOT NULL,
    -- <object id>:<incarnation>:<seq>: the JetStream de-duplication id
    msg_id       text NOT NULL,
    payload      bytea NOT NULL,
    -- the emitter's headers as a JSON object, or NULL
    headers      text,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (object_id, seq)
);
-- the publisher reads the backlog of the partitions its worker owns
CREATE INDEX IF NOT EXISTS do_outbox_partition ON do_outbox (partition, object_id, seq);

-- Each object's last event number. It outlives the outbox rows (deleted once published), so a
-- number is never given twice; the incarnation (random, made with the row) keeps message ids
-- unique when a database is recreated beside a stream that still remembers the old ids.
CREATE TABLE IF NOT EXISTS do_outbox_seq (
    object_id   text PRIMARY KEY,
    incarnation text NOT NULL,
    seq         bigint NOT NULL
);

-- do_flush gains the outbox rows: the signature of 003 is dropped first (CREATE OR REPLACE with
-- other parameters would leave the old one beside the new as an overload).
DROP FUNCTION IF EXISTS do_flush(int[], bigint[], text[], text[], bytea[], text[], bytea[], text[], bytea[],
    text[], text[], text[], int[], bigint[], bigint[], bigint[], int[], text[], text[], text[], text[], int[],
    text[], text[], bytea[], text[], text[], text[], text[], text[], int[], text[], bytea[], bigint[], text);

-- One flush = one statement = one round trip: the epoch fence (FOR SHARE, first), then the
-- writes of every object in the batch (storage, alarm rows, socket registrations, idempotency
-- records, outbox events: atomic with each other). Runs as its own transaction (autocommit). Returns the
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
    evt_o text[], evt_p int[], evt_subject text[], evt_payload bytea[], evt_headers text[],
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
    IF cardinality(evt_o) > 0 THEN
        -- number each object's events after its last one, in emit order (the arrays' order)
        WITH ev AS (
            SELECT u.o, u.p, u.s, u.pl, u.h,
                   row_number() OVER (PARTITION BY u.o ORDER BY u.i) AS n,
                   count(*) OVER (PARTITION BY u.o) AS c
            FROM unnest(evt_o, evt_p, evt_subject, evt_payload, evt_headers) WITH ORDINALITY AS u(o, p, s, pl, h, i)
        ), bumped AS (
            INSERT INTO do_outbox_seq AS q (object_id, incarnation, seq)
            SELECT DISTINCT ON (ev.o) ev.o, substr(md5(random()::text || clock_timestamp()::text), 1, 12), ev.c
            FROM ev ORDER BY ev.o
            ON CONFLICT (object_id) DO UPDATE SET seq = q.seq + EXCLUDED.seq
            RETURNING q.object_id, q.incarnation, q.seq
        )
        INSERT INTO do_outbox (object_id, seq, partition, subject, msg_id, payload, headers)
        SELECT ev.o, b.seq - ev.c + ev.n, ev.p, ev.s, ev.o || ':' || b.incarnation || ':' || (b.seq - ev.c + ev.n),
               ev.pl, ev.h
        FROM ev JOIN bumped b ON b.object_id = ev.o;
    END IF;
    IF audit_worker IS NOT NULL THEN
        INSERT INTO do_commit_audit (partition, epoch, worker_id)
        SELECT p, e, audit_worker FROM unnest(parts, epochs) AS u(p, e);
    END IF;
    RETURN ok;
END
$$;
