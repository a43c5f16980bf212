-- Alarms: due_ms is when the alarm next wakes (the scheduled time, or a retry's time after a
-- failed run; scheduled_ms stays what the object set, as Cloudflare reports it). generation is
-- a random token naming one set_alarm (or one retry): a wake-up for another generation is stale.
ALTER TABLE do_alarms ADD COLUMN IF NOT EXISTS due_ms bigint;
UPDATE do_alarms SET due_ms = scheduled_ms WHERE due_ms IS NULL;
ALTER TABLE do_alarms ALTER COLUMN due_ms SET NOT NULL;
DROP INDEX IF EXISTS do_alarms_due;
CREATE INDEX IF NOT EXISTS do_alarms_partition_due ON do_alarms (partition, due_ms);

-- do_flush also writes alarms now: atomic with the rest of each object's batch.
DROP FUNCTION IF EXISTS do_flush(int[], bigint[], text[], text[], bytea[], text[], bytea[], text[], bytea[], text);

CREATE OR REPLACE FUNCTION do_flush(
    parts int[], epochs bigint[],
    wiped text[],
    del_o text[], del_k bytea[],
    up_o text[], up_k bytea[], up_ns text[], up_v bytea[],
    alarm_del text[],
    alarm_o text[], alarm_ns text[], alarm_p int[], alarm_sched bigint[], alarm_due bigint[],
    alarm_gen bigint[], alarm_retry int[],
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
        ON CONFLICT (object_id, key) DO UPDATE SET value = EXCLUDED.value;
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
    IF audit_worker IS NOT NULL THEN
        INSERT INTO do_commit_audit (partition, epoch, worker_id)
        SELECT p, e, audit_worker FROM unnest(parts, epochs) AS u(p, e);
    END IF;
    RETURN ok;
END
$$;
