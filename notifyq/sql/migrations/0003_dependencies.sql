-- Schema version 3: job dependencies.
--
-- A job names the jobs it depends on in depends_on (ids of jobs that exist when
-- it is inserted).  It starts 'waiting' and becomes 'queued' when every one of
-- them has succeeded.  If one ends dead or cancelled, on_dependency_failure
-- decides: 'cancel' (the default) cancels it with a reason in last_error (which
-- cascades to its own dependents), 'run' queues it once all of them finished.
-- No polling: the statement that finishes a job releases its dependents, in
-- the same transaction.  Jobs without depends_on pay nothing: the BEFORE
-- INSERT trigger fires only for rows that have dependencies.
--
-- Cycles are impossible: a dependency must exist when its dependent is
-- inserted, and ids only grow, so a job can depend only on older jobs (and
-- never on itself).  depends_on is read at INSERT and whenever a dependency
-- finishes: do not change it afterwards.

ALTER TABLE notifyq.jobs
    ADD COLUMN IF NOT EXISTS depends_on bigint[],
    ADD COLUMN IF NOT EXISTS on_dependency_failure text NOT NULL DEFAULT 'cancel';

ALTER TABLE notifyq.jobs DROP CONSTRAINT IF EXISTS jobs_status_valid;
ALTER TABLE notifyq.jobs ADD CONSTRAINT jobs_status_valid CHECK (
    status IN ('queued', 'running', 'succeeded', 'dead', 'cancelled', 'waiting'));
COMMENT ON CONSTRAINT jobs_status_valid ON notifyq.jobs IS
    'status: one of queued, running, succeeded, dead, cancelled, waiting';

ALTER TABLE notifyq.jobs DROP CONSTRAINT IF EXISTS jobs_on_dependency_failure_valid;
ALTER TABLE notifyq.jobs ADD CONSTRAINT jobs_on_dependency_failure_valid CHECK (
    on_dependency_failure IN ('cancel', 'run'));
COMMENT ON CONSTRAINT jobs_on_dependency_failure_valid ON notifyq.jobs IS
    'on_dependency_failure: cancel (the job is cancelled when a dependency ends dead or '
    'cancelled) or run (it runs once every dependency finished, however)';

ALTER TABLE notifyq.jobs DROP CONSTRAINT IF EXISTS jobs_depends_on_valid;
ALTER TABLE notifyq.jobs ADD CONSTRAINT jobs_depends_on_valid CHECK (
    cardinality(depends_on) <= 1000
    AND array_position(depends_on, NULL) IS NULL);
COMMENT ON CONSTRAINT jobs_depends_on_valid ON notifyq.jobs IS
    'depends_on: NULL or up to 1000 job ids, none of them NULL';

-- The waiting jobs that depend on any of a set of jobs, for the release when
-- jobs finish: partial, so it holds only waiting rows, and GIN, so the lookup
-- (depends_on && finished ids) never scans the table.
CREATE INDEX IF NOT EXISTS jobs_waiting_idx
    ON notifyq.jobs USING gin (depends_on) WHERE status = 'waiting';

