-- Schema version 19: uniqueness beyond unfinished jobs (unique_for windows, and
-- on_duplicate = 'replace' for debounce), and the results of a job's dependencies
-- for the job (notifyq.dependency_results).  schema.sql holds the same objects for
-- new databases.

-- ---------------------------------------------------------------------------
-- Keys beyond unfinished jobs
--
-- A dedupe_key alone holds while its job is unfinished (jobs_dedupe_idx).  Two
-- columns, both NULL by default and both needing a dedupe_key, change what
-- another INSERT with the key meets:
--
--   unique_for    the key is also held for this long after the job was enqueued
--                 (now() of the INSERT), even once the job finished: an INSERT
--                 with the key and unique_for inserts nothing while that window
--                 lasts.  A sliding window from the enqueue that opened it, not a
--                 fixed bucket: "at most one job per hour per key" must not allow
--                 two jobs a second apart across a bucket's edge.  A refused
--                 INSERT does not open or extend a window.
--   on_duplicate  'replace': while a queued (or waiting) job inserted with
--                 'replace' too holds the key, the INSERT inserts nothing and
--                 gives that job its payload and run_at instead (debounce).  While
--                 the holder runs, it may have read its payload already: the
--                 INSERT goes in as a new job, and the running job gives up the
--                 key to it.  A holder inserted without 'replace' is never
--                 changed: the key's own rule refuses the row.  'refuse' (or
--                 NULL) is the dedupe_key's own rule.
--
-- Refused and replaced rows are dropped by the BEFORE INSERT trigger below
-- (RETURN NULL), with or without ON CONFLICT: the INSERT reports fewer rows and
-- `RETURNING id` returns none, as ON CONFLICT DO NOTHING does for a dedupe_key.
-- The two are not combined (a window that replaces is a throttle, a feature of
-- its own).  Adding NULL columns rewrites nothing; validating the CHECKs reads
-- notifyq.jobs once under the ACCESS EXCLUSIVE lock the ALTER TABLE takes.
ALTER TABLE notifyq.jobs
    ADD COLUMN IF NOT EXISTS unique_for interval,
    ADD COLUMN IF NOT EXISTS on_duplicate text,
    ADD CONSTRAINT jobs_unique_for_valid CHECK (
        unique_for IS NULL
        OR (unique_for > interval '0' AND unique_for <= interval '10 years'
            AND dedupe_key IS NOT NULL)),
    ADD CONSTRAINT jobs_on_duplicate_valid CHECK (
        on_duplicate IS NULL
        OR (on_duplicate IN ('refuse', 'replace') AND dedupe_key IS NOT NULL
            AND (on_duplicate = 'refuse' OR unique_for IS NULL)));
COMMENT ON CONSTRAINT jobs_unique_for_valid ON notifyq.jobs IS
    'unique_for: NULL, or more than 0 and at most 10 years, with a dedupe_key';
COMMENT ON CONSTRAINT jobs_on_duplicate_valid ON notifyq.jobs IS
    'on_duplicate: NULL, refuse or replace, with a dedupe_key; replace not with unique_for';
COMMENT ON COLUMN notifyq.jobs.unique_for IS
    'With dedupe_key: no other job with the key is inserted for this long after this one '
    'was enqueued, even once it finished.';
COMMENT ON COLUMN notifyq.jobs.on_duplicate IS
    'With dedupe_key, replace: an INSERT with replace meeting a queued job with the key, '
    'inserted with replace too, gives it its payload and run_at instead of being refused '
    '(debounce).';

-- One row per key whose window was opened: the job that opened it and when it
-- ends.  Written only for a row that went in (jobs_unique_window_opened).  Rows
-- whose window ended are deleted by retention (notifyq.expire_unique_windows) or
-- reused by the key's next window.
CREATE TABLE IF NOT EXISTS notifyq.unique_windows (
    dedupe_key text        PRIMARY KEY,
    job_id     bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);
COMMENT ON TABLE notifyq.unique_windows IS
    'The open unique_for windows: no job with dedupe_key is inserted before expires_at. '
    'Kept by the insert trigger and retention: read it, do not write it.';
-- Retention finds the windows that ended without reading the others.
CREATE INDEX IF NOT EXISTS unique_windows_expires_idx ON notifyq.unique_windows (expires_at);

