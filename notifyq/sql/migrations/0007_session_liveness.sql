-- Schema version 7: rescue the jobs of a dispatcher whose database session ended
-- within seconds, not a lease later.  schema.sql holds the same objects for new
-- databases.

-- liveness_lock: the dispatcher holds the session-level advisory lock
-- (28274, hashtext(claimant)) on one connection for as long as it lives, so
-- PostgreSQL releases it the moment that connection dies (kill -9, crash, a
-- terminated backend).  alive_at: the last sign of life its lease keeper wrote
-- (a beat a second while it holds jobs, from another connection).
ALTER TABLE notifyq.dispatchers
    ADD COLUMN IF NOT EXISTS liveness_lock boolean     NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS alive_at      timestamptz;

-- The rescue every dispatcher runs, as one statement.  Two ways a running job
-- is found lost:
--   * its dispatcher's session ended: a claimant that registered a liveness
--     lock (liveness_lock) no longer holds it, AND it has shown no sign of life
--     for session_grace: neither an alive_at beat (its lease keeper writes one a
--     second while it holds jobs, from another connection) nor a claim (the
--     started_at of its running jobs).  Both must fail: a live dispatcher whose
--     listening connection dropped keeps beating; a frozen one keeps its
--     session (the lease tells).  The caller passes trust_sessions false while
--     its own connection has just come back (a failover: every lock is free and
--     every beat old for a moment), and no session counts in the first
--     restart_grace after the server started.
--   * its lease expired (the backstop for everything the session cannot show:
--     a frozen process, a partition PostgreSQL has not noticed, a pooler).
-- Either way the attempt counts, a job with no attempts left goes dead, and
-- run_at is kept (the job goes back to its old place).  Rows are locked with
-- SKIP LOCKED, and the liveness lock is only tried: rescuers never wait for
-- each other or for a completion, and keep no state between sweeps.
-- Returns the rescued jobs, then one row with id NULL whose `watched` is how many
-- other claimants with running jobs have a liveness lock: while there are any,
-- the caller sweeps again soon.
CREATE OR REPLACE FUNCTION notifyq.rescue_jobs(
    me text,
    session_grace interval,
    restart_grace interval,
    trust_sessions boolean,
    max_rows integer
) RETURNS TABLE (id bigint, status text, cause text, watched integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    d record;
    counted integer := 0;
    by_session boolean := trust_sessions
        AND now() >= pg_postmaster_start_time() + restart_grace;
BEGIN
    FOR d IN
        SELECT r.claimant, greatest(r.alive_at, c.last_claim) AS seen_alive
        FROM (SELECT j.claimed_by, max(j.started_at) AS last_claim
              FROM notifyq.jobs j WHERE j.status = 'running'
              GROUP BY j.claimed_by) AS c
        JOIN notifyq.dispatchers r ON r.claimant = c.claimed_by
        WHERE r.liveness_lock AND r.claimant <> rescue_jobs.me
        ORDER BY r.claimant
    LOOP
        counted := counted + 1;
        CONTINUE WHEN NOT by_session OR d.seen_alive > now() - session_grace;
        -- Held until this statement's transaction ends: the dispatcher, were it
        -- taking its lock back meanwhile, retries; another rescuer skips it.
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(28274, hashtext(d.claimant));
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
COMMENT ON FUNCTION notifyq.rescue_jobs(text, interval, interval, boolean, integer) IS
    'Re-queue (or send dead) running jobs whose dispatcher''s database session ended (its '
    'liveness lock free and no sign of life for session_grace) or whose lease expired; '
    'returns them, then a row with id NULL and how many other live claimants are watched.';
REVOKE EXECUTE ON FUNCTION notifyq.rescue_jobs(text, interval, interval, boolean, integer) FROM PUBLIC;

-- Roles that `notifyq roles` made workers before this version may run the rescue
-- too, without running `notifyq roles` again: they are those that may execute
-- notifyq.claim_room.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole AS role
        FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) AS a
        WHERE p.oid = 'notifyq.claim_room(text, integer)'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION '
                       'notifyq.rescue_jobs(text, interval, interval, boolean, integer) TO %s',
                       r.role);
    END LOOP;
END
$$;
