-- Schema version 18: circuit breakers per task (notifyq.circuit_breakers).  The
-- claim leaves out the tasks whose breaker is open and lets one probe through
-- once its cool-down is over; the completion counts failures, opens and closes
-- breakers, and does not charge failures while a breaker is open.  schema.sql
-- holds the same objects for new databases.  claim_jobs is version 17's (pauses
-- honoured) with the breakers added.

-- ---------------------------------------------------------------------------
-- Circuit breakers, per task (docs/lifecycle.md, "Circuit breakers")
--
-- A task whose handler keeps failing (its database, its API, its endpoint is
-- down) stops being started for a while instead of burning every job's
-- attempts.  One row per task that has a breaker; a task without a row has
-- none.  The config columns (failures, failure_window, cooldown) are written
-- by an app's @app.task(circuit_breaker=...) at start-up, by
-- notifyq.set_circuit_breaker or plain SQL; the state columns only by the
-- claim, the completion (notifyq.finish_jobs) and notifyq.reset_circuit_breaker.
--
--   closed     jobs run.  Each failure counts (an outcome 'failed': a handler
--              error, a timeout, Retry; not 'dead', i.e. DoNotRetry, a refused
--              payload, an HTTP 4xx, nor a cancellation); `failures` of them
--              within `failure_window` of the first one counted open it.  A
--              window starts at its first failure and ends failure_window
--              later, when the count starts again.  Successes are not counted
--              (a rate would make every success write this row).
--   open       no job of the task is claimed: they stay queued, charged
--              nothing.  Jobs already running when it opened finish; their
--              failures are not charged either (the attempt is given back).
--              Once `cooldown` has passed since opened_at, the next claim that
--              finds a ready job of the task starts exactly one (the probe)
--              and turns the breaker half_open.
--   half_open  only the probe runs (probe_job, at attempt probe_attempt).  It
--              succeeds: closed.  It fails: open again (opened_at now, a new
--              cool-down), and that attempt is not charged.  It ends another
--              way (dead, cancelled, rescued, handed back): the next claim
--              starts another probe.
--
-- Claims take the row lock (SKIP LOCKED) only to start a probe, so two claims,
-- on any dispatchers or SQL workers, never start two; while no breaker of the
-- claimed tasks is open they only read this table (one probe of its primary
-- key per task).  Every change of state but the start of a probe is announced
-- on notifyq_internal (payload "breaker:TASK"), so dispatchers claim again at once.
CREATE TABLE IF NOT EXISTS notifyq.circuit_breakers (
    task           text        PRIMARY KEY,
    failures       integer     NOT NULL DEFAULT 5,
    failure_window interval    NOT NULL DEFAULT '1 minute',
    cooldown       interval    NOT NULL DEFAULT '30 seconds',
    state          text        NOT NULL DEFAULT 'closed',
    -- Failures counted in the window that began at failed_since (closed only).
    failed         integer     NOT NULL DEFAULT 0,
    failed_since   timestamptz,
    opened_at      timestamptz,
    probe_job      bigint,
    probe_attempt  integer,
    -- How many times it opened (or opened again after a failed probe), ever.
    opens          bigint      NOT NULL DEFAULT 0,
    changed_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT circuit_breakers_task_format CHECK (
        task ~ '^[A-Za-z_][A-Za-z0-9_.:-]*$' AND char_length(task) <= 200),
    CONSTRAINT circuit_breakers_failures_range CHECK (failures BETWEEN 1 AND 1000000),
    CONSTRAINT circuit_breakers_failure_window_positive CHECK (failure_window > interval '0'),
    CONSTRAINT circuit_breakers_cooldown_positive CHECK (cooldown > interval '0'),
    CONSTRAINT circuit_breakers_state_valid CHECK (state IN ('closed', 'open', 'half_open')),
    CONSTRAINT circuit_breakers_open_has_opened_at CHECK (
        state = 'closed' OR opened_at IS NOT NULL)
);
COMMENT ON TABLE notifyq.circuit_breakers IS
    'Circuit breakers per task: after `failures` failures within failure_window no job of '
    'the task starts until cooldown has passed; then one probe runs, and its outcome closes '
    'or reopens it. Set with notifyq.set_circuit_breaker, reset with '
    'notifyq.reset_circuit_breaker, remove with DELETE.';
COMMENT ON CONSTRAINT circuit_breakers_failures_range ON notifyq.circuit_breakers IS
    'failures: 1 to 1000000 failures within failure_window open the breaker';
