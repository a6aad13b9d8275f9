-- notifyq schema, version 1.
--
-- This file is the one canonical schema. `notifyq migrate` applies it (in one
-- transaction, under an advisory lock, recording the version); by hand it is
--
--     psql -1 -v ON_ERROR_STOP=1 -f schema.sql "$DSN"
--
-- Every statement is idempotent, so applying it twice changes nothing.
-- Later schema changes are numbered migrations in notifyq/sql/migrations/.
--
-- The public contract (what other languages may rely on) is: the table
-- notifyq.jobs with its columns id, queue, task, payload, priority, run_at,
-- status, attempts, max_attempts, last_error, created_at, started_at,
-- finished_at; the status values; the view notifyq.queue_stats; and the
-- notification channels notifyq_jobs and notifyq_status.  Columns whose
-- names start with lease_ or claimed_ are the dispatchers' bookkeeping.

CREATE SCHEMA IF NOT EXISTS notifyq;

CREATE TABLE IF NOT EXISTS notifyq.schema_version (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS notifyq.jobs (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text        NOT NULL DEFAULT 'default',
    task             text        NOT NULL,
    payload          jsonb       NOT NULL DEFAULT '{}',
    priority         integer     NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    status           text        NOT NULL DEFAULT 'queued',
    attempts         integer     NOT NULL DEFAULT 0,
    -- NULL means "the task's own setting": the first claim fills it in.
    max_attempts     integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- Which dispatcher runs the current attempt, and until when its lease holds.
    claimed_by       text,
    lease_expires_at timestamptz,

    CONSTRAINT jobs_queue_format CHECK (queue ~ '^[a-z0-9_][a-z0-9_-]{0,62}$'),
    CONSTRAINT jobs_task_format CHECK (task ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$'),
    CONSTRAINT jobs_priority_range CHECK (priority BETWEEN -1000 AND 1000),
    CONSTRAINT jobs_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 1000),
    CONSTRAINT jobs_attempts_nonnegative CHECK (attempts >= 0),
    CONSTRAINT jobs_payload_size CHECK (pg_column_size(payload) <= 1048576),
    CONSTRAINT jobs_status_valid CHECK (
        status IN ('queued', 'running', 'succeeded', 'dead', 'cancelled')),
    CONSTRAINT jobs_running_has_lease CHECK (
        status <> 'running' OR (claimed_by IS NOT NULL AND lease_expires_at IS NOT NULL))
);

COMMENT ON TABLE notifyq.jobs IS
    'notifyq jobs. Enqueue with INSERT INTO notifyq.jobs (task, payload) VALUES (...).';
COMMENT ON CONSTRAINT jobs_queue_format ON notifyq.jobs IS
    'queue: 1-63 characters of a-z, 0-9, _ and -, not starting with -';
COMMENT ON CONSTRAINT jobs_task_format ON notifyq.jobs IS
    'task: 1-200 characters of letters, digits, _ . : and -, starting with a letter or _';
COMMENT ON CONSTRAINT jobs_priority_range ON notifyq.jobs IS
    'priority: an integer from -1000 to 1000; higher runs first';
COMMENT ON CONSTRAINT jobs_max_attempts_range ON notifyq.jobs IS
    'max_attempts: NULL (the task''s setting) or an integer from 1 to 1000';
COMMENT ON CONSTRAINT jobs_payload_size ON notifyq.jobs IS
    'payload: at most 1 MiB as jsonb before compression';
COMMENT ON CONSTRAINT jobs_attempts_nonnegative ON notifyq.jobs IS
    'attempts: never negative';
COMMENT ON CONSTRAINT jobs_status_valid ON notifyq.jobs IS
    'status: one of queued, running, succeeded, dead, cancelled';
COMMENT ON CONSTRAINT jobs_running_has_lease ON notifyq.jobs IS
    'a running job has claimed_by and lease_expires_at (set by the dispatcher that claimed it)';

-- Claimable rows, in claim order.  Partial, so finished rows cost nothing here.
CREATE INDEX IF NOT EXISTS jobs_claim_idx
    ON notifyq.jobs (queue, priority DESC, run_at, id) WHERE status = 'queued';
-- The earliest future run_at, for the dispatcher's precise timer.
CREATE INDEX IF NOT EXISTS jobs_scheduled_idx
    ON notifyq.jobs (run_at) WHERE status = 'queued';
-- Running jobs by lease, for the rescuer and for lease renewal.
CREATE INDEX IF NOT EXISTS jobs_lease_idx
    ON notifyq.jobs (lease_expires_at) WHERE status = 'running';

-- One notification per statement per queue, never one per row: a 100,000-row
-- INSERT wakes the dispatchers once.  The payload is the queue name only; a
-- notification is a hint to look at the table, never the job itself.
CREATE OR REPLACE FUNCTION notifyq.notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notifyq_jobs', q.queue)
    FROM (SELECT DISTINCT queue FROM inserted WHERE status = 'queued') AS q;
    RETURN NULL;
END
$$;

-- On every status change: notifyq_status gets one {"queue","status"} per
-- statement per pair (for monitors and waiters).  A job that became 'queued'
-- again (retry, re-queued dead job, rescued lease), or a queued job moved to
-- another queue or to an earlier run_at, wakes the dispatchers on
-- notifyq_jobs like an insert does.
CREATE OR REPLACE FUNCTION notifyq.notify_status_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notifyq_status',
                      json_build_object('queue', c.queue, 'status', c.status)::text)
    FROM (SELECT DISTINCT n.queue, n.status
          FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.status IS DISTINCT FROM o.status) AS c;
    PERFORM pg_notify('notifyq_jobs', r.queue)
    FROM (SELECT DISTINCT n.queue
          FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.status = 'queued'
            AND (o.status <> 'queued' OR o.queue <> n.queue OR n.run_at < o.run_at)) AS r;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_notify_inserted
    AFTER INSERT ON notifyq.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_inserted();

CREATE OR REPLACE TRIGGER jobs_notify_status_changed
    AFTER UPDATE ON notifyq.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_status_changed();

-- Per queue: jobs by status, and how long the oldest claimable job has waited.
CREATE OR REPLACE VIEW notifyq.queue_stats AS
SELECT queue,
       count(*) FILTER (WHERE status = 'queued')                     AS queued,
       count(*) FILTER (WHERE status = 'queued' AND run_at <= now()) AS ready,
       count(*) FILTER (WHERE status = 'queued' AND run_at > now())  AS scheduled,
       count(*) FILTER (WHERE status = 'running')                    AS running,
       count(*) FILTER (WHERE status = 'succeeded')                  AS succeeded,
       count(*) FILTER (WHERE status = 'dead')                       AS dead,
       count(*) FILTER (WHERE status = 'cancelled')                  AS cancelled,
       now() - min(run_at) FILTER (WHERE status = 'queued' AND run_at <= now())
                                                                      AS oldest_ready_age
FROM notifyq.jobs
GROUP BY queue;

INSERT INTO notifyq.schema_version (version) VALUES (1) ON CONFLICT (version) DO NOTHING;
