-- Schema version 1: the first released schema (schema.sql at commit 4b87306),
-- frozen.  Never edit it: databases built by older releases got exactly this,
-- recorded as version 1, and the numbered migrations after it start from there.
-- `notifyq migrate` applies it to an empty database, then every later file in
-- order; each statement is idempotent, as it was when it was the whole schema.
--
-- The public contract at version 1 (what other languages could rely on): the table
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

-- The trigger functions run as whoever writes the row (a dispatcher, an
-- operator), so every function and type they name is qualified with
-- pg_catalog: a better-matching function in a schema on the writer's
-- search_path (public is writable by everyone before PostgreSQL 15), or a temp
-- table named like a type, cannot capture the call.  Qualified names cost
-- nothing, unlike a SET search_path clause on the enqueue path.  The
-- transition tables (inserted, new_rows, old_rows) are found before any table
-- of the same name.

-- One notification per statement per queue, never one per row: a 100,000-row
-- INSERT wakes the dispatchers once.  The payload is the queue name only; a
-- notification is a hint to look at the table, never the job itself.
CREATE OR REPLACE FUNCTION notifyq.notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('notifyq_jobs', q.queue)
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
    PERFORM pg_catalog.pg_notify(
        'notifyq_status',
        pg_catalog.json_build_object('queue', c.queue, 'status', c.status)::pg_catalog.text)
    FROM (SELECT DISTINCT n.queue, n.status
          FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.status IS DISTINCT FROM o.status) AS c;
    PERFORM pg_catalog.pg_notify('notifyq_jobs', r.queue)
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

-- Operations
--
-- What `notifyq watch`, the admin commands and the dispatcher registry need.
-- Every admin action is a plain SQL function, so any language (or psql) can do
-- what the CLI does.  EXECUTE on them is revoked from PUBLIC: grant it to the
-- roles that may operate the queue.  They pin search_path to pg_catalog (pg_temp
-- last), so no function, operator or type from another schema can stand in for
-- a built-in while an operator (often the owner) runs them.

-- Finished rows by finish time: "succeeded/dead in the last minute" for
-- monitors, and purge's range scan (never a scan of the whole table).
CREATE INDEX IF NOT EXISTS jobs_finished_idx
    ON notifyq.jobs (finished_at) INCLUDE (queue, status)
    WHERE status IN ('succeeded', 'dead', 'cancelled');
-- The dead-letter queue per queue, counted on every monitor refresh.
CREATE INDEX IF NOT EXISTS jobs_dead_idx
    ON notifyq.jobs (queue, finished_at) WHERE status = 'dead';
-- Jobs that have failed at least once, by their last start: small while jobs
-- succeed at the first attempt, so it costs the usual path nothing.
CREATE INDEX IF NOT EXISTS jobs_failed_idx
    ON notifyq.jobs (started_at) INCLUDE (queue, status)
    WHERE last_error IS NOT NULL;

-- One row per `notifyq serve` process: written at start, refreshed on every
-- lease heartbeat (with the number of jobs it holds), marked stopped on a
-- graceful exit.  A row whose heartbeat is older than three heartbeat
-- intervals belongs to a process that died or lost the database (see
-- notifyq.dispatcher_status); rows of stopped and lost dispatchers are deleted
-- by the live dispatchers' upkeep a day later.
CREATE TABLE IF NOT EXISTS notifyq.dispatchers (
    claimant     text        PRIMARY KEY,  -- host:pid:random, as in jobs.claimed_by
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    queues       text[]      NOT NULL,
    concurrency  integer     NOT NULL,
    running      integer     NOT NULL DEFAULT 0,  -- jobs claimed, outcome not yet written
    heartbeat    float8      NOT NULL,  -- seconds between two heartbeats of this process
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz
);
COMMENT ON TABLE notifyq.dispatchers IS
    'One row per notifyq serve process, kept by the dispatchers themselves: read it, do not write it.';

CREATE OR REPLACE VIEW notifyq.dispatcher_status AS
SELECT d.*,
       CASE WHEN d.stopped_at IS NOT NULL THEN 'stopped'
            WHEN d.heartbeat_at < now() - make_interval(secs => 3 * d.heartbeat) THEN 'lost'
            ELSE 'running' END AS state
FROM notifyq.dispatchers d;
COMMENT ON VIEW notifyq.dispatcher_status IS
    'notifyq.dispatchers with a state: running, stopped (graceful exit) or lost '
    '(no heartbeat for three intervals: killed, hung or cut off from the database).';

-- The status of job id, its row locked for the caller's update; raises when
-- there is no such job.  Shared by retry_job and cancel_job.
CREATE OR REPLACE FUNCTION notifyq.lock_job(id bigint) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was text;
BEGIN
    SELECT j.status INTO was FROM notifyq.jobs j WHERE j.id = lock_job.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'notifyq: no job with id %', lock_job.id
            USING ERRCODE = 'no_data_found', HINT = 'List jobs with: notifyq jobs list';
    END IF;
    RETURN was;
END
$$;
COMMENT ON FUNCTION notifyq.lock_job(bigint) IS
    'Internal to retry_job and cancel_job: the job''s status, row locked; raises for an unknown id.';

