-- Schema version 10: the SQL worker protocol.  Any PostgreSQL client can work
-- jobs: notifyq.claim, heartbeat, progress, complete, fail, hand_back and
-- stop_worker, with per-task retry settings in notifyq.tasks.  `notifyq serve`
-- claims and writes outcomes through the same functions (claim_jobs and
-- finish_jobs), so the rules live here once.
-- The rescue sweep reads a dead dispatcher's running jobs only, never every
-- running job (see rescue_jobs).
-- schema.sql holds the same objects for new databases.

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
-- The suspects come from the registry alone: no beat for session_grace, and
-- not yet lost (three heartbeats missed: about a lease, after which their
-- leases have expired and the lease sweep takes their jobs).  A live one holds
-- its lock, which costs one try; only a dead one's running jobs are read.  So a
-- sweep costs next to nothing however many jobs run, and every dispatcher can
-- sweep twice a second.
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
    by_session boolean := trust_sessions
        AND now() >= pg_postmaster_start_time() + restart_grace;
BEGIN
    SELECT count(*) INTO counted
    FROM notifyq.dispatchers r
    WHERE r.liveness_lock AND r.claimant <> rescue_jobs.me AND r.stopped_at IS NULL
      AND r.alive_at >= now() - 2 * session_grace;
    FOR d IN
        SELECT r.claimant
        FROM notifyq.dispatchers r
        WHERE r.liveness_lock AND r.claimant <> rescue_jobs.me
          AND r.stopped_at IS NULL
          AND coalesce(r.alive_at, '-infinity') < now() - session_grace
          AND r.heartbeat_at >= now() - make_interval(secs => 3 * r.heartbeat)
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
            counted := counted + 1;
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
    RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, counted;
END
$$;

-- Per-task settings, read by the claim (max_attempts for a job that names
-- none) and by failures (the backoff).  Python apps write their @app.task
-- settings here at start-up; workers in other languages, or an operator, write
-- rows directly.  A task without a row gets the defaults below, which are the
-- Python defaults (registry.DEFAULT_MAX_ATTEMPTS and retry.Backoff).
CREATE TABLE IF NOT EXISTS notifyq.tasks (
    task           text        PRIMARY KEY,
    max_attempts   integer     NOT NULL DEFAULT 5,
    -- The delay after attempt n failed is drawn from [c/2, c] with
    -- c = least(backoff_max, backoff_base * backoff_factor ^ (n - 1)).
    backoff_base   interval    NOT NULL DEFAULT '1 second',
    backoff_factor float8      NOT NULL DEFAULT 2,
    backoff_max    interval    NOT NULL DEFAULT '1 hour',
    -- How long one attempt may run; NULL: no limit.  Workers enforce it.
    timeout        interval,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tasks_task_format CHECK (task ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$'),
    CONSTRAINT tasks_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 1000),
    CONSTRAINT tasks_backoff_valid CHECK (
        backoff_base >= interval '0' AND backoff_max >= interval '0' AND backoff_factor >= 1),
    CONSTRAINT tasks_timeout_positive CHECK (timeout > interval '0')
);
COMMENT ON TABLE notifyq.tasks IS
    'Per-task retry settings and timeout, for every worker; a task without a row gets the defaults.';

-- Seconds to wait before retrying after attempt `attempt` failed: exponential
-- backoff with half jitter, capped.  Computed in log space, so no factor and
-- no attempt count overflows a float.
CREATE OR REPLACE FUNCTION notifyq.backoff_delay(
    attempt integer, base float8, factor float8, max_delay float8
) RETURNS float8
LANGUAGE sql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c / 2 + random() * c / 2
    FROM (SELECT CASE
                     WHEN base <= 0 OR max_delay <= 0 THEN 0
                     WHEN greatest(attempt - 1, 0) * ln(factor) >= ln(max_delay / base)
                         THEN max_delay
                     ELSE base * exp(greatest(attempt - 1, 0) * ln(factor))
                 END AS c) AS ceiling
$$;

-- SQL workers register like dispatchers; kind tells them apart.
ALTER TABLE notifyq.dispatchers ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'serve';
DO $$
BEGIN
    ALTER TABLE notifyq.dispatchers
        ADD CONSTRAINT dispatchers_kind_valid CHECK (kind IN ('serve', 'sql'));
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$$;

-- Appended column (CREATE OR REPLACE VIEW can only append).
CREATE OR REPLACE VIEW notifyq.dispatcher_status AS
SELECT d.claimant, d.host, d.pid, d.queues, d.concurrency, d.running, d.heartbeat,
       d.started_at, d.heartbeat_at, d.stopped_at,
       CASE WHEN d.stopped_at IS NOT NULL THEN 'stopped'
            WHEN d.heartbeat_at < now() - make_interval(secs => 3 * d.heartbeat) THEN 'lost'
            ELSE 'running' END AS state,
       d.tasks, d.kind
