-- Schema version 15: an idle dispatcher writes nothing.  A dispatcher that
-- listens holds its liveness lock (28274, hashtext(claimant)) on its listening
-- connection for as long as it lives, so the lock, not a fresh heartbeat_at,
-- tells that it is alive: it writes its registry row only when something in
-- it changed (or on every heartbeat while it does not listen).  schema.sql
-- holds the same objects for new databases.

-- Whether the session-level liveness lock of `claimant` is held right now, by
-- any session of this database (pg_locks: the lock table, no table read).  A
-- rescuer trying the lock holds it for one statement too; that instant aside,
-- held means the dispatcher's listening connection is open.
CREATE OR REPLACE FUNCTION notifyq.liveness_held(claimant text) RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.database = (SELECT db.oid FROM pg_database db
                            WHERE db.datname = current_database())
          AND l.classid = 28274
          AND l.objid = hashtext(liveness_held.claimant)::oid
          AND l.objsubid = 2)
$$;
COMMENT ON FUNCTION notifyq.liveness_held(text) IS
    'Whether the liveness lock of this dispatcher (or SQL worker) is held: its session is open.';

-- A dispatcher is running while its heartbeat is fresh, or, listening, while
-- its liveness lock is held: an idle one that listens never beats.  The
-- columns are those of version 10's view, in order (CREATE OR REPLACE VIEW).
CREATE OR REPLACE VIEW notifyq.dispatcher_status AS
SELECT d.claimant, d.host, d.pid, d.queues, d.concurrency, d.running, d.heartbeat,
       d.started_at, d.heartbeat_at, d.stopped_at,
       CASE WHEN d.stopped_at IS NOT NULL THEN 'stopped'
            WHEN greatest(d.heartbeat_at, d.alive_at)
                 >= now() - make_interval(secs => 3 * d.heartbeat) THEN 'running'
            WHEN d.liveness_lock AND notifyq.liveness_held(d.claimant) THEN 'running'
            ELSE 'lost' END AS state,
       d.tasks, d.kind
FROM notifyq.dispatchers d;
COMMENT ON VIEW notifyq.dispatcher_status IS
    'notifyq.dispatchers with a state: running, stopped (graceful exit) or lost '
    '(no heartbeat for three intervals and no liveness lock held: killed, hung or cut off '
    'from the database).';

-- Whether a rescue sweep has anything to look at: a running job whose lease
-- expired, or a suspect of notifyq.rescue_jobs (a claimant other than `me`
-- with a liveness lock, a sign of life within a day and running jobs) whose
-- lock is free.  The listening connection of an idle dispatcher asks this at
-- every fallback poll instead of sweeping; it sweeps when the answer is yes.
CREATE OR REPLACE FUNCTION notifyq.rescue_due(me text) RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM notifyq.jobs j
                   WHERE j.status = 'running' AND j.lease_expires_at < now())
        OR EXISTS (SELECT FROM notifyq.dispatchers r
                   WHERE r.liveness_lock AND r.claimant <> rescue_due.me
                     AND r.stopped_at IS NULL
                     AND greatest(r.heartbeat_at, r.alive_at) >= now() - interval '1 day'
                     AND EXISTS (SELECT FROM notifyq.jobs j
                                 WHERE j.status = 'running' AND j.claimed_by = r.claimant)
                     AND NOT notifyq.liveness_held(r.claimant))