COMMENT ON CONSTRAINT circuit_breakers_failure_window_positive ON notifyq.circuit_breakers IS
    'failure_window: a positive interval';
COMMENT ON CONSTRAINT circuit_breakers_cooldown_positive ON notifyq.circuit_breakers IS
    'cooldown: a positive interval, how long an open breaker holds the task''s jobs back';
COMMENT ON CONSTRAINT circuit_breakers_state_valid ON notifyq.circuit_breakers IS
    'state: closed, open or half_open';
COMMENT ON CONSTRAINT circuit_breakers_open_has_opened_at ON notifyq.circuit_breakers IS
    'an open or half-open breaker has opened_at';

-- Dispatchers hear every change of state on notifyq_internal ("breaker:TASK"):
-- a closed breaker releases the jobs it held, an opened one moves their next
-- wake-up to the cool-down's end.  Not the start of a probe (the claim that
-- started it is the only one that could act on it).
CREATE OR REPLACE FUNCTION notifyq.notify_breaker_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(
        'notifyq_internal', 'breaker:' OPERATOR(pg_catalog.||) COALESCE(NEW.task, OLD.task));
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER circuit_breakers_changed
    AFTER UPDATE ON notifyq.circuit_breakers
    FOR EACH ROW
    WHEN (NEW.state <> 'half_open'
          AND (OLD.state, OLD.opened_at) IS DISTINCT FROM (NEW.state, NEW.opened_at))
    EXECUTE FUNCTION notifyq.notify_breaker_changed();

CREATE OR REPLACE TRIGGER circuit_breakers_removed
    AFTER DELETE ON notifyq.circuit_breakers
    FOR EACH ROW
    WHEN (OLD.state <> 'closed')
    EXECUTE FUNCTION notifyq.notify_breaker_changed();

-- Give `task` a breaker, or change its settings; its state is kept.
CREATE OR REPLACE FUNCTION notifyq.set_circuit_breaker(
    task text, failures integer, failure_window interval, cooldown interval
) RETURNS void
LANGUAGE sql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO notifyq.circuit_breakers AS b (task, failures, failure_window, cooldown)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT ON CONSTRAINT circuit_breakers_pkey DO UPDATE
    SET failures = excluded.failures, failure_window = excluded.failure_window,
        cooldown = excluded.cooldown, changed_at = now()
$$;
COMMENT ON FUNCTION notifyq.set_circuit_breaker(text, integer, interval, interval) IS
    'Give a task a circuit breaker (failures within failure_window open it for cooldown), or '
    'change its settings; its state is kept.';

-- Close `task`'s breaker by hand: its held jobs start at once; the failures
-- counted so far are forgotten.  Returns the state it had.
CREATE OR REPLACE FUNCTION notifyq.reset_circuit_breaker(task text) RETURNS text
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was text;
BEGIN
    SELECT b.state INTO was FROM notifyq.circuit_breakers b
    WHERE b.task = reset_circuit_breaker.task
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'notifyq: task % has no circuit breaker', reset_circuit_breaker.task
            USING ERRCODE = 'no_data_found',
                  HINT = 'notifyq breaker list shows the tasks that have one.';
    END IF;
    UPDATE notifyq.circuit_breakers b
    SET state = 'closed', failed = 0, failed_since = NULL, opened_at = NULL, probe_job = NULL,
        probe_attempt = NULL, changed_at = now()
    WHERE b.task = reset_circuit_breaker.task;
    RETURN was;
END
$$;
COMMENT ON FUNCTION notifyq.reset_circuit_breaker(text) IS
    'Close a task''s circuit breaker by hand and forget its failures; returns the state it '
    'had; raises for a task without one.';

REVOKE EXECUTE ON FUNCTION notifyq.notify_breaker_changed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.set_circuit_breaker(text, integer, interval, interval)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.reset_circuit_breaker(text) FROM PUBLIC;