FROM notifyq.dispatchers d;

-- What notifyq.claim returns for each job claimed.
DO $$
BEGIN
    CREATE TYPE notifyq.claimed_job AS (
        id               bigint,
        queue            text,
        task             text,
        payload          jsonb,
        attempt          integer,      -- 1 for the first attempt
        max_attempts     integer,
        checkpoint       jsonb,        -- saved by an earlier attempt, or NULL
        lease_expires_at timestamptz,  -- renew it with notifyq.heartbeat before then
        timeout          interval      -- notifyq.tasks.timeout, or NULL
    );
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$$;

-- The claim, for `notifyq serve` and notifyq.claim alike.  Claims up to
-- max_jobs ready jobs of `queues` whose task is one of `tasks`, marking them
-- running under `worker` for `lease` and counting the attempt, in one
-- statement: the rows claimed, then one row with id NULL that carries
--   next_in: seconds until the next scheduled job (or rate slot) of these
--     queues and tasks, by the database clock (NULL: none);
--   full_queues: the queues at their concurrency cap once this claim commits
--     (those whose cap gave less room than asked for, all of it taken);
--   deferred: candidates the rate limits gave a later slot instead.
-- Every read of notifyq.jobs is an index probe of one (queue, task) pair along
-- jobs_claim_idx (LATERAL, LIMIT), and every write goes by primary key, so the
-- cost follows the jobs claimed, never the backlog or the finished rows, with
-- custom and generic plans alike.
-- Order: round-robin over the queues (every queue's best job, then every
-- queue's second best, ... so one queue's backlog never starves another);
-- within a queue, across its tasks: priority, run_at, id.
-- Two steps, so only the rows claimed are locked: `ranked` reads (without
-- locking) each pair's best rows and merges them in claim order; `candidates`
-- then locks, per pair, as many rows as that pair has in the merge, skipping
-- rows other claims hold (SKIP LOCKED goes on to the pair's next rows).
-- Locking each pair's best `room` rows at once would lock up to one room per
-- task, most of them only to let go at commit.
-- rooms, ranked and candidates are MATERIALIZED so each is computed once: a
-- `WHERE id IN (SELECT ... LIMIT n)` may be re-evaluated and claim more than n.
-- The UPDATEs select their rows with `id = ANY(ARRAY(SELECT ...))`: an array
-- computed once, then primary-key probes.  A join to the CTE instead lets a
-- generic plan (which cannot see how few rows the CTE holds) hash the whole
-- table: 60-110 ms per claim with a backlog of 150,000 jobs.
-- Each queue gives at most its room (notifyq.claim_room: max_jobs when it has
-- no cap), asked once per queue in sorted order, which is the order capped
-- queues are locked in.
-- Candidates with a rate_key and no slot yet go through notifyq.rate_admit
-- (only when there are any: the one-time filter keeps the call off the common
-- path); those it defers get their slot as run_at instead of starting.
-- A job with no max_attempts of its own gets its task's (notifyq.tasks, else 5).
CREATE OR REPLACE FUNCTION notifyq.claim_jobs(
    worker text, queues text[], tasks text[], max_jobs integer, lease interval
) RETURNS TABLE (
    id bigint, queue text, task text, payload jsonb, attempt integer, max_attempts integer,
    checkpoint jsonb, lease_expires_at timestamptz, next_in float8, full_queues text[],
    deferred bigint
)
LANGUAGE plpgsql
VOLATILE
-- JIT compiles the claim's plan for its estimated cost, which an index probe
-- never reaches: 65-135 ms instead of 7 ms per claim where jit is on.
SET jit = off
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    sorted text[] := ARRAY(SELECT DISTINCT u.name FROM unnest(claim_jobs.queues) AS u(name)
                           ORDER BY 1);
BEGIN
    RETURN QUERY
    WITH rooms AS MATERIALIZED (
        SELECT q.name, notifyq.claim_room(q.name, claim_jobs.max_jobs) AS room
        FROM unnest(sorted) WITH ORDINALITY AS q(name, n)
        ORDER BY q.n
    ), ranked AS MATERIALIZED (
        SELECT b.queue, b.task
        FROM rooms AS q
        CROSS JOIN LATERAL (
            SELECT m.queue, m.task, m.priority, m.run_at, m.id,
                   row_number() OVER (ORDER BY m.priority DESC, m.run_at, m.id) AS turn
            FROM (
                SELECT p.queue, p.task, p.priority, p.run_at, p.id
                FROM unnest(claim_jobs.tasks) AS t(name)
                CROSS JOIN LATERAL (
                    SELECT j.queue, j.task, j.priority, j.run_at, j.id
                    FROM notifyq.jobs j
                    WHERE j.status = 'queued' AND j.queue = q.name AND j.task = t.name
                      AND j.run_at <= now()
                    ORDER BY j.priority DESC, j.run_at, j.id
                    LIMIT q.room
                ) AS p
                ORDER BY p.priority DESC, p.run_at, p.id
                LIMIT q.room
            ) AS m
        ) AS b
        ORDER BY b.turn, b.priority DESC, b.run_at, b.id
        LIMIT claim_jobs.max_jobs
    ), candidates AS MATERIALIZED (
        SELECT k.id, k.rate_key, k.rate_reserved,
               row_number() OVER (ORDER BY k.turn, k.priority DESC, k.run_at, k.id) AS ord
        FROM (
            SELECT l.id, l.priority, l.run_at, l.rate_key, l.rate_reserved,
                   row_number() OVER (PARTITION BY l.queue
                                      ORDER BY l.priority DESC, l.run_at, l.id) AS turn
            FROM (SELECT r.queue, r.task, count(*) AS n
                  FROM ranked r GROUP BY r.queue, r.task) AS s
            CROSS JOIN LATERAL (
                SELECT j.id, j.queue, j.priority, j.run_at, j.rate_key, j.rate_reserved
                FROM notifyq.jobs j
                WHERE j.status = 'queued' AND j.queue = s.queue AND j.task = s.task
                  AND j.run_at <= now()
                ORDER BY j.priority DESC, j.run_at, j.id
                LIMIT s.n
                FOR UPDATE SKIP LOCKED
            ) AS l
        ) AS k
    ), deferrals AS MATERIALIZED (
        SELECT a.id, a.slot
        FROM notifyq.rate_admit(
            ARRAY(SELECT c.id FROM candidates c
                  WHERE c.rate_key IS NOT NULL AND NOT c.rate_reserved ORDER BY c.ord),
            ARRAY(SELECT c.rate_key FROM candidates c
                  WHERE c.rate_key IS NOT NULL AND NOT c.rate_reserved ORDER BY c.ord)) AS a
        WHERE EXISTS (SELECT FROM candidates c
                      WHERE c.rate_key IS NOT NULL AND NOT c.rate_reserved)
    ), deferred AS (
        UPDATE notifyq.jobs j
        SET run_at = d.slot, rate_reserved = true
        FROM deferrals d
        WHERE j.id = d.id
        RETURNING j.id
    ), claimed AS (
        UPDATE notifyq.jobs j
        SET status = 'running',
            attempts = j.attempts + 1,
            started_at = now(),
            claimed_by = claim_jobs.worker,
            lease_expires_at = now() + claim_jobs.lease,
            rate_reserved = false,
            max_attempts = coalesce(
                j.max_attempts,
                (SELECT t.max_attempts FROM notifyq.tasks t WHERE t.task = j.task),
                5)
        WHERE j.id = ANY(ARRAY(SELECT c.id FROM candidates c
                               WHERE NOT EXISTS (SELECT FROM deferrals d WHERE d.id = c.id)))
        RETURNING j.id, j.queue, j.task, j.payload, j.attempts, j.max_attempts, j.checkpoint,
                  j.lease_expires_at
    )
    -- In claim order (an Append keeps its branches' order), the info row last.
    (SELECT c.id, c.queue, c.task, c.payload, c.attempts, c.max_attempts, c.checkpoint,
            c.lease_expires_at, NULL::float8, NULL::text[], NULL::bigint
     FROM claimed c
     JOIN candidates k ON k.id = c.id
     ORDER BY k.ord)
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           (SELECT extract(epoch FROM least(
                       (SELECT min(d.slot) FROM deferrals d),
                       (SELECT min(s.run_at)
                        FROM unnest(sorted) AS q(name)
                        CROSS JOIN unnest(claim_jobs.tasks) AS t(name)
                        CROSS JOIN LATERAL (
                            SELECT j.run_at
                            FROM notifyq.jobs j
                            WHERE j.status = 'queued' AND j.queue = q.name AND j.task = t.name
                              AND j.run_at > now()
                            ORDER BY j.run_at
                            LIMIT 1) AS s)) - clock_timestamp())::float8),
           (SELECT array_agg(r.name) FROM rooms r
            WHERE r.room < claim_jobs.max_jobs
              AND r.room <= (SELECT count(*) FROM claimed c WHERE c.queue = r.name)),
           (SELECT count(*) FROM deferred);
END
$$;
COMMENT ON FUNCTION notifyq.claim_jobs(text, text[], text[], integer, interval) IS
    'The claim notifyq serve and notifyq.claim share: the jobs claimed, then a row with id '
    'NULL telling the next scheduled instant, the queues at their cap and the deferred count.';

-- Every outcome an attempt can come to, for `notifyq serve` (batches) and the
-- single-job functions below alike.  Per job: an outcome ('succeeded', 'failed'
-- to retry under the task's policy, 'dead' not to retry; NULL means
-- 'succeeded'), and what goes with it.  Fenced: a row changes only while it is
-- running under `worker` and, when an attempt is given, that same attempt, so
-- a late outcome of an attempt whose lease expired (and was rescued, or the job
-- cancelled) changes nothing.  A 'failed' job with attempts left is queued again
-- after retry_in seconds (else the task's backoff, notifyq.tasks); without
-- attempts left it is dead.
-- Returns one row per job written (its new status, and run_at: when a retry
-- runs), and one with status 'busy' per job still ours whose row another
-- transaction held locked (a producer's COMMIT checking the jobs its jobs depend
-- on, an operator's UPDATE): nothing was written for it, try again; `holder` says
-- who held it when PostgreSQL can tell.  A job with no row returned is no longer
-- the worker's.  With `wait`, rows are locked first (in id order) and waited for
-- instead, up to the caller's lock_timeout.
-- Rows are read by id through the primary key: `status = 'running' COLLATE "C"`
-- (the same test, bytewise) cannot match the predicate of jobs_lease_idx, so the
-- planner never picks that partial index here.  When its statistics say few jobs
-- run (they lag during a drain, while thousands are claimed), the planner would
-- scan all of it once per id: quadratic, seconds per batch at concurrency 200.
CREATE OR REPLACE FUNCTION notifyq.finish_jobs(
    worker text,
    ids bigint[],
    attempts integer[] DEFAULT NULL,
    outcomes text[] DEFAULT NULL,
    results jsonb[] DEFAULT NULL,
    errors text[] DEFAULT NULL,
    retry_in float8[] DEFAULT NULL,
    progresses real[] DEFAULT NULL,
    messages text[] DEFAULT NULL,
    wait boolean DEFAULT false
) RETURNS TABLE (id bigint, attempt integer, status text, run_at timestamptz, holder text)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF EXISTS (SELECT FROM unnest(finish_jobs.outcomes) AS u(o)
               WHERE u.o NOT IN ('succeeded', 'failed', 'dead')) THEN
        RAISE EXCEPTION 'an outcome must be succeeded, failed or dead'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF finish_jobs.wait THEN
        PERFORM FROM notifyq.jobs j WHERE j.id = ANY(finish_jobs.ids) ORDER BY j.id
        FOR NO KEY UPDATE;
    END IF;
    RETURN QUERY
    WITH o AS MATERIALIZED (
        SELECT *
        FROM unnest(finish_jobs.ids, finish_jobs.attempts, finish_jobs.outcomes,
                    finish_jobs.results, finish_jobs.errors, finish_jobs.retry_in,
                    finish_jobs.progresses, finish_jobs.messages)
             AS o(id, attempt, outcome, result, error, retry_in, progress, message)
    ), mine AS MATERIALIZED (
        SELECT j.id, j.attempts, j.max_attempts, j.task
        FROM notifyq.jobs j
        JOIN o ON j.id = o.id
        WHERE j.status = 'running' COLLATE "C"
          AND j.claimed_by = finish_jobs.worker
          AND j.attempts = coalesce(o.attempt, j.attempts)
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ), decided AS (
        SELECT m.id, o.result, o.error, o.progress, o.message,
               CASE WHEN coalesce(o.outcome, 'succeeded') = 'succeeded' THEN 'succeeded'
                    WHEN o.outcome = 'dead' OR m.attempts >= m.max_attempts THEN 'dead'
                    ELSE 'queued' END AS status,
               CASE WHEN o.outcome = 'failed' AND m.attempts < m.max_attempts
                    THEN now() + make_interval(secs => coalesce(
                        -- greatest() ignores NULLs: no retry_in must stay NULL.
                        CASE WHEN o.retry_in IS NOT NULL THEN greatest(o.retry_in, 0) END,
                        (SELECT notifyq.backoff_delay(m.attempts, extract(epoch FROM t.backoff_base),
                                                      t.backoff_factor,
                                                      extract(epoch FROM t.backoff_max))
                         FROM notifyq.tasks t WHERE t.task = m.task),
                        notifyq.backoff_delay(m.attempts, 1, 2, 3600)))
               END AS retry_at
        FROM mine m
        JOIN o ON o.id = m.id
    ), written AS (
        UPDATE notifyq.jobs j
        SET status = d.status,
            finished_at = CASE WHEN d.status = 'queued' THEN NULL ELSE now() END,
            run_at = coalesce(d.retry_at, j.run_at),
            last_error = coalesce(d.error, j.last_error),
            result = CASE WHEN d.status = 'succeeded' THEN d.result ELSE j.result END,
            -- The attempt's last progress report, which a separate write would be too late for.
            progress = coalesce(d.progress, j.progress),
            progress_message = CASE WHEN d.progress IS NULL THEN j.progress_message
                                    ELSE d.message END,
            claimed_by = NULL,
            lease_expires_at = NULL
        FROM decided d
        WHERE j.id = d.id
        RETURNING j.id, j.attempts, j.status, j.run_at
    )
    SELECT w.id, w.attempts, w.status, w.run_at, NULL::text
    FROM written w
    UNION ALL
    SELECT j.id, j.attempts, 'busy', NULL::timestamptz,
           coalesce((SELECT format('pid %s, application %L', a.pid, a.application_name)
                     FROM pg_catalog.pg_stat_activity a
                     WHERE a.backend_xid = j.xmax
                     LIMIT 1),
                    CASE WHEN j.xmax::text <> '0' THEN 'transaction ' || j.xmax::text END)
    -- Only the rows `mine` left out are looked at again (usually none).
    FROM (SELECT o.id, o.attempt FROM o
          WHERE NOT EXISTS (SELECT FROM mine m WHERE m.id = o.id)
          OFFSET 0) AS l
    JOIN notifyq.jobs j ON j.id = l.id
    WHERE j.status = 'running' COLLATE "C"
      AND j.claimed_by = finish_jobs.worker
      AND j.attempts = coalesce(l.attempt, j.attempts);
END
$$;
COMMENT ON FUNCTION notifyq.finish_jobs(
    text, bigint[], integer[], text[], jsonb[], text[], float8[], real[], text[], boolean) IS
    'Write outcomes (succeeded, failed, dead) of jobs a worker runs, fenced, applying the '
    'task''s retry policy; returns the new statuses, and busy for rows locked elsewhere.';

-- Interrupted attempts back to the queue, ready now, without charging the
-- attempt: a graceful shutdown.  Fenced, skipping or (with `wait`) waiting for
-- locked rows, and returning rows like finish_jobs (status 'queued' or 'busy').
CREATE OR REPLACE FUNCTION notifyq.hand_back_jobs(
    worker text, ids bigint[], attempts integer[] DEFAULT NULL, wait boolean DEFAULT false
) RETURNS TABLE (id bigint, attempt integer, status text, run_at timestamptz, holder text)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF hand_back_jobs.wait THEN
        PERFORM FROM notifyq.jobs j WHERE j.id = ANY(hand_back_jobs.ids) ORDER BY j.id
        FOR NO KEY UPDATE;
    END IF;
    RETURN QUERY
    WITH o AS MATERIALIZED (
        SELECT * FROM unnest(hand_back_jobs.ids, hand_back_jobs.attempts) AS o(id, attempt)
    ), mine AS MATERIALIZED (
        SELECT j.id
        FROM notifyq.jobs j
        JOIN o ON j.id = o.id
        WHERE j.status = 'running' COLLATE "C"
          AND j.claimed_by = hand_back_jobs.worker
          AND j.attempts = coalesce(o.attempt, j.attempts)
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ), written AS (
        UPDATE notifyq.jobs j
        SET status = 'queued',
            attempts = j.attempts - 1,
            started_at = NULL,
            claimed_by = NULL,
            lease_expires_at = NULL
        FROM mine m
        WHERE j.id = m.id
        RETURNING j.id, j.attempts + 1 AS attempt, j.status, j.run_at
    )
    SELECT w.id, w.attempt, w.status, w.run_at, NULL::text
    FROM written w
    UNION ALL
    SELECT j.id, j.attempts, 'busy', NULL::timestamptz,
           coalesce((SELECT format('pid %s, application %L', a.pid, a.application_name)
                     FROM pg_catalog.pg_stat_activity a
                     WHERE a.backend_xid = j.xmax
                     LIMIT 1),
                    CASE WHEN j.xmax::text <> '0' THEN 'transaction ' || j.xmax::text END)
    FROM (SELECT o.id, o.attempt FROM o
          WHERE NOT EXISTS (SELECT FROM mine m WHERE m.id = o.id)
          OFFSET 0) AS l
    JOIN notifyq.jobs j ON j.id = l.id
    WHERE j.status = 'running' COLLATE "C"
      AND j.claimed_by = hand_back_jobs.worker
      AND j.attempts = coalesce(l.attempt, j.attempts);
END
$$;
COMMENT ON FUNCTION notifyq.hand_back_jobs(text, bigint[], integer[], boolean) IS
    'Return interrupted attempts to the queue without charging them (fenced); returns them, '
    'and busy for rows locked elsewhere.';

-- ---------------------------------------------------------------------------
-- The SQL worker protocol: what a worker in any language calls.  A worker
-- names itself (`worker`, unique per process, e.g. host:pid:random; 1-200
-- characters) and passes that name to every call: it is jobs.claimed_by, and
-- its row in notifyq.dispatchers (kind 'sql').

-- The registry row of a SQL worker: written by its claims (at most once a
-- second) and heartbeats, so notifyq watch and health see it.
CREATE OR REPLACE FUNCTION notifyq.worker_seen(
    worker text, queues text[], tasks text[], concurrency integer, lease interval,
    running integer DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF worker IS NULL OR char_length(worker) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'worker must name the worker in 1 to 200 characters, got %',
            coalesce(quote_literal(worker), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Nothing new to say: a plain read, so a busy worker's claims write no registry row
    -- (an upsert would lock it, and write, even when its WHERE is false).
    IF running IS NULL AND EXISTS (
        SELECT FROM notifyq.dispatchers d
        WHERE d.claimant = worker AND d.stopped_at IS NULL
          AND d.heartbeat_at >= now() - interval '1 second'
          AND d.queues IS NOT DISTINCT FROM coalesce(worker_seen.queues, d.queues)) THEN
        RETURN;
    END IF;
    INSERT INTO notifyq.dispatchers AS d
        (claimant, host, pid, queues, concurrency, running, heartbeat, tasks, kind)
    VALUES (worker, coalesce(host(inet_client_addr()), 'local'), pg_backend_pid(),
            coalesce(queues, '{}'), greatest(coalesce(concurrency, 1), 1),
            coalesce(running, 0), extract(epoch FROM lease) / 3, tasks, 'sql')
    ON CONFLICT (claimant) DO UPDATE
    SET heartbeat_at = now(),
        stopped_at = NULL,
        queues = coalesce(worker_seen.queues, d.queues),
        tasks = CASE WHEN worker_seen.queues IS NULL THEN d.tasks ELSE worker_seen.tasks END,
        concurrency = coalesce(worker_seen.concurrency, d.concurrency),
        running = coalesce(worker_seen.running, d.running),
        heartbeat = extract(epoch FROM worker_seen.lease) / 3,
        pid = pg_backend_pid()
    WHERE d.heartbeat_at < now() - interval '1 second'
       OR d.stopped_at IS NOT NULL
       OR d.queues IS DISTINCT FROM coalesce(worker_seen.queues, d.queues)
       OR worker_seen.running IS DISTINCT FROM NULL AND d.running <> worker_seen.running;
END
$$;

-- Claim up to max_jobs jobs for `worker`: the same claim as `notifyq serve`'s
-- (priority, run_at, waiting jobs never claimed, concurrency caps and rate limits
-- across every worker and dispatcher, history written).  queues NULL: every
-- queue that has ready jobs; tasks NULL: any task (give the tasks this worker
-- can run, so it never claims another app's jobs).  Each job is held for
-- `lease`: renew it with notifyq.heartbeat, or it is rescued when it expires.
-- An empty result means nothing is ready: LISTEN notifyq_jobs and claim again
-- when a notification comes (or after a timeout, as a fallback).
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
    RETURN QUERY
    SELECT c.id, c.queue, c.task, c.payload, c.attempt, c.max_attempts, c.checkpoint,
           c.lease_expires_at, t.timeout
    FROM notifyq.claim_jobs(worker, served, runs, max_jobs, lease) AS c
    LEFT JOIN notifyq.tasks t ON t.task = c.task
    WHERE c.id IS NOT NULL;
END
$$;
COMMENT ON FUNCTION notifyq.claim(text, text[], integer, interval, text[]) IS
    'SQL worker protocol: claim up to max_jobs ready jobs for this worker, holding each for lease.';

-- Renew the leases of the jobs this worker still runs; returns the ids it
-- still holds (a job rescued or cancelled meanwhile is missing: stop working
-- on it).  Pass every job the worker holds, as often as it likes (once a
-- second is cheap): a lease is rewritten only once a third of it has passed.
-- lease NULL: the lease of the worker's last claim.  Each call is also the
-- worker's sign of life (see hold_session).
CREATE OR REPLACE FUNCTION notifyq.heartbeat(
    worker text, ids bigint[] DEFAULT '{}', lease interval DEFAULT NULL
) RETURNS SETOF bigint
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    length interval := heartbeat.lease;
    held bigint[];
BEGIN
    IF length IS NULL THEN
        SELECT make_interval(secs => 3 * d.heartbeat) INTO length
        FROM notifyq.dispatchers d WHERE d.claimant = heartbeat.worker;
        length := coalesce(length, interval '30 seconds');
    ELSIF length < interval '1 second' OR length > interval '1 day' THEN
        RAISE EXCEPTION 'lease must be from 1 second to 1 day, got %', length
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- SKIP LOCKED: a row locked right now is being finished (or changed by an
    -- operator); it is still held, and its lease renewed by a later call.
    WITH mine AS MATERIALIZED (
        SELECT j.id, j.lease_expires_at FROM notifyq.jobs j
        WHERE j.id = ANY(heartbeat.ids) AND j.status = 'running' COLLATE "C"
          AND j.claimed_by = heartbeat.worker
    ), due AS MATERIALIZED (
        SELECT j.id FROM notifyq.jobs j
        JOIN mine m ON j.id = m.id
        WHERE m.lease_expires_at < now() + length * 2 / 3
          AND j.status = 'running' COLLATE "C" AND j.claimed_by = heartbeat.worker
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ), renewed AS (
        UPDATE notifyq.jobs j SET lease_expires_at = now() + length
        FROM due WHERE j.id = due.id
        RETURNING j.id
    )
    -- (`renewed` runs to completion whether or not it is read.)
    SELECT array_agg(m.id) INTO held FROM mine m;
    PERFORM notifyq.worker_seen(heartbeat.worker, NULL, NULL, NULL, length,
                                coalesce(cardinality(held), 0));
    UPDATE notifyq.dispatchers d SET alive_at = now()
    WHERE d.claimant = heartbeat.worker AND d.liveness_lock;
    RETURN QUERY SELECT unnest(held);
END
$$;
COMMENT ON FUNCTION notifyq.heartbeat(text, bigint[], interval) IS
    'SQL worker protocol: renew leases; returns the ids this worker still holds.';

-- Mark job `id` succeeded with `result`; false (and nothing changed) if the job
-- is no longer this worker's: rescued after its lease expired, or cancelled.
-- Give `attempt` (from the claim) to fence out an earlier attempt of a job this
-- same worker claimed again.
CREATE OR REPLACE FUNCTION notifyq.complete(
    id bigint, worker text, result jsonb DEFAULT NULL, attempt integer DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF octet_length(result::text) > 1048576 THEN
        RAISE EXCEPTION 'result of job % is % bytes of JSON; at most 1 MiB is stored',
            complete.id, octet_length(result::text)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    RETURN EXISTS (
        SELECT FROM notifyq.finish_jobs(complete.worker, ARRAY[complete.id],
                                        ARRAY[complete.attempt], ARRAY['succeeded'],
                                        ARRAY[complete.result], wait => true) AS f
        WHERE f.status = 'succeeded');
END
$$;
COMMENT ON FUNCTION notifyq.complete(bigint, text, jsonb, integer) IS
    'SQL worker protocol: job succeeded; false if it is no longer this worker''s.';

-- Job `id` failed with `error`.  Retryable (the default): queued again after
-- retry_in, else the task's backoff (notifyq.tasks), while attempts are left;
-- else, or not retryable, dead.  Returns the job's new status ('queued' or
-- 'dead'), or NULL (and nothing changed) if it is no longer this worker's.
CREATE OR REPLACE FUNCTION notifyq.fail(
    id bigint,
    worker text,
    error text,
    retryable boolean DEFAULT true,
    retry_in interval DEFAULT NULL,
    attempt integer DEFAULT NULL
) RETURNS text
LANGUAGE sql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.status
    FROM notifyq.finish_jobs($2, ARRAY[$1], ARRAY[$6],
                             ARRAY[CASE WHEN $4 IS NOT FALSE THEN 'failed' ELSE 'dead' END],
                             errors => ARRAY[left(coalesce($3, 'failed'), 65536)],
                             retry_in => ARRAY[extract(epoch FROM $5)::float8],
                             wait => true) AS f
    WHERE f.status <> 'busy'
$$;
COMMENT ON FUNCTION notifyq.fail(bigint, text, text, boolean, interval, integer) IS
    'SQL worker protocol: job failed; returns queued (retried) or dead, NULL if not this '
    'worker''s.';

-- A progress report (percent from 0 to 100, a message of at most 200
-- characters) and/or a checkpoint for the job's next attempt.  Announced on
-- notifyq_progress like the Python handlers' reports.  False (nothing changed)
-- if the job is no longer this worker's.
CREATE OR REPLACE FUNCTION notifyq.progress(
    id bigint,
    worker text,
    progress real DEFAULT NULL,
    message text DEFAULT NULL,
    checkpoint jsonb DEFAULT NULL,
    attempt integer DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    job record;
BEGIN
    UPDATE notifyq.jobs j
    SET progress = coalesce(progress, j.progress),
        progress_message = CASE WHEN progress IS NULL AND message IS NULL
                                THEN j.progress_message ELSE message END,
        checkpoint = coalesce(checkpoint, j.checkpoint)
    WHERE j.id = id AND j.status = 'running' COLLATE "C" AND j.claimed_by = worker
      AND j.attempts = coalesce(attempt, j.attempts)
    RETURNING j.id, j.queue, j.task, j.attempts, j.progress, j.progress_message INTO job;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF progress IS NOT NULL OR message IS NOT NULL THEN
        PERFORM pg_notify('notifyq_progress',
                          json_build_object('id', job.id, 'queue', job.queue, 'task', job.task,
                                            'attempt', job.attempts, 'progress', job.progress,
                                            'message', job.progress_message)::text);
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION notifyq.progress(bigint, text, real, text, jsonb, integer) IS
    'SQL worker protocol: report progress and/or save a checkpoint; false if not this '
    'worker''s.';

-- Rescue sweep for deployments where only SQL workers run (notifyq serve runs
-- one itself): re-queue the jobs of workers whose held session ended two seconds
-- ago without a sign of life, and of every expired lease.  Call it every second
-- or few from any one worker; returns how many jobs it rescued.  Pass
-- trust_sessions false for a few seconds after the caller's own connection came
-- back (a failover frees every session's lock for a moment): lease rescue only.
CREATE OR REPLACE FUNCTION notifyq.rescue(worker text, trust_sessions boolean DEFAULT true)
RETURNS integer
LANGUAGE sql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*)::integer
    FROM notifyq.rescue_jobs($1, interval '2 seconds', interval '5 seconds', $2, 1000) AS r
    WHERE r.id IS NOT NULL
$$;
COMMENT ON FUNCTION notifyq.rescue(text, boolean) IS
    'SQL worker protocol: rescue the jobs of dead workers and expired leases; returns how many.';

-- For a worker with a connection of its own (the one it LISTENs on): holds the
-- session-level liveness lock on it, so the moment that connection dies
-- (process killed, host gone) the worker's jobs are rescued within seconds
-- instead of when their leases expire.  Only for a worker that calls
-- notifyq.heartbeat at least once a second while it holds jobs: a worker whose
-- session ended and whose last sign of life is two seconds old counts as dead.
-- Never through a transaction-mode pooler (the lock would stay on a pooled
-- session).  Returns false if another session holds the lock.
CREATE OR REPLACE FUNCTION notifyq.hold_session(worker text) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT pg_try_advisory_lock(28274, hashtext(worker)) THEN
        RETURN false;
    END IF;
    PERFORM notifyq.worker_seen(worker, NULL, NULL, NULL, interval '30 seconds');
    UPDATE notifyq.dispatchers d SET liveness_lock = true, alive_at = now()
    WHERE d.claimant = hold_session.worker;
    RETURN true;
END
$$;
COMMENT ON FUNCTION notifyq.hold_session(text) IS
    'SQL worker protocol: tie the worker''s liveness to this session, for fast rescue.';

-- Hand these jobs back to the queue without charging the attempt (the worker
-- is shutting down before they finished); returns the ids handed back.
CREATE OR REPLACE FUNCTION notifyq.hand_back(worker text, ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT h.id FROM notifyq.hand_back_jobs($1, $2, wait => true) AS h WHERE h.status = 'queued'
$$;
COMMENT ON FUNCTION notifyq.hand_back(text, bigint[]) IS
    'SQL worker protocol: return unfinished jobs to the queue without charging the attempt.';

-- A graceful exit: hand back every job the worker still runs, and mark it
-- stopped in the registry.  Returns how many jobs were handed back.
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
    RETURN handed;
END
$$;
COMMENT ON FUNCTION notifyq.stop_worker(text) IS
    'SQL worker protocol: graceful exit; hands back the worker''s running jobs, marks it stopped.';

REVOKE EXECUTE ON FUNCTION notifyq.backoff_delay(integer, float8, float8, float8) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.claim_jobs(text, text[], text[], integer, interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.finish_jobs(
    text, bigint[], integer[], text[], jsonb[], text[], float8[], real[], text[], boolean)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.hand_back_jobs(text, bigint[], integer[], boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.worker_seen(text, text[], text[], integer, interval, integer)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.claim(text, text[], integer, interval, text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.heartbeat(text, bigint[], interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.complete(bigint, text, jsonb, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.fail(bigint, text, text, boolean, interval, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.progress(bigint, text, real, text, jsonb, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.hold_session(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.rescue(text, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.hand_back(text, bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.stop_worker(text) FROM PUBLIC;

-- The roles that may claim (notifyq roles gave them EXECUTE on claim_room) may
-- run the protocol and keep the task settings; run `notifyq roles` again to be exact.
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
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON notifyq.tasks TO %s', r.role);
        EXECUTE format('GRANT EXECUTE ON FUNCTION '
                       'notifyq.backoff_delay(integer, float8, float8, float8), '
                       'notifyq.claim_jobs(text, text[], text[], integer, interval), '
                       'notifyq.finish_jobs(text, bigint[], integer[], text[], jsonb[], text[], '
                       'float8[], real[], text[], boolean), '
                       'notifyq.hand_back_jobs(text, bigint[], integer[], boolean), '
                       'notifyq.worker_seen(text, text[], text[], integer, interval, integer), '
                       'notifyq.claim(text, text[], integer, interval, text[]), '
                       'notifyq.heartbeat(text, bigint[], interval), '
                       'notifyq.complete(bigint, text, jsonb, integer), '
                       'notifyq.fail(bigint, text, text, boolean, interval, integer), '
                       'notifyq.progress(bigint, text, real, text, jsonb, integer), '
                       'notifyq.hold_session(text), '
                       'notifyq.rescue(text, boolean), '
                       'notifyq.hand_back(text, bigint[]), '
                       'notifyq.stop_worker(text) TO %s', r.role);
    END LOOP;
END
$$;