-- BEFORE INSERT, only for rows with unique_for or on_duplicate = 'replace' (the
-- trigger's WHEN): every other INSERT pays nothing.  Its name sorts before
-- jobs_dependencies_on_insert, so a refused row costs no dependency check.
--
-- Race-free under concurrent producers in READ COMMITTED (the default):
--   unique_for: a transaction-level advisory lock on the key (28279, hashtext
--     of it) orders the producers of one key until each commits; the window is
--     then read with a new snapshot, which sees every earlier producer's window.
--     So one job per window, however many producers race.  An unfinished job
--     holding the key (jobs_dedupe_idx) refuses the row too.  The window is
--     written only once the row is in (AFTER INSERT, open_unique_window): a row
--     dropped after this trigger, by ON CONFLICT on jobs_dedupe_idx (a job of
--     the key not committed yet when it looked: a producer not using unique_for,
--     a dead job retried), opens no window.
--   replace: the same lock on the key orders the replacing producers of one
--     key until each commits; the
--     holder is then read (a new snapshot: it sees every earlier producer's
--     job) and locked FOR NO KEY UPDATE, as a completion locks it.  A claim
--     skips the locked row (SKIP LOCKED) and takes it, with the new payload,
--     once this transaction ends; a claim that locked it first makes this wait,
--     and then the holder is running.  So the last producer's payload is the
--     one that runs.
-- In REPEATABLE READ or SERIALIZABLE a producer that meets a concurrent change
-- fails with a serialization error (retry the transaction); replace can insert
-- a second job there, which jobs_dedupe_idx refuses.  Producers that use one key
-- with and without these columns are not ordered against each other: use a key
-- one way.  Several keys used in one transaction are locked in the order
-- given: two transactions giving them in different orders can deadlock (one is
-- cancelled).
--
-- SECURITY DEFINER: a producer may neither read nor lock jobs, nor write the
-- windows.  The pinned search_path costs only the rows that use the feature.
CREATE OR REPLACE FUNCTION notifyq.dedupe_on_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    holder record;
    window_ends timestamptz;
BEGIN
    -- Every row a CHECK refuses goes on to it, even while a window would drop it.
    IF NEW.dedupe_key IS NULL OR char_length(NEW.dedupe_key) > 255
       OR (NEW.unique_for IS NOT NULL AND NEW.on_duplicate = 'replace')
       OR NEW.unique_for <= interval '0' OR NEW.unique_for > interval '10 years'
       OR NEW.on_duplicate NOT IN ('refuse', 'replace') THEN
        RETURN NEW;  -- the CHECK constraints refuse it, with their names
    END IF;
    IF NEW.on_duplicate = 'replace' THEN
        PERFORM pg_advisory_xact_lock(28279, hashtext(NEW.dedupe_key));
        -- Only a job enqueued to be replaced is: one whose producer chose the key's
        -- own rule keeps its payload, run_at and key, whoever inserts the key next
        -- (the producer role may not change jobs).  Then jobs_dedupe_idx refuses this
        -- row, as it refuses any duplicate of that key.
        SELECT j.id, j.status, j.task, j.rate_reserved, j.attempts INTO holder
        FROM notifyq.jobs j
        WHERE j.dedupe_key = NEW.dedupe_key AND j.status NOT IN ('succeeded', 'dead', 'cancelled')
          AND j.on_duplicate = 'replace'
        FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN NEW;
        END IF;
        IF holder.task <> NEW.task THEN
            RAISE EXCEPTION 'notifyq: dedupe_key % is held by job %, of task %, not %',
                pg_catalog.quote_literal(NEW.dedupe_key), holder.id, holder.task, NEW.task
                USING ERRCODE = 'check_violation',
                      HINT = 'on_duplicate = ''replace'' replaces the payload of a job of '
                             'the same task: give each task keys of its own.';
        END IF;
        IF holder.status IN ('queued', 'waiting') THEN
            -- A job already attempted (queued again for its retry's backoff) or given a
            -- rate limit's slot keeps the later run_at: replacing never runs it sooner
            -- than its backoff or its slot.  Moved past its slot, it gives the slot up:
            -- a reserved job starts when due without the rate check, so keeping the
            -- flag would start it at a time the rate limit never granted.  The
            -- checkpoint belonged to the old payload.
            UPDATE notifyq.jobs j
            SET payload = NEW.payload,
                run_at = CASE WHEN holder.rate_reserved OR holder.attempts > 0
                              THEN greatest(j.run_at, NEW.run_at) ELSE NEW.run_at END,
                rate_reserved = j.rate_reserved AND NEW.run_at <= j.run_at,
                checkpoint = NULL
            WHERE j.id = holder.id;
            RETURN NULL;
        END IF;
        -- Running: the new payload needs a run of its own, and takes over the key.
        UPDATE notifyq.jobs j SET dedupe_key = NULL, on_duplicate = NULL WHERE j.id = holder.id;
        RETURN NEW;
    END IF;
    -- unique_for.  In REPEATABLE READ the reads below keep the transaction's
    -- snapshot: a window or job committed meanwhile is met by the window's write or
    -- the key's index instead, which raise a serialization error.
    PERFORM pg_advisory_xact_lock(28279, hashtext(NEW.dedupe_key));
    SELECT w.expires_at INTO window_ends
    FROM notifyq.unique_windows w WHERE w.dedupe_key = NEW.dedupe_key;
    IF FOUND AND window_ends > now() THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT FROM notifyq.jobs j
               WHERE j.dedupe_key = NEW.dedupe_key
                 AND j.status NOT IN ('succeeded', 'dead', 'cancelled')) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;  -- open_unique_window opens the key's next window, once the row is in
END
$$;

CREATE OR REPLACE TRIGGER jobs_dedupe_on_insert
    BEFORE INSERT ON notifyq.jobs
    FOR EACH ROW
    WHEN (NEW.unique_for IS NOT NULL OR NEW.on_duplicate = 'replace')
    EXECUTE FUNCTION notifyq.dedupe_on_insert();

-- AFTER INSERT, only for rows with unique_for: the row went in (no ON CONFLICT
-- dropped it), so it opens its key's window, or the next one where one ended.
-- The key's lock, taken by dedupe_on_insert and held to the commit, keeps
-- every other producer of the key away meanwhile.
CREATE OR REPLACE FUNCTION notifyq.open_unique_window() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO notifyq.unique_windows AS w (dedupe_key, job_id, expires_at)
    VALUES (NEW.dedupe_key, NEW.id, now() + NEW.unique_for)
    ON CONFLICT (dedupe_key) DO UPDATE
    SET job_id = excluded.job_id, expires_at = excluded.expires_at;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_unique_window_opened
    AFTER INSERT ON notifyq.jobs
    FOR EACH ROW
    WHEN (NEW.unique_for IS NOT NULL)
    EXECUTE FUNCTION notifyq.open_unique_window();
-- Trigger functions need no EXECUTE privilege to fire; nobody calls them directly.
REVOKE EXECUTE ON FUNCTION notifyq.dedupe_on_insert() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.open_unique_window() FROM PUBLIC;

-- Retention: delete up to max_rows windows that ended (oldest first), skipping
-- rows an INSERT holds right now; returns how many.  A window that ended while
-- its job is unfinished holds nothing the job's dedupe_key does not.  SECURITY
-- DEFINER: the worker role runs it without any right on the table.
CREATE OR REPLACE FUNCTION notifyq.expire_unique_windows(max_rows integer) RETURNS integer
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH ended AS (
        SELECT w.dedupe_key FROM notifyq.unique_windows w
        WHERE w.expires_at <= now()
        ORDER BY w.expires_at
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM notifyq.unique_windows w USING ended e
        WHERE w.dedupe_key = e.dedupe_key
        RETURNING 1
    )
    SELECT count(*)::integer FROM deleted
$$;
COMMENT ON FUNCTION notifyq.expire_unique_windows(integer) IS
    'Delete up to max_rows unique_for windows that ended; returns how many.';
REVOKE EXECUTE ON FUNCTION notifyq.expire_unique_windows(integer) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Results for dependents
--
-- The dependencies of job_id, in depends_on's order, each with its status and
-- result (NULL unless it succeeded; status NULL: deleted since).  For the worker
-- that runs the job, in any language: read when asked, so a claim pays nothing.
-- SECURITY INVOKER: it reads with the caller's rights, which the worker role has
-- (SELECT on notifyq.jobs).  Not through a job's token: a producer chooses
-- depends_on, so the token of its own job would show it the results of any job.
CREATE OR REPLACE FUNCTION notifyq.dependency_results(job_id bigint)
RETURNS TABLE (id bigint, status text, result jsonb)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT d.id, j.status, j.result
    FROM notifyq.jobs me
    CROSS JOIN LATERAL unnest(me.depends_on) WITH ORDINALITY AS d(id, n)
    LEFT JOIN notifyq.jobs j ON j.id = d.id
    WHERE me.id = $1
    ORDER BY d.n
$$;
COMMENT ON FUNCTION notifyq.dependency_results(bigint) IS
    'The dependencies of a job, in depends_on order: id, status and result (for a worker: '
    'needs SELECT on notifyq.jobs).';
REVOKE EXECUTE ON FUNCTION notifyq.dependency_results(bigint) FROM PUBLIC;

-- The roles `notifyq roles` made get what this version adds (run `notifyq roles`
-- again to be exact): those that may enqueue (INSERT on jobs.task) the new columns,
-- and a read of the windows (to name the job holding a key); those that run retention
-- (EXECUTE on notifyq.purge_batch) the window cleanup and the results.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole AS role
        FROM pg_catalog.pg_attribute att, pg_catalog.aclexplode(att.attacl) AS a
        WHERE att.attrelid = 'notifyq.jobs'::regclass AND att.attname = 'task'
          AND a.privilege_type = 'INSERT' AND a.grantee <> 0
    LOOP
        EXECUTE format('GRANT INSERT (unique_for, on_duplicate) ON notifyq.jobs TO %s', r.role);
        EXECUTE format('GRANT SELECT (dedupe_key, job_id, expires_at) ON notifyq.unique_windows TO %s',
                       r.role);
    END LOOP;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole AS role
        FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) AS a
        WHERE p.oid = 'notifyq.purge_batch(interval, text[], integer)'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION notifyq.expire_unique_windows(integer), '
                       'notifyq.dependency_results(bigint) TO %s', r.role);
    END LOOP;
END
$$;