-- The claim, for `notifyq serve` and notifyq.claim alike.  Claims up to
-- max_jobs ready jobs of `queues` whose task is one of `tasks`, marking them
-- running under `worker` for `lease` and counting the attempt, in one
-- statement: the rows claimed, then one row with id NULL that carries
--   next_in: seconds until the next scheduled job (or rate slot) of these
--     queues and tasks, or the end of an open circuit breaker's cool-down, by
--     the database clock (NULL: none);
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
-- trace_context: the job's, as its producer set it (NULL on the closing row).
-- Paused work (notifyq.queue_pauses) is never read: a paused queue has no room
-- (claim_room), so it is among full_queues and its dispatchers ignore its inserts
-- until the resume's notification; a paused task's pairs are left out of the
-- probes.  Neither sets the timer (next_in).  One probe of that (small) table per
-- queue and per (queue, task) pair.
-- Circuit breakers (notifyq.circuit_breakers): the tasks whose breaker is open
-- are left out, and a task whose breaker's cool-down is over gives one job, the
-- probe, from the first served queue that has one ready and where neither the
-- queue nor the task is paused.  A held task's cool-down sets the timer only
-- when some served queue has not paused it.  Only when a breaker of these
-- tasks is not closed does the claim do more than read that table.
CREATE OR REPLACE FUNCTION notifyq.claim_jobs(
    worker text, queues text[], tasks text[], max_jobs integer, lease interval
) RETURNS TABLE (
    id bigint, queue text, task text, payload jsonb, attempt integer, max_attempts integer,
    checkpoint jsonb, lease_expires_at timestamptz, next_in float8, full_queues text[],
    deferred bigint, trace_context jsonb
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
    runs text[] := claim_jobs.tasks;  -- the tasks claimed: those no breaker holds
    probe_in text[];  -- per task of runs: the queue its probe comes from, NULL: no probe
    locked text[];  -- breakers this claim may start a probe of (their rows locked)
    probing text[] := '{}';
    probe_queues text[] := '{}';
    reopen_at timestamptz;  -- the end of the earliest cool-down among the held tasks
BEGIN
    IF EXISTS (SELECT FROM notifyq.circuit_breakers b
               WHERE b.task = ANY(claim_jobs.tasks) AND b.state <> 'closed') THEN
        -- First lock the breakers that may let a probe through, in task order and
        -- skipping those another transaction holds (a claim starting its probe, a
        -- completion counting failures: both leave the task held for this claim);
        -- then, in a statement of its own (so a probe a claim committed before we
        -- got the lock is seen), start a probe where none runs and a job is ready.
        locked := ARRAY(
            SELECT b.task FROM notifyq.circuit_breakers b
            WHERE b.task = ANY(claim_jobs.tasks)
              AND (b.state = 'half_open'
                   OR (b.state = 'open' AND b.opened_at + b.cooldown <= now()))
            ORDER BY b.task
            FOR NO KEY UPDATE SKIP LOCKED);
        WITH due AS MATERIALIZED (
            SELECT b.task,
                   (SELECT q.name
                    FROM unnest(sorted) WITH ORDINALITY AS q(name, n)
                    WHERE NOT EXISTS (SELECT FROM notifyq.queue_pauses z
                                      WHERE z.queue = q.name AND z.task IN (b.task, '*'))
                      AND EXISTS (SELECT FROM notifyq.jobs j
                                  WHERE j.status = 'queued' AND j.queue = q.name
                                    AND j.task = b.task AND j.run_at <= now()
                                  ORDER BY j.priority DESC, j.run_at, j.id  -- jobs_claim_idx
                                  LIMIT 1)
                    ORDER BY q.n
                    LIMIT 1) AS queue
            FROM notifyq.circuit_breakers b
            WHERE b.task = ANY(locked)
              AND (b.state = 'half_open'
                   OR (b.state = 'open' AND b.opened_at + b.cooldown <= now()))
              -- By primary key: COLLATE "C" keeps jobs_lease_idx out (see finish_jobs).
              AND NOT EXISTS (SELECT FROM notifyq.jobs j
                              WHERE j.id = b.probe_job AND j.status = 'running' COLLATE "C"
                                AND j.attempts = b.probe_attempt)
        ), started AS (
            UPDATE notifyq.circuit_breakers b
            SET state = 'half_open', probe_job = NULL, probe_attempt = NULL, changed_at = now()
            FROM due d
            WHERE b.task = d.task AND d.queue IS NOT NULL
            RETURNING b.task, d.queue
        )
        SELECT coalesce(array_agg(s.task), '{}'), coalesce(array_agg(s.queue), '{}')
        INTO probing, probe_queues
        FROM started s;
        SELECT ARRAY(SELECT t.name FROM unnest(claim_jobs.tasks) AS t(name)
                     WHERE t.name = ANY(probing)
                        OR NOT EXISTS (SELECT FROM notifyq.circuit_breakers b
                                       WHERE b.task = t.name AND b.state <> 'closed')),
               (SELECT min(b.opened_at + b.cooldown) FROM notifyq.circuit_breakers b
                WHERE b.task = ANY(claim_jobs.tasks) AND b.state = 'open'
                  AND b.opened_at + b.cooldown > now()
                  -- Paused work sets no timer: a task paused in every served queue.
                  AND EXISTS (SELECT FROM unnest(sorted) AS q(name)
                              WHERE NOT EXISTS (SELECT FROM notifyq.queue_pauses z
                                                WHERE z.queue = q.name
                                                  AND z.task IN (b.task, '*'))))
        INTO runs, reopen_at;
        probe_in := ARRAY(SELECT probe_queues[array_position(probing, t.name)]
                          FROM unnest(runs) WITH ORDINALITY AS t(name, n) ORDER BY t.n);
    END IF;
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
                FROM (SELECT u.name, u.probe_queue
                      FROM unnest(runs, probe_in) AS u(name, probe_queue)
                      WHERE NOT EXISTS (SELECT FROM notifyq.queue_pauses z
                                        WHERE z.queue = q.name AND z.task = u.name)) AS t
                CROSS JOIN LATERAL (
                    SELECT j.queue, j.task, j.priority, j.run_at, j.id
                    FROM notifyq.jobs j
                    WHERE j.status = 'queued' AND j.queue = q.name AND j.task = t.name
                      AND j.run_at <= now()
                      AND coalesce(t.probe_queue = q.name, true)  -- a probe: one queue, one job
                    ORDER BY j.priority DESC, j.run_at, j.id
                    LIMIT CASE WHEN t.probe_queue IS NULL THEN q.room ELSE 1 END
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
                  j.lease_expires_at, j.trace_context
    ), probes AS (
        -- The probe each half-open breaker let through (the one-time filter keeps
        -- this off the common path).
        UPDATE notifyq.circuit_breakers b
        SET probe_job = c.id, probe_attempt = c.attempts
        FROM claimed c
        WHERE cardinality(probing) > 0 AND b.task = c.task AND b.task = ANY(probing)
    )
    -- In claim order (an Append keeps its branches' order), the info row last.
    (SELECT c.id, c.queue, c.task, c.payload, c.attempts, c.max_attempts, c.checkpoint,
            c.lease_expires_at, NULL::float8, NULL::text[], NULL::bigint, c.trace_context
     FROM claimed c
     JOIN candidates k ON k.id = c.id
     ORDER BY k.ord)
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           (SELECT extract(epoch FROM least(
                       (SELECT min(d.slot) FROM deferrals d),
                       reopen_at,
                       (SELECT min(s.run_at)
                        FROM unnest(sorted) AS q(name)
                        CROSS JOIN unnest(runs) AS t(name)
                        CROSS JOIN LATERAL (
                            SELECT j.run_at
                            FROM notifyq.jobs j
                            WHERE j.status = 'queued' AND j.queue = q.name AND j.task = t.name
                              AND j.run_at > now()
                            ORDER BY j.run_at
                            LIMIT 1) AS s
                        WHERE NOT EXISTS (SELECT FROM notifyq.queue_pauses z
                                          WHERE z.queue = q.name AND z.task IN (t.name, '*'))))
                       - clock_timestamp())::float8),
           (SELECT array_agg(r.name) FROM rooms r
            WHERE r.room < claim_jobs.max_jobs
              AND r.room <= (SELECT count(*) FROM claimed c WHERE c.queue = r.name)),
           (SELECT count(*) FROM deferred),
           NULL;
END
$$;
COMMENT ON FUNCTION notifyq.claim_jobs(text, text[], text[], integer, interval) IS
    'The claim notifyq serve and notifyq.claim share: the jobs claimed, then a row with id '
    'NULL telling the next scheduled instant, the queues at their cap and the deferred count; '
    'circuit breakers hold back their tasks'' jobs and let one probe through.';

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
-- Circuit breakers (notifyq.circuit_breakers): a 'failed' outcome of a task
-- whose breaker is closed counts towards opening it, and the batch that
-- reaches the count opens it; one of a task whose breaker is open or half-open
-- is not charged (attempts goes back down, and the job is queued after its
-- backoff even on its last attempt): the outage is the task's, not the job's.
-- The probe's outcome closes the breaker (succeeded) or opens it again
-- (failed).  The breakers' rows are locked in task order, and only for tasks
-- with a failure or a probe in the batch.
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
        SELECT j.id, j.attempts, j.max_attempts, j.task,
               -- A failure while the task's breaker is open or half-open: not charged.
               o.outcome IS NOT DISTINCT FROM 'failed' AND EXISTS (
                   SELECT FROM notifyq.circuit_breakers b
                   WHERE b.task = j.task AND b.state <> 'closed') AS refund
        FROM notifyq.jobs j
        JOIN o ON j.id = o.id
        WHERE j.status = 'running' COLLATE "C"
          AND j.claimed_by = finish_jobs.worker
          AND j.attempts = coalesce(o.attempt, j.attempts)
        FOR NO KEY UPDATE OF j SKIP LOCKED
    ), decided AS (
        SELECT m.id, o.result, o.error, o.progress, o.message, m.refund,
               CASE WHEN coalesce(o.outcome, 'succeeded') = 'succeeded' THEN 'succeeded'
                    WHEN m.refund THEN 'queued'
                    WHEN o.outcome = 'dead' OR m.attempts >= m.max_attempts THEN 'dead'
                    ELSE 'queued' END AS status,
               CASE WHEN o.outcome = 'failed' AND (m.attempts < m.max_attempts OR m.refund)
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
            attempts = j.attempts - d.refund::integer,
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
        RETURNING j.id, j.attempts + d.refund::integer AS attempts, j.status, j.run_at
    ), tripped AS MATERIALIZED (
        -- Per task with a breaker: the failures to count, and whether its probe is here.
        SELECT b.task,
               count(*) FILTER (WHERE o.outcome = 'failed') AS failed,
               bool_or(b.state = 'closed') AS closed,
               bool_or(m.id = b.probe_job) AS probe
        FROM mine m
        JOIN o ON o.id = m.id
        JOIN notifyq.circuit_breakers b ON b.task = m.task
        GROUP BY b.task
    ), breakers AS MATERIALIZED (
        SELECT b.task
        FROM notifyq.circuit_breakers b
        JOIN tripped t ON t.task = b.task
        WHERE (t.failed > 0 AND t.closed) OR t.probe
        ORDER BY b.task
        FOR NO KEY UPDATE OF b
    ), counted AS (
        -- Computed from the row as it is once locked (another completion may have
        -- counted failures, or a claim started a probe, meanwhile).
        UPDATE notifyq.circuit_breakers b
        SET (state, failed, failed_since, opened_at, opens, probe_job, probe_attempt,
             changed_at) = (
            SELECT s.state,
                   CASE WHEN s.state = 'closed' AND b.state = 'closed' THEN s.failed ELSE 0 END,
                   CASE WHEN s.state = 'closed' AND b.state = 'closed' AND s.failed > 0
                        THEN s.since END,
                   CASE WHEN s.state = 'open' AND b.state <> 'open' THEN now()
                        WHEN s.state = 'closed' THEN NULL
                        ELSE b.opened_at END,
                   b.opens + (s.state = 'open' AND b.state <> 'open')::integer,
                   CASE WHEN s.state = 'half_open' THEN b.probe_job END,
                   CASE WHEN s.state = 'half_open' THEN b.probe_attempt END,
                   CASE WHEN s.state <> b.state THEN now() ELSE b.changed_at END
            FROM (SELECT w.failed, w.since,
                         CASE WHEN b.state = 'closed' AND t.failed > 0
                                   AND w.failed >= b.failures THEN 'open'
                              WHEN b.state = 'half_open' AND p.outcome = 'failed' THEN 'open'
                              WHEN b.state = 'half_open' AND p.outcome = 'succeeded'
                                  THEN 'closed'
                              ELSE b.state END AS state
                  FROM (SELECT CASE WHEN b.failed_since > now() - b.failure_window
                                    THEN b.failed + t.failed ELSE t.failed END AS failed,
                               CASE WHEN b.failed_since > now() - b.failure_window
                                    THEN b.failed_since ELSE now() END AS since) AS w
                  LEFT JOIN (SELECT coalesce(o.outcome, 'succeeded') AS outcome
                             FROM mine m
                             JOIN o ON o.id = m.id
                             WHERE m.id = b.probe_job AND m.attempts = b.probe_attempt) AS p
                      ON true) AS s)
        FROM breakers l
        JOIN tripped t ON t.task = l.task
        WHERE b.task = l.task
    )
    -- (Every data-modifying CTE runs to completion whether or not it is read.)
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

-- Every claim reads the breakers and may start a probe, every completion counts
-- failures, both with their caller's rights, and a dispatcher writes its app's
-- @app.task(circuit_breaker=...) at start-up: the roles that may claim (`notifyq
-- roles` gave the worker role EXECUTE on notifyq.claim_jobs) get what `notifyq
-- roles` gives them now, or their claims fail from this version on.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole AS role
        FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) AS a
        WHERE p.oid = 'notifyq.claim_jobs(text, text[], text[], integer, interval)'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON notifyq.circuit_breakers TO %s', r.role);
    END LOOP;
END
$$;