$$;
COMMENT ON FUNCTION notifyq.rescue_due(text) IS
    'Whether notifyq.rescue_jobs would find something to look at: an expired lease, or a '
    'dispatcher with running jobs whose liveness lock is free.';

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
-- The suspects come from the registry: no beat for session_grace, a sign of
-- life (heartbeat or beat) within a day (an idle listening dispatcher writes
-- neither; it holds nothing to rescue), and running jobs (one probe of the
-- running rows each; a dead one's row, left for a day, costs only that).  A
-- live one holds its lock, which costs one try; only a dead one's running jobs
-- are read.  So a sweep costs next to nothing however many jobs run, and
-- every dispatcher can sweep twice a second.
-- Returns the rescued jobs, then one row with id NULL whose `watched` is how many
-- other claimants the caller should sweep for again soon: those with a liveness
-- lock that beat lately (they hold jobs), and the dead ones whose jobs were kept
-- this time (a claim of theirs is recent, or sessions are not trusted yet).
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
    counted integer;
    distrusted integer := 0;
    by_session boolean := trust_sessions
        AND now() >= pg_postmaster_start_time() + restart_grace;
BEGIN
    FOR d IN
        SELECT r.claimant
        FROM notifyq.dispatchers r
        WHERE r.liveness_lock AND r.claimant <> rescue_jobs.me
          AND r.stopped_at IS NULL
          AND coalesce(r.alive_at, '-infinity') < now() - session_grace
          AND greatest(r.heartbeat_at, r.alive_at) >= now() - interval '1 day'
          AND EXISTS (SELECT FROM notifyq.jobs j
                      WHERE j.status = 'running' AND j.claimed_by = r.claimant)
        ORDER BY r.claimant
    LOOP
        -- Held until this statement's transaction ends: the dispatcher, were it
        -- taking its lock back meanwhile, retries; another rescuer skips it.
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(28274, hashtext(d.claimant));
        -- A claim is a sign of life too.
        IF NOT by_session OR EXISTS (
            SELECT FROM notifyq.jobs j
            WHERE j.status = 'running' AND j.claimed_by = d.claimant
              AND j.started_at > now() - session_grace) THEN
            -- Sessions not trusted now (an outage): watched until it beats again.
            distrusted := distrusted + (NOT by_session)::integer;
            CONTINUE;
        END IF;
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
    -- Counted after the rescue (what it re-queued is no longer anyone's): peers beating,
    -- or that claimed jobs just now.  The latter covers a dispatcher that started right
    -- after a peer took its jobs: it may sweep before the peer's first beat, and no
    -- status change of the peer's may come to poke it.  (A frozen peer, which neither
    -- beats nor claims, is left to its leases.)
    SELECT count(*) + distrusted INTO counted
    FROM notifyq.dispatchers r
    WHERE r.liveness_lock AND r.claimant <> rescue_jobs.me AND r.stopped_at IS NULL
      AND (r.alive_at >= now() - 2 * session_grace
           OR EXISTS (SELECT FROM notifyq.jobs j
                      WHERE j.status = 'running' AND j.claimed_by = r.claimant
                        AND j.started_at > now() - 2 * session_grace));
    RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, counted;
END
$$;

-- Any change of a schedule (not the progress the dispatchers write, last_instant)
-- tells the dispatchers to read notifyq.periodic again, on notifyq_internal,
-- payload "periodic": while they listen, they read it only when an instant is
-- due or a change is announced, not every minute.
CREATE OR REPLACE FUNCTION notifyq.notify_periodic_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('notifyq_internal', 'periodic');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER periodic_changed
    AFTER INSERT OR DELETE OR TRUNCATE
       OR UPDATE OF name, task, schedule, timezone, missed, queue, payload, priority,
                    max_attempts, paused, defined_at
    ON notifyq.periodic
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_periodic_changed();

REVOKE EXECUTE ON FUNCTION notifyq.notify_periodic_changed() FROM PUBLIC;

REVOKE EXECUTE ON FUNCTION notifyq.liveness_held(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.rescue_due(text) FROM PUBLIC;

-- Roles that `notifyq roles` made workers before this version read
-- notifyq.dispatcher_status and run the listener's upkeep without running
-- `notifyq roles` again: they are those that may execute notifyq.rescue_jobs.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole AS role
        FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) AS a
        WHERE p.oid = 'notifyq.rescue_jobs(text, interval, interval, boolean, integer)'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION notifyq.liveness_held(text), '
                       'notifyq.rescue_due(text) TO %s', r.role);
    END LOOP;
END
$$;
