-- Schema version 7: rescue the jobs of a dispatcher whose database session ended
-- within seconds, not a lease later.  schema.sql holds the same objects for new
-- databases.

-- liveness_lock: the dispatcher holds the session-level advisory lock
-- (28274, hashtext(claimant)) on one connection for as long as it lives, so
-- PostgreSQL releases it the moment that connection dies (kill -9, crash, a
-- terminated backend).  session_lost_at: when a rescuer first found that lock
-- free; cleared when found held again.
ALTER TABLE notifyq.dispatchers
    ADD COLUMN IF NOT EXISTS liveness_lock   boolean     NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS session_lost_at timestamptz;

-- The rescue every dispatcher runs, as one statement.  Two ways a running job
-- is found lost:
--   * its dispatcher's session ended: the liveness lock of a claimant that
--     registered one (liveness_lock) is free.  The rescue waits until the lock
--     has been seen free for session_grace (a live dispatcher whose connection
--     dropped takes it back within a second or so), and counts no sighting from
--     the first restart_grace after the server started (every dispatcher is
--     reconnecting then).  A frozen process keeps its session: the lease tells.
--   * its lease expired (the backstop for everything the session cannot show:
--     a frozen process, a partition PostgreSQL has not noticed, a pooler).
-- Either way the attempt counts, a job with no attempts left goes dead, and
-- run_at is kept (the job goes back to its old place).  Rows are locked with
-- SKIP LOCKED, so rescuers never wait for each other or for a completion.
-- Returns the rescued jobs, then one row with id NULL whose `watched` is how many
-- other claimants with running jobs have a liveness lock: while there are any,
-- the caller sweeps again soon.
CREATE OR REPLACE FUNCTION notifyq.rescue_jobs(
    me text,
    session_grace interval,
    restart_grace interval,
    max_rows integer
) RETURNS TABLE (id bigint, status text, cause text, watched integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    d record;
    counted integer := 0;
    trusted_from timestamptz := pg_postmaster_start_time() + restart_grace;
BEGIN
    FOR d IN
        SELECT r.claimant, r.session_lost_at
        FROM (SELECT DISTINCT j.claimed_by FROM notifyq.jobs j WHERE j.status = 'running') AS c
        JOIN notifyq.dispatchers r ON r.claimant = c.claimed_by
        WHERE r.liveness_lock AND r.claimant <> rescue_jobs.me
        ORDER BY r.claimant
    LOOP
        counted := counted + 1;
        -- Held until this statement's transaction ends: a dispatcher taking its lock
        -- back meanwhile retries, and no other rescuer sees it free twice at once.
        IF NOT pg_try_advisory_xact_lock(28274, hashtext(d.claimant)) THEN
            IF d.session_lost_at IS NOT NULL THEN  -- alive again (it reconnected)
                UPDATE notifyq.dispatchers r SET session_lost_at = NULL
                WHERE r.claimant = d.claimant;
            END IF;
            CONTINUE;
        END IF;
        IF d.session_lost_at IS NULL OR d.session_lost_at < trusted_from THEN
            UPDATE notifyq.dispatchers r SET session_lost_at = now()
            WHERE r.claimant = d.claimant;
            CONTINUE;
        END IF;
        CONTINUE WHEN d.session_lost_at > now() - session_grace;
        RETURN QUERY
        WITH lost AS MATERIALIZED (
            SELECT j.id
            FROM notifyq.jobs j
            WHERE j.status = 'running' AND j.claimed_by = d.claimant
            ORDER BY j.id
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED
        )
        UPDATE notifyq.jobs j
        SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
            finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
            last_error = format('attempt %s lost: the database session of dispatcher %s ended '
                                '(process killed, or cut off from the database)',
                                j.attempts, j.claimed_by),
            claimed_by = NULL,
            lease_expires_at = NULL
        FROM lost
        WHERE j.id = lost.id
        RETURNING j.id, j.status, 'session'::text, NULL::integer;
    END LOOP;
    RETURN QUERY
    WITH expired AS MATERIALIZED (
        SELECT j.id
        FROM notifyq.jobs j
        WHERE j.status = 'running' AND j.lease_expires_at < now()
        ORDER BY j.lease_expires_at
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    )
    UPDATE notifyq.jobs j
    SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
        finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
        last_error = format('attempt %s lost: the lease of dispatcher %s expired at %s '
                            '(process killed or cut off from the database)',
                            j.attempts, j.claimed_by, j.lease_expires_at),
        claimed_by = NULL,
        lease_expires_at = NULL
    FROM expired e
    WHERE j.id = e.id
    RETURNING j.id, j.status, 'lease'::text, NULL::integer;
    RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, counted;
END
$$;
COMMENT ON FUNCTION notifyq.rescue_jobs(text, interval, interval, integer) IS
    'Re-queue (or send dead) running jobs whose dispatcher''s database session ended (its '
    'liveness lock free for session_grace) or whose lease expired; returns them, then a row '
    'with id NULL and how many other live claimants are watched.';
REVOKE EXECUTE ON FUNCTION notifyq.rescue_jobs(text, interval, interval, integer) FROM PUBLIC;
