-- What the operator commands read (durable objects ls, state, alarms ls), for databases whose
-- 001 was applied before it had them. Idempotent: a new database already has written_at.

-- when a key was last written (001 creates it; an older do_storage gains it here, and on such a
-- database it records the first write of a key until do_flush is replaced by a later schema)
ALTER TABLE do_storage ADD COLUMN IF NOT EXISTS written_at timestamptz NOT NULL DEFAULT now();

-- The names objects were made from, where a worker saw one (names.py): for operators only.
CREATE TABLE IF NOT EXISTS do_object_names (
    object_id  text PRIMARY KEY,
    namespace  text NOT NULL,
    name       text NOT NULL
);
CREATE INDEX IF NOT EXISTS do_object_names_prefix ON do_object_names (namespace, name text_pattern_ops);
