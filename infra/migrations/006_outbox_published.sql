-- Events published from the outbox (services/objects/outbox.py) are deleted without waiting for
-- the WAL flush of that delete (synchronous_commit off, for this transaction only). The delete
-- only records that a publish happened: the next commit's flush carries it to disk (the WAL is
-- written in order), and if Postgres crashed before that, the rows are published again after
-- and the events stream drops the repeats by message id. Waiting for the fsync here cost one
-- more disk flush per publishing round, which on the HTTP path at one request at a time nearly
-- doubled the latency of an increment that emits an event.
CREATE OR REPLACE FUNCTION do_outbox_published(objs text[], upto bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM do_outbox d USING unnest(objs, upto) AS u(o, s)
    WHERE d.object_id = u.o AND d.seq <= u.s;
END
$$;
