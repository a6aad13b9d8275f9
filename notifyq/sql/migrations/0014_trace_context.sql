-- Schema version 14: a job carries the trace context of whoever enqueued it, so
-- the span of each attempt can link to the request that made the job (OpenTelemetry,
-- docs/tracing.md), and SQL workers get it with every job they claim.
-- schema.sql holds the same objects for new databases.

-- The propagation fields of the enqueuing trace, as a propagator injects them into
-- a map of strings (W3C Trace Context: {"traceparent": "00-...-01", "tracestate":
-- "..."}, and "baggage" where it is used).  Any producer may set it, from any
-- language; NULL (no trace) costs nothing.  The CHECK keeps a producer from storing
-- anything else or anything large in a row that every claim returns.  Its cost falls
-- on rows that have one: strict functions of NULL are not called.  Adding a NULL
-- column rewrites nothing; validating the CHECK reads notifyq.jobs once under the
-- ACCESS EXCLUSIVE lock the ALTER TABLE takes (all NULL: a plain sequential scan).
ALTER TABLE notifyq.jobs
    ADD COLUMN IF NOT EXISTS trace_context jsonb,
    ADD CONSTRAINT jobs_trace_context_valid CHECK (
        pg_catalog.jsonb_typeof(trace_context) = 'object'
        AND pg_catalog.pg_column_size(trace_context) <= 4096
        AND NOT pg_catalog.jsonb_path_exists(trace_context, '$.* ? (@.type() != "string")'));
COMMENT ON CONSTRAINT jobs_trace_context_valid ON notifyq.jobs IS
    'trace_context: NULL or a JSON object of string values, at most 4096 bytes as jsonb';
COMMENT ON COLUMN notifyq.jobs.trace_context IS
    'The enqueuing trace''s propagation fields ({"traceparent": ..., "tracestate": ...}, '
    'as an OpenTelemetry propagator injects them into a map); each attempt''s span links to it.';

-- The roles that may enqueue (notifyq roles gave them INSERT on jobs.task) may
-- set it; run `notifyq roles` again to be exact.
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
        EXECUTE format('GRANT INSERT (trace_context) ON notifyq.jobs TO %s', r.role);
    END LOOP;
END
$$;

-- SQL workers get it with each job: a new last attribute of notifyq.claimed_job,
-- so a worker that reads the columns it knows by name is unaffected.
ALTER TYPE notifyq.claimed_job ADD ATTRIBUTE trace_context jsonb;

-- notifyq.claim_jobs returns it as a new last column.  A function's result type cannot
-- change in place: it is dropped and created again, and the roles that could run it
-- (notifyq roles gave them EXECUTE) get their grant back.  notifyq.claim calls it from
-- PL/pgSQL, which records no dependency, so the DROP needs no CASCADE.
CREATE TEMPORARY TABLE notifyq_claim_jobs_grantees AS
SELECT DISTINCT a.grantee::regrole AS role
FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) AS a
WHERE p.oid = 'notifyq.claim_jobs(text, text[], text[], integer, interval)'::regprocedure
  AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0;

DROP FUNCTION notifyq.claim_jobs(text, text[], text[], integer, interval);

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
-- trace_context: the job's, as its producer set it (NULL on the closing row).
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
                  j.lease_expires_at, j.trace_context
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
           (SELECT count(*) FROM deferred),
           NULL;
END
$$;
COMMENT ON FUNCTION notifyq.claim_jobs(text, text[], text[], integer, interval) IS
    'The claim notifyq serve and notifyq.claim share: the jobs claimed, then a row with id '
    'NULL telling the next scheduled instant, the queues at their cap and the deferred count.';
REVOKE EXECUTE ON FUNCTION notifyq.claim_jobs(text, text[], text[], integer, interval) FROM PUBLIC;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT g.role FROM pg_temp.notifyq_claim_jobs_grantees g LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION '
                       'notifyq.claim_jobs(text, text[], text[], integer, interval) TO %s',
                       r.role);
    END LOOP;
END
$$;
DROP TABLE pg_temp.notifyq_claim_jobs_grantees;

-- Claim up to max_jobs jobs for `worker`: the same claim as `notifyq serve`'s
-- (priority, run_at, waiting jobs never claimed, concurrency caps and rate limits
-- across every worker and dispatcher, history written).  queues NULL: every
-- queue that has ready jobs; tasks NULL: any task (give the tasks this worker
-- can run, so it never claims another app's jobs).  Each job is held for
-- `lease`: renew it with notifyq.heartbeat, or it is rescued when it expires.
-- An empty result means nothing is ready: LISTEN notifyq_jobs and claim again
-- when a notification comes (or after a timeout, as a fallback).
-- Each job comes with its trace_context (NULL when its producer set none): the
-- worker's span for the attempt links to it (docs/tracing.md).
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
           c.lease_expires_at, t.timeout, c.trace_context
    FROM notifyq.claim_jobs(worker, served, runs, max_jobs, lease) AS c
    LEFT JOIN notifyq.tasks t ON t.task = c.task
    WHERE c.id IS NOT NULL;
END
$$;
