-- Per-object change history, for point-in-time restore (services/objects/history.py).
--
-- An undo log: every change of a do_storage row records the key's value *before* the change
-- (NULL: the key did not exist), with a position from one sequence and the time of the
-- transaction. The state of an object at position p is its current storage with, for each key
-- changed after p, the value recorded by the first change after p. So a restore to time t needs
-- only the rows written since t: rows older than the retention window are pruned freely.
--
-- The rows are written by statement-level AFTER triggers with transition tables, so do_flush and
-- every other writer of do_storage stay as they are. INSERT ... ON CONFLICT DO UPDATE fires both
-- the INSERT trigger (rows inserted) and the UPDATE trigger (rows updated); Postgres refuses
-- transition tables on a trigger with more than one event, hence three triggers. A session with
-- durable.history = 'off' (DURABLE_HISTORY=false) records nothing.
--
-- Positions: one object's transactions never overlap (one owner, one flush of an object at a
-- time, epoch-fenced), so for one object position order is commit order and time order.
CREATE SEQUENCE IF NOT EXISTS do_history_pos;

CREATE TABLE IF NOT EXISTS do_history (
    object_id  text NOT NULL,
    pos        bigint NOT NULL DEFAULT nextval('do_history_pos'),
    key        bytea NOT NULL,
    -- the value before this change; NULL: the key did not exist
    old_value  bytea,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (object_id, pos)
);
-- pruning by time: rows are appended in time order, so a BRIN index is enough and nearly free
CREATE INDEX IF NOT EXISTS do_history_at ON do_history USING brin (at);

-- A restore asked for with on_next_session_restore_bookmark(): applied (and deleted, in the same
-- transaction) when the object next starts, before its constructor runs.
CREATE TABLE IF NOT EXISTS do_history_restores (
    object_id    text PRIMARY KEY,
    namespace    text NOT NULL,
    target       bigint NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now()
);

-- The time before which history may be incomplete: pruned, not yet kept (before this migration),
-- or not recorded (a worker ran with DURABLE_HISTORY=false). No restore goes back past it.
CREATE TABLE IF NOT EXISTS do_history_horizon (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    pruned_before timestamptz NOT NULL
);
INSERT INTO do_history_horizon (id, pruned_before) VALUES (true, now()) ON CONFLICT (id) DO NOTHING;

CREATE OR REPLACE FUNCTION do_history_recording() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('durable.history', true), '') <> 'off'
$$;

CREATE OR REPLACE FUNCTION do_history_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF do_history_recording() THEN
        INSERT INTO do_history (object_id, key, old_value) SELECT n.object_id, n.key, NULL FROM new_rows n;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION do_history_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF do_history_recording() THEN
        -- a rename of a class changes the namespace only: not a change of the object's state
        INSERT INTO do_history (object_id, key, old_value)
        SELECT o.object_id, o.key, o.value FROM old_rows o JOIN new_rows n USING (object_id, key)
        WHERE o.value IS DISTINCT FROM n.value;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION do_history_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF do_history_recording() THEN
        INSERT INTO do_history (object_id, key, old_value) SELECT o.object_id, o.key, o.value FROM old_rows o;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS do_history_insert ON do_storage;
CREATE TRIGGER do_history_insert AFTER INSERT ON do_storage REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION do_history_inserted();
DROP TRIGGER IF EXISTS do_history_update ON do_storage;
CREATE TRIGGER do_history_update AFTER UPDATE ON do_storage REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION do_history_updated();
DROP TRIGGER IF EXISTS do_history_delete ON do_storage;
CREATE TRIGGER do_history_delete AFTER DELETE ON do_storage REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION do_history_deleted();

-- The changed keys of object o since position p: (key, value at p; NULL: absent at p).
CREATE OR REPLACE FUNCTION do_history_undo(o text, p bigint) RETURNS TABLE (key bytea, value bytea)
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT ON (h.key) h.key, h.old_value FROM do_history h
    WHERE h.object_id = o AND h.pos > p ORDER BY h.key, h.pos
$$;

-- Object o's whole storage at position p.
CREATE OR REPLACE FUNCTION do_history_state_at(o text, p bigint) RETURNS TABLE (key bytea, value bytea)
LANGUAGE sql STABLE AS $$
    WITH changed AS (SELECT * FROM do_history_undo(o, p))
    SELECT s.key, s.value FROM do_storage s
    WHERE s.object_id = o AND NOT EXISTS (SELECT 1 FROM changed c WHERE c.key = s.key)
    UNION ALL
    SELECT c.key, c.value FROM changed c WHERE c.value IS NOT NULL
$$;

-- Restore object o (of namespace ns) to its state at position p, under the epoch fence of its
-- partition, in one transaction, and forget its pending restore request. The restore's own
-- changes are recorded in do_history like any other write, so a restore can be undone.
-- Returns the number of keys changed, or -1 when the epoch is not current (nothing written).
CREATE OR REPLACE FUNCTION do_history_restore(o text, ns text, part int, ep bigint, p bigint)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    ks bytea[];
    vs bytea[];
BEGIN
    PERFORM 1 FROM do_partitions WHERE partition = part AND epoch = ep FOR SHARE;
    IF NOT FOUND THEN
        RETURN -1;
    END IF;
    -- computed before anything is written: the writes below add history rows after p
    SELECT coalesce(array_agg(u.key), '{}'), coalesce(array_agg(u.value), '{}') INTO ks, vs
    FROM do_history_undo(o, p) u;
    DELETE FROM do_storage s USING unnest(ks, vs) AS u(k, v)
    WHERE s.object_id = o AND s.key = u.k AND u.v IS NULL;
    INSERT INTO do_storage (object_id, key, namespace, value)
    SELECT o, u.k, ns, u.v FROM unnest(ks, vs) AS u(k, v) WHERE u.v IS NOT NULL
    ON CONFLICT (object_id, key) DO UPDATE SET value = EXCLUDED.value, written_at = now()
    WHERE do_storage.value IS DISTINCT FROM EXCLUDED.value;
    DELETE FROM do_history_restores WHERE object_id = o;
    RETURN cardinality(ks);
END
$$;

-- Copy object src's storage at position p into object dst (namespace ns), which must have no
-- storage, under dst's epoch fence. Returns the keys copied; -1: epoch not current; -2: dst
-- has storage already (nothing written).
CREATE OR REPLACE FUNCTION do_history_fork(src text, p bigint, dst text, ns text, part int, ep bigint)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    n int;
BEGIN
    PERFORM 1 FROM do_partitions WHERE partition = part AND epoch = ep FOR SHARE;
    IF NOT FOUND THEN
        RETURN -1;
    END IF;
    IF EXISTS (SELECT 1 FROM do_storage WHERE object_id = dst) THEN
        RETURN -2;
    END IF;
    INSERT INTO do_storage (object_id, key, namespace, value)
    SELECT dst, s.key, ns, s.value FROM do_history_state_at(src, p) s;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
