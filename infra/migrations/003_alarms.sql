-- Alarms: due_ms is when the alarm next wakes (the scheduled time, or a retry's time after a
-- failed run; scheduled_ms stays what the object set, as Cloudflare reports it). generation is
-- a random token naming one set_alarm (or one retry): a wake-up for another generation is stale.
ALTER TABLE do_alarms ADD COLUMN IF NOT EXISTS due_ms bigint;
UPDATE do_alarms SET due_ms = scheduled_ms WHERE due_ms IS NULL;
ALTER TABLE do_alarms ALTER COLUMN due_ms SET NOT NULL;
DROP INDEX IF EXISTS do_alarms_due;
CREATE INDEX IF NOT EXISTS do_alarms_partition_due ON do_alarms (partition, due_ms);

-- do_flush writes the alarm rows too: see 004 (one definition of the function per release).
