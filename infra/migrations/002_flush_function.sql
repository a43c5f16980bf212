-- One flush = one statement = one round trip: the epoch fence (FOR SHARE, first), then the
-- writes of every object in the batch. Runs as its own transaction (autocommit). Returns the
-- partitions whose epoch still matched; if any did not, nothing is written and the caller
-- steps those partitions down and retries without them.
CREATE OR REPLACE FUNCTION do_flush(
    parts int[], epochs bigint[],
    wiped text[],
    del_o text[], del_k bytea[],
    up_o text[], up_k bytea[], up_ns text[], up_v bytea[],
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
    IF audit_worker IS NOT NULL THEN
        INSERT INTO do_commit_audit (partition, epoch, worker_id)
        SELECT p, e, audit_worker FROM unnest(parts, epochs) AS u(p, e);
    END IF;
    RETURN ok;
END
$$;