-- Run one job again, now.  dead or cancelled: queued with attempts from 0;
-- queued (scheduled, or waiting for a retry's backoff): only run_at moves.
-- last_error is kept.  Returns the status the job had.
CREATE OR REPLACE FUNCTION notifyq.retry_job(id bigint) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was text := notifyq.lock_job(retry_job.id);
BEGIN
    IF was IN ('running', 'succeeded') THEN
        RAISE EXCEPTION 'notifyq: job % is %: it cannot be retried', retry_job.id, was
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = CASE WHEN was = 'running'
                              THEN 'It is running now; cancel it first to stop it.'
                              ELSE 'It has succeeded; enqueue a new job instead.' END;
    END IF;
    UPDATE notifyq.jobs j
    SET status = 'queued',
        run_at = now(),
        attempts = CASE WHEN was = 'queued' THEN j.attempts ELSE 0 END,
        started_at = CASE WHEN was = 'queued' THEN j.started_at END,
        finished_at = NULL
    WHERE j.id = retry_job.id;
    RETURN was;
END
$$;
COMMENT ON FUNCTION notifyq.retry_job(bigint) IS
    'Run job id now: dead or cancelled -> queued with attempts reset to 0; queued -> run_at now(). '
    'Keeps last_error. Returns the previous status; raises for an unknown id, a running or a '
    'succeeded job.';

-- Re-queue every dead job (of one queue and/or one task when given).
CREATE OR REPLACE FUNCTION notifyq.retry_dead(queue text DEFAULT NULL, task text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE notifyq.jobs j
    SET status = 'queued', attempts = 0, run_at = now(), started_at = NULL, finished_at = NULL
    WHERE j.status = 'dead'
      AND (retry_dead.queue IS NULL OR j.queue = retry_dead.queue)
      AND (retry_dead.task IS NULL OR j.task = retry_dead.task);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION notifyq.retry_dead(text, text) IS
    'Re-queue dead jobs (optionally only of one queue and/or task): queued, attempts 0, run_at '
    'now(), last_error kept. Returns how many.';

-- Cancel one job.  queued: it never runs.  running: marked cancelled at once;
-- the status trigger's notification tells the dispatcher running it, which
-- interrupts an async handler and tells a sync one (JobContext.cancelled);
-- whatever the handler does, nothing more is written: no retry, no second
-- status change.  A plain UPDATE to 'cancelled' does the same.
CREATE OR REPLACE FUNCTION notifyq.cancel_job(id bigint) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was text := notifyq.lock_job(cancel_job.id);
BEGIN
    IF was NOT IN ('queued', 'running') THEN
        RAISE EXCEPTION 'notifyq: job % is already %: it cannot be cancelled', cancel_job.id, was
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only queued and running jobs can be cancelled.';
    END IF;
    UPDATE notifyq.jobs j
    SET status = 'cancelled', finished_at = now(), claimed_by = NULL, lease_expires_at = NULL
    WHERE j.id = cancel_job.id;
    RETURN was;
END
$$;
COMMENT ON FUNCTION notifyq.cancel_job(bigint) IS
    'Cancel job id: queued -> cancelled (it never runs); running -> cancelled at once (the '
    'dispatcher running it interrupts its handler; nothing more is written). Returns the '
    'previous status; raises for an unknown id or a finished job.';

-- Delete jobs that finished more than older_than ago, 10,000 rows per
-- statement along jobs_finished_idx.  Only succeeded, dead and cancelled rows
-- qualify: queued and running rows (the queue itself) are never read, locked
-- or deleted, so dispatchers claim as usual meanwhile.  Every batch belongs to
-- the caller's transaction.  Returns how many rows were deleted.
CREATE OR REPLACE FUNCTION notifyq.purge(
    older_than interval,
    statuses text[] DEFAULT '{succeeded,cancelled}'
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cutoff timestamptz := now() - older_than;
    batch bigint;
    total bigint := 0;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'notifyq: purge needs an interval of zero or more, got %', older_than
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example: interval ''7 days''.';
    END IF;
    IF statuses IS NULL OR cardinality(statuses) = 0
       OR NOT statuses <@ ARRAY['succeeded', 'dead', 'cancelled'] THEN
        RAISE EXCEPTION 'notifyq: purge deletes finished jobs only, not statuses %', statuses
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Name some of succeeded, dead, cancelled; queued and running jobs are the queue.';
    END IF;
    LOOP
        -- The CTE fixes the batch (a LIMIT in a plain DELETE is not allowed);
        -- SKIP LOCKED steps around a row an operator is retrying right now.
        WITH doomed AS MATERIALIZED (
            SELECT j.id FROM notifyq.jobs j
            WHERE j.status IN ('succeeded', 'dead', 'cancelled')
              AND j.status = ANY(purge.statuses)
              AND j.finished_at < cutoff
            ORDER BY j.finished_at
            LIMIT 10000
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM notifyq.jobs j USING doomed d WHERE j.id = d.id;
        GET DIAGNOSTICS batch = ROW_COUNT;
        total := total + batch;
        EXIT WHEN batch < 10000;
    END LOOP;
    RETURN total;
END
$$;
COMMENT ON FUNCTION notifyq.purge(interval, text[]) IS
    'Delete jobs of the given statuses (default succeeded and cancelled; only succeeded, dead and '
    'cancelled are allowed) that finished more than older_than ago, 10,000 per batch; never '
    'touches queued or running jobs. Returns how many were deleted.';

-- Trigger functions need no EXECUTE privilege to fire; nobody calls them directly.
REVOKE EXECUTE ON FUNCTION notifyq.notify_inserted() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.notify_status_changed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.lock_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.retry_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.retry_dead(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.cancel_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.purge(interval, text[]) FROM PUBLIC;