-- The status a job with these dependencies should have now, and why:
-- 'cancelled' with a reason when one of them ended dead or cancelled and the
-- policy is 'cancel'; 'waiting' while one has not finished; else 'queued'.
-- A dependency that no longer exists counts as finished: the INSERT trigger
-- refuses unknown ids, so one that is gone was deleted later, and purge
-- deletes finished jobs only.  Reads with the caller's snapshot.
CREATE OR REPLACE FUNCTION notifyq.dependency_status(
    depends_on bigint[], on_failure text, OUT status text, OUT reason text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    failed record;
BEGIN
    SELECT j.id, j.status INTO failed
    FROM notifyq.jobs j
    WHERE j.id = ANY(dependency_status.depends_on) AND j.status IN ('dead', 'cancelled')
    ORDER BY j.id
    LIMIT 1;
    IF FOUND AND on_failure = 'cancel' THEN
        status := 'cancelled';
        reason := format('cancelled: job %s, which this job depends on, %s', failed.id,
                         CASE failed.status WHEN 'dead' THEN 'ended dead' ELSE 'was cancelled' END);
    ELSIF EXISTS (SELECT FROM notifyq.jobs j
                  WHERE j.id = ANY(dependency_status.depends_on)
                    AND j.status NOT IN ('succeeded', 'dead', 'cancelled')) THEN
        status := 'waiting';
    ELSE
        status := 'queued';
    END IF;
END
$$;
COMMENT ON FUNCTION notifyq.dependency_status(bigint[], text) IS
    'Internal: the status (queued, waiting or cancelled, with the reason) that a job with '
    'these dependencies and this on_dependency_failure policy should have now.';

-- BEFORE INSERT, only for rows with dependencies (the trigger's WHEN): checks
-- that every dependency exists and sets the row's initial status.
--
-- The race it must win: a dependency finishing while its dependent is being
-- inserted.  The finishing transaction releases the dependents it can see; a
-- dependent inserted by a transaction not yet committed is invisible to it and
-- would wait forever.  So the dependencies are locked FOR SHARE, which
-- conflicts with the FOR NO KEY UPDATE lock every status UPDATE takes (FOR KEY
-- SHARE would not: it only blocks deletes and key changes):
--   * lock first: the finishing UPDATE waits until this transaction ends; its
--     release trigger then runs a statement with a new snapshot and sees the
--     committed dependent (READ COMMITTED, which the dispatchers use);
--   * finish first: the lock waits until the finishing transaction ends and
--     then reads the row's newest version, so this sees the dependency finished.
-- Locks are taken in id order, as everywhere a statement locks many rows.
--
-- SECURITY DEFINER: a producer may INSERT jobs but neither read them nor lock
-- them (a row lock needs UPDATE privilege), and this must do both.  The pinned
-- search_path costs only rows that have dependencies.
CREATE OR REPLACE FUNCTION notifyq.dependencies_on_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found bigint[];
    missing bigint;
    initial record;
BEGIN
    SELECT array_agg(l.id) INTO found
    FROM (SELECT j.id FROM notifyq.jobs j WHERE j.id = ANY(NEW.depends_on)
          ORDER BY j.id FOR SHARE) AS l;
    SELECT d.id INTO missing
    FROM unnest(NEW.depends_on) AS d(id)
    WHERE found IS NULL OR NOT d.id = ANY(found)
    LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'notifyq: job depends on job %, which does not exist', missing
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'depends_on names jobs inserted before this one (committed, or '
                         'earlier in the same transaction).';
    END IF;
    -- A new statement: its snapshot sees what the locks waited for.
    IF NEW.status = 'queued' THEN
        initial := notifyq.dependency_status(NEW.depends_on, NEW.on_dependency_failure);
        NEW.status := initial.status;
        IF initial.status = 'cancelled' THEN
            NEW.last_error := initial.reason;
            NEW.finished_at := now();
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER jobs_dependencies_on_insert
    BEFORE INSERT ON notifyq.jobs
    FOR EACH ROW
    WHEN (NEW.depends_on IS NOT NULL AND cardinality(NEW.depends_on) > 0)
    EXECUTE FUNCTION notifyq.dependencies_on_insert();

-- AFTER UPDATE, once per statement: when jobs finished (succeeded, dead,
-- cancelled), the waiting jobs that depend on them get the status their
-- dependencies now call for, in the same transaction.  waiting -> queued wakes
-- the dispatchers through jobs_notify_status_changed.
--
-- Cancellation cascades: the jobs waiting (under 'cancel') on a job cancelled
-- here, and the ones waiting on those, and so on, are found level by level in
-- a loop and cancelled by the same UPDATE.  Letting the UPDATE's own trigger
-- do the next level instead would nest one trigger call per level, and a chain
-- of a few hundred jobs would exceed max_stack_depth (and fail the statement
-- that finished the first job).  That UPDATE fires this trigger once more, for
-- the 'run' jobs waiting on the cancelled ones: at most three calls deep.
--
-- Two jobs finishing in concurrent transactions, with a dependent waiting for
-- both: each would see the other still running and leave the dependent waiting
-- forever.  So the dependents are locked first (FOR UPDATE, in id order): the
-- second transaction waits for the first to end, and its next statement (with
-- a new snapshot) sees the first one's job finished.
--
-- SECURITY DEFINER, like the INSERT trigger: whoever finishes a job (a
-- dispatcher, an operator's UPDATE) needs no right on the helper function.
-- The pinned search_path is one setting per statement, not per row.
CREATE OR REPLACE FUNCTION notifyq.release_dependents() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    finished bigint[];
    dependents bigint[];
    released bigint[];
    doomed bigint[];
    reasons text[];
    frontier bigint[];
    more bigint[];
    more_reasons text[];
BEGIN
    SELECT array_agg(n.id) INTO finished
    FROM new_rows n
    WHERE n.status IN ('succeeded', 'dead', 'cancelled');
    IF finished IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(l.id) INTO dependents
    FROM (SELECT j.id FROM notifyq.jobs j
          WHERE j.status = 'waiting' AND j.depends_on && finished
          ORDER BY j.id FOR UPDATE) AS l;
    IF dependents IS NULL THEN
        RETURN NULL;
    END IF;
    -- A new statement, so a new snapshot: it sees what the locks waited for.
    SELECT array_agg(j.id) FILTER (WHERE s.status = 'queued'),
           array_agg(j.id) FILTER (WHERE s.status = 'cancelled'),
           array_agg(s.reason) FILTER (WHERE s.status = 'cancelled')
    INTO released, doomed, reasons
    FROM notifyq.jobs j
    CROSS JOIN LATERAL notifyq.dependency_status(j.depends_on, j.on_dependency_failure) AS s
    WHERE j.id = ANY(dependents);
    frontier := doomed;
    WHILE frontier IS NOT NULL LOOP
        SELECT array_agg(l.id), array_agg(l.reason) INTO more, more_reasons
        FROM (SELECT j.id,
                     format('cancelled: job %s, which this job depends on, was cancelled',
                            (SELECT min(d) FROM unnest(j.depends_on) AS d WHERE d = ANY(frontier)))
                         AS reason
              FROM notifyq.jobs j
              WHERE j.status = 'waiting' AND j.depends_on && frontier
                AND j.on_dependency_failure = 'cancel' AND NOT j.id = ANY(doomed)
              ORDER BY j.id FOR UPDATE) AS l;
        doomed := doomed || more;
        reasons := reasons || more_reasons;
        frontier := more;
    END LOOP;
    UPDATE notifyq.jobs j
    SET status = c.status,
        last_error = coalesce(c.reason, j.last_error),
        finished_at = CASE WHEN c.status = 'cancelled' THEN now() END
    FROM (SELECT r.id, 'queued' AS status, NULL AS reason FROM unnest(released) AS r(id)
          UNION ALL
          SELECT d.id, 'cancelled', d.reason FROM unnest(doomed, reasons) AS d(id, reason))
         AS c
    WHERE j.id = c.id AND j.status = 'waiting';
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_release_dependents
    AFTER UPDATE ON notifyq.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.release_dependents();

-- retry_job: a job with dependencies goes back to waiting while they have not
-- all finished (and is refused while one it needs is dead or cancelled: retry
-- that one first); a waiting job cannot be retried (nothing to run yet).
CREATE OR REPLACE FUNCTION notifyq.retry_job(id bigint) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was text := notifyq.lock_job(retry_job.id);
    deps bigint[];
    policy text;
    next record;
BEGIN
    IF was IN ('running', 'succeeded', 'waiting') THEN
        RAISE EXCEPTION 'notifyq: job % is %: it cannot be retried', retry_job.id, was
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = CASE WHEN was = 'running'
                              THEN 'It is running now; cancel it first to stop it.'
                              WHEN was = 'waiting'
                              THEN 'It runs when the jobs it depends on have succeeded.'
                              ELSE 'It has succeeded; enqueue a new job instead.' END;
    END IF;
    SELECT j.depends_on, j.on_dependency_failure INTO deps, policy
    FROM notifyq.jobs j WHERE j.id = retry_job.id;
    next := notifyq.dependency_status(deps, policy);
    IF next.status = 'cancelled' THEN
        RAISE EXCEPTION 'notifyq: job % cannot be retried: %', retry_job.id,
                        replace(next.reason, 'cancelled: ', '')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Retry the jobs it depends on first.';
    END IF;
    UPDATE notifyq.jobs j
    SET status = next.status,
        run_at = now(),
        attempts = CASE WHEN was = 'queued' THEN j.attempts ELSE 0 END,
        started_at = CASE WHEN was = 'queued' THEN j.started_at END,
        finished_at = NULL
    WHERE j.id = retry_job.id;
    RETURN was;
END
$$;
COMMENT ON FUNCTION notifyq.retry_job(bigint) IS
    'Run job id now: dead or cancelled -> queued with attempts reset to 0 (waiting, if jobs it '
    'depends on have not finished); queued -> run_at now(). Keeps last_error. Returns the '
    'previous status; raises for an unknown id, a running, succeeded or waiting job, or one '
    'whose dependency is dead or cancelled.';

-- cancel_job: waiting jobs can be cancelled too (their own dependents follow).
CREATE OR REPLACE FUNCTION notifyq.cancel_job(id bigint) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was text := notifyq.lock_job(cancel_job.id);
BEGIN
    IF was NOT IN ('queued', 'running', 'waiting') THEN
        RAISE EXCEPTION 'notifyq: job % is already %: it cannot be cancelled', cancel_job.id, was
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only queued, waiting and running jobs can be cancelled.';
    END IF;
    UPDATE notifyq.jobs j
    SET status = 'cancelled', finished_at = now(), claimed_by = NULL, lease_expires_at = NULL
    WHERE j.id = cancel_job.id;
    RETURN was;
END
$$;
COMMENT ON FUNCTION notifyq.cancel_job(bigint) IS
    'Cancel job id: queued or waiting -> cancelled (it never runs); running -> cancelled at '
    'once (the dispatcher running it interrupts its handler; nothing more is written). Jobs '
    'that depend on it are cancelled too, unless their on_dependency_failure is run. Returns '
    'the previous status; raises for an unknown id or a finished job.';

-- Appended column (CREATE OR REPLACE VIEW can only append): jobs waiting for
-- their dependencies.
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
                                                                      AS oldest_ready_age,
       count(*) FILTER (WHERE status = 'waiting')                    AS waiting
FROM notifyq.jobs
GROUP BY queue;

REVOKE EXECUTE ON FUNCTION notifyq.dependency_status(bigint[], text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.dependencies_on_insert() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.release_dependents() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.retry_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.cancel_job(bigint) FROM PUBLIC;
