-- Schema version 16: inserts skip their wake-up while every dispatcher of the
-- queue is draining (notifyq.queue_appetite).  schema.sql holds the same objects
-- for new databases.

-- ---------------------------------------------------------------------------
-- Appetite: notifying only when a dispatcher needs waking
--
-- PostgreSQL serialises the commits of every transaction that sent a
-- notification (one lock for the whole database, held across the commit's WAL
-- flush), so many producers committing single-row INSERTs run at about half
-- their rate once each INSERT notifies.  Most of those notifications wake
-- nobody: a dispatcher whose last claim came back full claims again as soon as
-- it has room, whatever it hears.  So each consumer of notifyq_jobs states its
-- appetite per queue here, and the insert trigger skips the notification while
-- every consumer of the queue is draining:
--
--   hungry    its last claim came back short: it waits for a notification.
--             SQL workers (notifyq.claim) always count as hungry.
--   draining  its last claim came back full: it claims again without being told.
--             Valid until expires_at; the dispatcher renews it while it drains,
--             so the row of a dispatcher that died stops counting on its own.
--
-- notifyq_jobs stays a wake-up hint: a notification is skipped (not merely
-- late) only when the rule below proves the job is claimed without it.
--
-- The rule.  An INSERT of queued jobs into queue q skips its notification iff,
-- read after taking the appetite lock (28275, hashtext(q)) SHARED until the
-- end of its transaction, in a READ COMMITTED transaction: no hungry row names
-- q (or '*', every queue), and some draining row of q has not expired.
--
-- A dispatcher whose claim comes back short, before it waits: (1) commits its
-- rows as hungry; (2) takes the appetite lock of each of its queues EXCLUSIVE
-- for a moment (notifyq.appetite_barrier), which waits for every
-- producer transaction holding it SHARED to end; (3) claims again.
--
-- Why no job waits for the fallback poll.  Take a job J committed into q by a
-- producer P whose trigger skipped the notification.  P read, at some time r,
-- every consumer of q draining.  Each such consumer D either keeps draining
-- (it claims again, and J is ready, so D reaches it in claim order) or goes
-- hungry, which it commits at some h > r (had it committed before r, P's read,
-- with a snapshot taken after r, would have seen it: READ COMMITTED takes a
-- new snapshot for each statement of the trigger).  P took the lock before r
-- and holds it until its commit is visible (PostgreSQL releases a transaction's
-- locks after it marks it committed).  D's barrier starts after h > r, so it is
-- granted only once P has released the lock: J is committed, and visible, before
-- D's re-claim takes its snapshot.  So J is claimed by that re-claim, or by an
-- earlier claim, or left to a claim that comes back full (D stays draining);
-- or J was not claimable by D (another task, a queue cap, a rate limit, run_at
-- ahead) and the same argument applies to the consumer that can claim it.  A
-- dispatcher with no row yet (it just started, or its rows were dropped) is
-- covered too: it claims again at once while its claims come back full, and
-- before it waits it commits a hungry row and passes the barrier, the same
-- three steps, so whatever P read, J is claimed by a claim after P's commit.  A
-- SQL worker has a hungry row from its first claim (notifyq.claim writes it in
-- the claim's transaction): a job committed in the moment before that reaches it
-- by its next claim or its poll, unless a draining dispatcher claims it first.
-- A REPEATABLE READ or SERIALIZABLE producer reads the table with its
-- transaction's snapshot, which may predate h: it always notifies.  Not
-- covered: a program of its own that LISTENs on notifyq_jobs without a row (a
-- dispatcher older than this version, a monitor): it hears no skipped insert.
--
-- The barrier waits at most a few milliseconds (lock_timeout in the function):
-- while it waits, new producers of q queue behind it.  A producer transaction
-- held open longer (it inserted a job, then went on with other work) makes the
-- barrier give up; the dispatcher then stays hungry (so new producers notify
-- it) and tries the barrier again with a growing pause, claiming after the
-- first that passes: a job of such a transaction is claimed within that pause
-- of its commit, not a poll interval.
--
-- Cost on the producer side: one SHARED advisory lock per statement and queue
-- (shared locks do not conflict with each other: producers do not serialise on
-- it, they only meet on the lock manager's partition lock for a moment), one
-- probe of this small table, and one nextval() to count the decision.
CREATE TABLE IF NOT EXISTS notifyq.queue_appetite (
    queue      text        NOT NULL,
    claimant   text        NOT NULL,
    state      text        NOT NULL,
    since      timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    PRIMARY KEY (queue, claimant),
    CONSTRAINT queue_appetite_queue_format CHECK (
        queue = '*' OR (queue ~ '^[a-z0-9_][a-z0-9_-]*$' AND char_length(queue) <= 63)),
    CONSTRAINT queue_appetite_state_valid CHECK (state IN ('hungry', 'draining')),
    CONSTRAINT queue_appetite_draining_expires CHECK (state = 'hungry' OR expires_at IS NOT NULL)
);
COMMENT ON TABLE notifyq.queue_appetite IS
    'Whether each consumer of a queue waits for notifications (hungry) or claims without '
    'them (draining): inserts skip pg_notify while every one drains. Kept by the '
    'dispatchers and notifyq.claim: read it, do not write it.';

-- Counts of the insert trigger's decisions, for metrics (notifyq.metrics reads
-- them).  A sequence, not a counter row: nextval() takes no row lock and writes
-- WAL once per 32 values, so counting costs the producers no serialisation.
-- Not transactional: an INSERT rolled back still counted its decision.
CREATE SEQUENCE IF NOT EXISTS notifyq.wakeups_sent;
CREATE SEQUENCE IF NOT EXISTS notifyq.wakeups_skipped;

-- SECURITY DEFINER: producers need no right on the appetite table or the
-- counting sequences, and nothing on their search_path can stand in for what
-- it calls.
CREATE OR REPLACE FUNCTION notifyq.notify_inserted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text;
    -- Another isolation level reads with the transaction's snapshot (see above).
    fresh boolean := current_setting('transaction_isolation') = 'read committed';
    sated boolean;
BEGIN
    FOR q IN SELECT DISTINCT i.queue FROM inserted i WHERE i.status = 'queued' LOOP
        IF fresh THEN
            -- Before the read (a statement of its own: the read's snapshot must be
            -- taken after it), and held to the commit: the dispatchers' barrier.
            PERFORM pg_advisory_xact_lock_shared(28275, hashtext(q));
            -- One probe of the queue's rows (and the '*' rows of SQL workers).
            SELECT count(*) FILTER (WHERE a.state = 'hungry') = 0
                   AND count(*) FILTER (WHERE a.state = 'draining' AND a.queue = q
                                          AND a.expires_at > statement_timestamp()) > 0
            INTO sated
            FROM notifyq.queue_appetite a
            WHERE a.queue IN (q, '*');
            IF sated THEN
                PERFORM nextval('notifyq.wakeups_skipped');
                CONTINUE;
            END IF;
        END IF;
        PERFORM pg_notify('notifyq_jobs', q);
        PERFORM nextval('notifyq.wakeups_sent');
    END LOOP;
    RETURN NULL;
END
$$;

-- A dispatcher states its appetite for its queues: hungry (after a short claim,
-- before notifyq.appetite_barrier), draining (after a full claim, for `ttl`),
-- or gone (state NULL: a graceful stop).  The same statement forgets the rows
-- of other consumers of these queues that can no longer claim: stopped, not
-- seen for a day, or (a serve process) whose liveness lock is free although it
-- registered one and whose heartbeat is a minute old (its session ended; a stale
-- hungry row would only cost notifications, a stale draining one expires anyway).  A minute's grace: a
-- consumer's row may come before its registry row.
CREATE OR REPLACE FUNCTION notifyq.set_appetite(
    claimant text, queues text[], state text, ttl interval DEFAULT interval '10 seconds'
) RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    IF state IS NULL THEN
        DELETE FROM notifyq.queue_appetite a WHERE a.claimant = claimant;
        RETURN;
    END IF;
    INSERT INTO notifyq.queue_appetite AS a (queue, claimant, state, since, expires_at)
    SELECT q, claimant, state, now(), CASE WHEN state = 'draining' THEN now() + ttl END
    FROM unnest(queues) AS q
    ON CONFLICT ON CONSTRAINT queue_appetite_pkey DO UPDATE
    SET state = excluded.state, since = excluded.since, expires_at = excluded.expires_at;
    DELETE FROM notifyq.queue_appetite a
    WHERE a.queue = ANY(queues || '{*}'::text[]) AND a.claimant <> claimant
      AND a.since < now() - interval '1 minute'
      AND NOT EXISTS (
          SELECT FROM notifyq.dispatchers d
          WHERE d.claimant = a.claimant AND d.stopped_at IS NULL
            -- An idle dispatcher that listens writes no heartbeat (schema version 15):
            -- its lock, held, says it lives however old its row.
            AND (greatest(d.heartbeat_at, d.alive_at) > now() - interval '1 day'
                 OR (d.liveness_lock AND notifyq.liveness_held(d.claimant)))
            -- Like the rescue, both signs of life must fail: the session's lock
            -- (free for a moment while its listener reconnects) and the registry's
            -- heartbeat.
            AND NOT (d.kind = 'serve' AND d.liveness_lock
                     AND d.heartbeat_at < now() - interval '1 minute'
                     -- Shared: two dispatchers testing at once do not see each
                     -- other's test as the owner's lock.
                     AND pg_try_advisory_xact_lock_shared(28274, hashtext(d.claimant))));
END
$$;
COMMENT ON FUNCTION notifyq.set_appetite(text, text[], text, interval) IS
    'A dispatcher''s appetite for its queues: hungry, draining (for ttl) or NULL (gone).';
REVOKE EXECUTE ON FUNCTION notifyq.set_appetite(text, text[], text, interval) FROM PUBLIC;

-- The barrier a dispatcher passes after committing its rows hungry and before
-- claiming again: every producer transaction that may have read them draining
-- has ended.  false: a producer transaction held a lock for longer than 20 ms
-- (the dispatcher tries again later).  Transaction-level, each in a block of its
-- own: when the lock is granted in the instant its timeout fires, PostgreSQL
-- both keeps it and raises the timeout, and only the block's rollback lets go
-- of it (a session-level lock would stay, and stop every producer of the queue).
-- The locks taken are held to the end of the caller's statement (autocommit):
-- with several queues, producers of the first may wait behind it for the
-- others' 20 ms.
CREATE OR REPLACE FUNCTION notifyq.appetite_barrier(queues text[]) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
-- The patience: new producers of the queue queue up behind the waiting barrier.
SET lock_timeout = '20ms'
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT DISTINCT u.q FROM unnest(queues) AS u(q) ORDER BY 1 LOOP
        BEGIN
            PERFORM pg_advisory_xact_lock(28275, hashtext(q));
        EXCEPTION WHEN lock_not_available THEN
            RETURN false;
        END;
    END LOOP;
    RETURN true;
END
$$;
COMMENT ON FUNCTION notifyq.appetite_barrier(text[]) IS
    'Wait (up to 20 ms) for producer transactions that may have read a queue''s '
    'appetite before it turned hungry; false if one is still open.';
REVOKE EXECUTE ON FUNCTION notifyq.appetite_barrier(text[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION notifyq.claim(
    worker text,
    queues text[] DEFAULT NULL,
    max_jobs integer DEFAULT 1,
    lease interval DEFAULT '30 seconds',
    tasks text[] DEFAULT NULL
) RETURNS SETOF notifyq.claimed_job
LANGUAGE plpgsql
VOLATILE
-- JIT compiles the claim's plan for its estimated cost, which an index probe
-- never reaches: 65-135 ms instead of 7 ms per claim where jit is on.
SET jit = off
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    served text[] := claim.queues;
    runs text[] := claim.tasks;
BEGIN
    IF max_jobs IS NULL OR max_jobs NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'max_jobs must be from 1 to 1000, got %', coalesce(max_jobs::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' OR lease > interval '1 day' THEN
        RAISE EXCEPTION 'lease must be from 1 second to 1 day, got %', coalesce(lease::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF array_position(served, NULL) IS NOT NULL OR array_position(runs, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'queues and tasks must not contain NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF served IS NULL OR runs IS NULL THEN
        -- Every (queue, task) pair that has queued jobs, by a loose scan of
        -- jobs_claim_idx: one probe per pair, however many jobs.
        WITH RECURSIVE pairs AS (
            (SELECT j.queue, j.task FROM notifyq.jobs j
             WHERE j.status = 'queued' ORDER BY j.queue, j.task LIMIT 1)
            UNION ALL
            SELECT n.queue, n.task
            FROM pairs p
            CROSS JOIN LATERAL (
                SELECT j.queue, j.task FROM notifyq.jobs j
                WHERE j.status = 'queued' AND (j.queue, j.task) > (p.queue, p.task)
                ORDER BY j.queue, j.task LIMIT 1) AS n
        )
        SELECT coalesce(served, array_agg(DISTINCT p.queue) FILTER (WHERE p.queue IS NOT NULL),
                        '{}'),
               coalesce(runs, array_agg(DISTINCT p.task) FILTER (WHERE p.task IS NOT NULL), '{}')
        INTO served, runs
        FROM pairs p
        WHERE coalesce(p.queue = ANY(claim.queues), true)
          AND coalesce(p.task = ANY(claim.tasks), true);
    END IF;
    PERFORM notifyq.worker_seen(worker, served, claim.tasks, max_jobs, lease);
    -- A SQL worker counts as hungry on its queues ('*': every queue), so inserts
    -- there always notify (notifyq.queue_appetite); a row already there is not
    -- written again.
    INSERT INTO notifyq.queue_appetite AS a (queue, claimant, state)
    SELECT q, worker, 'hungry'
    FROM unnest(coalesce(claim.queues, '{*}'::text[])) AS q
    WHERE q = '*' OR (q ~ '^[a-z0-9_][a-z0-9_-]*$' AND char_length(q) <= 63)
    ON CONFLICT ON CONSTRAINT queue_appetite_pkey DO NOTHING;
    RETURN QUERY
    SELECT c.id, c.queue, c.task, c.payload, c.attempt, c.max_attempts, c.checkpoint,
           c.lease_expires_at, t.timeout, c.trace_context
    FROM notifyq.claim_jobs(worker, served, runs, max_jobs, lease) AS c
    LEFT JOIN notifyq.tasks t ON t.task = c.task
    WHERE c.id IS NOT NULL;
END
$$;
COMMENT ON FUNCTION notifyq.claim(text, text[], integer, interval, text[]) IS
    'SQL worker protocol: claim up to max_jobs ready jobs for this worker, holding each for lease.';

CREATE OR REPLACE FUNCTION notifyq.stop_worker(worker text) RETURNS integer
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    handed integer;
BEGIN
    SELECT count(*) INTO handed
    FROM notifyq.hand_back_jobs(
        worker,
        ARRAY(SELECT j.id FROM notifyq.jobs j
              WHERE j.status = 'running' AND j.claimed_by = stop_worker.worker),
        wait => true) AS h
    WHERE h.status = 'queued';
    UPDATE notifyq.dispatchers d SET stopped_at = now(), running = 0
    WHERE d.claimant = stop_worker.worker;
    DELETE FROM notifyq.queue_appetite a WHERE a.claimant = stop_worker.worker;
    RETURN handed;
END
$$;

-- Roles that `notifyq roles` made workers before this version keep their
-- rights: those that may execute notifyq.claim_room keep their appetite rows.
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
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON notifyq.queue_appetite TO %s',
                       r.role);
        EXECUTE format('GRANT EXECUTE ON FUNCTION '
                       'notifyq.set_appetite(text, text[], text, interval), '
                       'notifyq.appetite_barrier(text[]) TO %s', r.role);
        EXECUTE format('GRANT SELECT ON SEQUENCE notifyq.wakeups_sent, notifyq.wakeups_skipped '
                       'TO %s', r.role);
    END LOOP;
END
$$;
