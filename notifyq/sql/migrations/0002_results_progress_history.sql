-- Schema version 2: dedupe keys, results, progress and checkpoints, the status
-- history; purge_batch (one batch, for serve's retention), and purge deletes a
-- job's history with it.  schema.sql holds the same
-- objects for new databases.

ALTER TABLE notifyq.jobs
    ADD COLUMN IF NOT EXISTS dedupe_key       text,
    ADD COLUMN IF NOT EXISTS result           jsonb,
    ADD COLUMN IF NOT EXISTS progress         real,
    ADD COLUMN IF NOT EXISTS progress_message text,
    ADD COLUMN IF NOT EXISTS checkpoint       jsonb,
    ADD CONSTRAINT jobs_dedupe_key_length CHECK (char_length(dedupe_key) BETWEEN 1 AND 255),
    ADD CONSTRAINT jobs_progress_range CHECK (progress BETWEEN 0 AND 100),
    ADD CONSTRAINT jobs_progress_message_length CHECK (char_length(progress_message) <= 200);

COMMENT ON CONSTRAINT jobs_dedupe_key_length ON notifyq.jobs IS
    'dedupe_key: NULL or 1-255 characters';
COMMENT ON CONSTRAINT jobs_progress_range ON notifyq.jobs IS
    'progress: NULL or a percentage from 0 to 100';
COMMENT ON CONSTRAINT jobs_progress_message_length ON notifyq.jobs IS
    'progress_message: at most 200 characters';

-- One unfinished job per dedupe_key.  Any status that is not final counts as
-- unfinished, so a job waiting for a retry's backoff still holds its key.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_dedupe_idx
    ON notifyq.jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status NOT IN ('succeeded', 'dead', 'cancelled');

-- History: one row per status transition (and one per insert), written by two
-- statement triggers in the writer's transaction, so the record and the change
-- commit or vanish together.  `notifyq.set_history(false)` disables the
-- triggers where throughput matters more than the audit trail.  Rows go with
-- their job: purge deletes both.
CREATE TABLE IF NOT EXISTS notifyq.job_history (
    job_id      bigint      NOT NULL,
    id          bigint      GENERATED ALWAYS AS IDENTITY,
    at          timestamptz NOT NULL DEFAULT now(),
    from_status text,                -- NULL: the job was inserted
    to_status   text        NOT NULL,
    attempt     integer     NOT NULL,  -- the job's attempts after the change
    error       text,                -- last_error, when this change set it
    dispatcher  text,                -- the claimant involved (claiming, or releasing)
    PRIMARY KEY (job_id, id)
);
COMMENT ON TABLE notifyq.job_history IS
    'Every status change of every job (time, from, to, attempt, error), kept by triggers; '
    'switch with notifyq.set_history(boolean).';

-- SECURITY DEFINER: whoever changes a job (a producer, a dispatcher, an
-- operator) gets its history written without any right on job_history, so no
-- one but the owner can write (or forge) the audit trail.
CREATE OR REPLACE FUNCTION notifyq.record_history() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO notifyq.job_history (job_id, from_status, to_status, attempt)
        SELECT n.id, NULL, n.status, n.attempts FROM new_rows n;
    ELSE
        INSERT INTO notifyq.job_history (job_id, from_status, to_status, attempt, error, dispatcher)
        SELECT n.id, o.status, n.status, n.attempts,
               CASE WHEN n.last_error IS DISTINCT FROM o.last_error THEN n.last_error END,
               COALESCE(n.claimed_by, o.claimed_by)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status IS DISTINCT FROM o.status;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_history_inserted
    AFTER INSERT ON notifyq.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.record_history();

CREATE OR REPLACE TRIGGER jobs_history_changed
    AFTER UPDATE ON notifyq.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.record_history();

-- Switch the history on or off (both triggers at once); needs the table's owner.
-- Returns whether it is on now.
CREATE OR REPLACE FUNCTION notifyq.set_history(enabled boolean) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF enabled THEN
        ALTER TABLE notifyq.jobs ENABLE TRIGGER jobs_history_inserted;
        ALTER TABLE notifyq.jobs ENABLE TRIGGER jobs_history_changed;
    ELSE
        ALTER TABLE notifyq.jobs DISABLE TRIGGER jobs_history_inserted;
        ALTER TABLE notifyq.jobs DISABLE TRIGGER jobs_history_changed;
    END IF;
    RETURN enabled;
END
$$;
COMMENT ON FUNCTION notifyq.set_history(boolean) IS
    'Switch the status history (notifyq.job_history) on or off; run it as the owner of notifyq.jobs.';

-- Delete at most max_rows jobs that finished more than older_than ago, oldest
-- first, along jobs_finished_idx, with their history.  Only succeeded, dead
-- and cancelled rows qualify: queued and running rows (the queue itself) are
-- never read, locked or deleted, so dispatchers claim as usual meanwhile.
-- Run it in a transaction of its own per batch (as `notifyq serve`'s retention
-- does) to hold each batch's locks only briefly.  Returns how many jobs went.
-- It runs as the owner, so a role allowed to EXECUTE it (the worker role) can
-- delete finished jobs this way and no other.
CREATE OR REPLACE FUNCTION notifyq.purge_batch(
    older_than interval,
    statuses text[],
    max_rows integer
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER  -- notifyq serve's retention runs it as the worker role, which cannot DELETE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted bigint;
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
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'notifyq: purge needs a batch size of at least 1, got %', max_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The CTE fixes the batch (a LIMIT in a plain DELETE is not allowed); SKIP
    -- LOCKED steps around a row an operator is retrying, or another dispatcher's
    -- retention is deleting, right now.
    WITH doomed AS MATERIALIZED (
        SELECT j.id FROM notifyq.jobs j
        WHERE j.status IN ('succeeded', 'dead', 'cancelled')
          AND j.status = ANY(purge_batch.statuses)
          AND j.finished_at < now() - older_than
        ORDER BY j.finished_at
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM notifyq.jobs j USING doomed d WHERE j.id = d.id RETURNING j.id
    ), history AS (
        DELETE FROM notifyq.job_history h USING gone g WHERE h.job_id = g.id
    )
    SELECT count(*) INTO deleted FROM gone;
    RETURN deleted;
END
$$;
COMMENT ON FUNCTION notifyq.purge_batch(interval, text[], integer) IS
    'Delete at most max_rows jobs of the given statuses (only succeeded, dead and cancelled are '
    'allowed) that finished more than older_than ago, with their history; never touches queued '
    'or running jobs. Returns how many were deleted.';

-- Delete every job of the given statuses that finished more than older_than
-- ago, 10,000 per batch (purge_batch), all in the caller's transaction.
-- Returns how many jobs were deleted.
CREATE OR REPLACE FUNCTION notifyq.purge(
    older_than interval,
    statuses text[] DEFAULT '{succeeded,cancelled}'
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    batch bigint;
    total bigint := 0;
BEGIN
    LOOP
        batch := notifyq.purge_batch(older_than, statuses, 10000);
        total := total + batch;
        EXIT WHEN batch < 10000;
    END LOOP;
    RETURN total;
END
$$;
COMMENT ON FUNCTION notifyq.purge(interval, text[]) IS
    'Delete jobs of the given statuses (default succeeded and cancelled; only succeeded, dead and '
    'cancelled are allowed) that finished more than older_than ago, with their history, 10,000 '
    'per batch; never touches queued or running jobs. Returns how many were deleted.';

REVOKE EXECUTE ON FUNCTION notifyq.purge_batch(interval, text[], integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.record_history() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.set_history(boolean) FROM PUBLIC;
