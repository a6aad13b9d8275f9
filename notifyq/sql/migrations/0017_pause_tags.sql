-- Schema version 17: pausing a queue or one task of it, separate from its cap
-- (notifyq.queue_pauses, honoured by every claim), and tags on jobs (a text[]
-- column with a GIN index, settable at enqueue, filterable by the admin
-- functions).  schema.sql holds the same objects for new databases.

-- ---------------------------------------------------------------------------
-- Tags
--
-- Adding a NULL column rewrites nothing; validating the CHECK reads notifyq.jobs
-- once under the ACCESS EXCLUSIVE lock the ALTER TABLE takes (all NULL: a plain
-- sequential scan), and building the partial index reads it once more (and
-- indexes nothing).
ALTER TABLE notifyq.jobs
    ADD COLUMN IF NOT EXISTS tags text[],
    -- Built-in functions only, no per-element subquery: a function looping over the
    -- tags costs every write of a tagged row about 5 µs, this well under one.
    ADD CONSTRAINT jobs_tags_valid CHECK (
        cardinality(tags) <= 20 AND array_ndims(tags) = 1
        AND array_position(tags, NULL) IS NULL AND array_position(tags, '') IS NULL
        AND char_length(array_to_string(tags, '')) <= 1000);
COMMENT ON CONSTRAINT jobs_tags_valid ON notifyq.jobs IS
    'tags: NULL or a one-dimensional array of at most 20 non-empty tags, none NULL, '
    '1000 characters in all';
COMMENT ON COLUMN notifyq.jobs.tags IS
    'Labels to find jobs by (tags @> ARRAY[...]): notifyq jobs list/retry/cancel/purge/watch --tag.';

-- Tagged rows by tag, for `tags @> ARRAY[...]` (GIN).  Partial: an untagged job
-- costs it nothing, on insert or on any later update.  A tagged one costs an entry
-- per tag on every write that is not HOT (a status change is never HOT: status is
-- in other indexes' predicates), most of it deferred to vacuum by fastupdate's
-- pending list.
CREATE INDEX IF NOT EXISTS jobs_tags_idx
    ON notifyq.jobs USING gin (tags) WHERE tags IS NOT NULL;

-- The roles that may enqueue (notifyq roles gave them INSERT on jobs.task) may
-- set them; run `notifyq roles` again to be exact.
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
        EXECUTE format('GRANT INSERT (tags) ON notifyq.jobs TO %s', r.role);
    END LOOP;
END
$$;

-- retry_dead and purge take tags as a new last parameter.  A function's
-- parameters cannot change in place: the old ones are dropped (nothing depends on
-- them; PL/pgSQL callers record no dependency) and the roles an owner let run
-- them get their grant back.
CREATE TEMPORARY TABLE notifyq_admin_grantees AS
SELECT p.proname::text AS name, a.grantee::regrole AS role
FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) AS a
WHERE p.oid IN ('notifyq.retry_dead(text, text)'::regprocedure,
                'notifyq.purge(interval, text[])'::regprocedure)
  AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0;

DROP FUNCTION notifyq.retry_dead(text, text);
DROP FUNCTION notifyq.purge(interval, text[]);

-- Re-queue every dead job (of one queue and/or one task when given, and with
-- every one of `tags` when given).
CREATE OR REPLACE FUNCTION notifyq.retry_dead(
    queue text DEFAULT NULL, task text DEFAULT NULL, tags text[] DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    -- '{}' is no filter and not "any job" either: `tags @> '{}'` holds for every
    -- tagged job and no untagged one.
    IF cardinality(retry_dead.tags) = 0 THEN
        RAISE EXCEPTION 'notifyq: retry_dead needs at least one tag, or NULL for any job'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE notifyq.jobs j
    SET status = 'queued', attempts = 0, run_at = now(), started_at = NULL, finished_at = NULL
    WHERE j.status = 'dead'
      AND (retry_dead.queue IS NULL OR j.queue = retry_dead.queue)
      AND (retry_dead.task IS NULL OR j.task = retry_dead.task)
      AND (retry_dead.tags IS NULL OR j.tags @> retry_dead.tags);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION notifyq.retry_dead(text, text, text[]) IS
    'Re-queue dead jobs (optionally only of one queue and/or task, and with all of tags): '
    'queued, attempts 0, run_at now(), last_error kept. Returns how many.';

-- Cancel every unfinished job (queued, waiting or running) that has all of
-- `tags` (of one queue and/or task when given), as cancel_job cancels one.
-- Rows are locked in id order, as everywhere a statement locks many rows; the
-- lock re-reads each row, so one finished meanwhile is left alone.
CREATE OR REPLACE FUNCTION notifyq.cancel_jobs(
    tags text[], queue text DEFAULT NULL, task text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF cancel_jobs.tags IS NULL OR cardinality(cancel_jobs.tags) = 0 THEN
        RAISE EXCEPTION 'notifyq: cancel_jobs needs at least one tag'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Cancel a single job by id with notifyq.cancel_job.';
    END IF;
    WITH doomed AS MATERIALIZED (
        SELECT j.id FROM notifyq.jobs j
        WHERE j.tags @> cancel_jobs.tags
          AND j.status IN ('queued', 'waiting', 'running')
          AND (cancel_jobs.queue IS NULL OR j.queue = cancel_jobs.queue)
          AND (cancel_jobs.task IS NULL OR j.task = cancel_jobs.task)
        ORDER BY j.id
        FOR UPDATE
    )
    UPDATE notifyq.jobs j
    SET status = 'cancelled', finished_at = now(), claimed_by = NULL, lease_expires_at = NULL
    FROM doomed d
    WHERE j.id = d.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION notifyq.cancel_jobs(text[], text, text) IS
    'Cancel every queued, waiting or running job with all of tags (optionally only of one '
    'queue and/or task), as cancel_job does one. Returns how many.';

-- Delete at most max_rows jobs that finished more than older_than ago, oldest
-- first, along jobs_finished_idx, with their history.  Only succeeded, dead
-- and cancelled rows qualify: queued and running rows (the queue itself) are
-- never read, locked or deleted, so dispatchers claim as usual meanwhile.
-- Run it in a transaction of its own per batch (as `notifyq serve`'s retention
-- does) to hold each batch's locks only briefly.  Returns how many jobs went.
-- It runs as the owner, so a role allowed to EXECUTE it (the worker role) can
-- delete finished jobs this way and no other.
-- With `tags`, only jobs that have every one of them (NULL: any job).
CREATE OR REPLACE FUNCTION notifyq.purge_batch(
    older_than interval,
    statuses text[],
    max_rows integer,
    tags text[]
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
    -- '{}' would delete every tagged job and no untagged one (see retry_dead).
    IF cardinality(purge_batch.tags) = 0 THEN
        RAISE EXCEPTION 'notifyq: purge needs at least one tag, or NULL for any job'
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
          AND (purge_batch.tags IS NULL OR j.tags @> purge_batch.tags)
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
COMMENT ON FUNCTION notifyq.purge_batch(interval, text[], integer, text[]) IS
    'Delete at most max_rows jobs of the given statuses (only succeeded, dead and cancelled are '
    'allowed) that finished more than older_than ago, and have all of tags unless it is NULL, '
    'with their history; never touches queued or running jobs. Returns how many were deleted.';

-- The same without tags: the form `notifyq serve`'s retention runs (the worker role
-- may EXECUTE it).
CREATE OR REPLACE FUNCTION notifyq.purge_batch(
    older_than interval,
    statuses text[],
    max_rows integer
) RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER  -- notifyq serve's retention runs it as the worker role, which cannot DELETE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN notifyq.purge_batch(older_than, statuses, max_rows, NULL::text[]);
END
$$;
COMMENT ON FUNCTION notifyq.purge_batch(interval, text[], integer) IS
    'Delete at most max_rows jobs of the given statuses (only succeeded, dead and cancelled are '
    'allowed) that finished more than older_than ago, with their history; never touches queued '
    'or running jobs. Returns how many were deleted.';

-- Delete every job of the given statuses that finished more than older_than
-- ago (with every one of `tags`, when given), 10,000 per batch (purge_batch),
-- all in the caller's transaction.  Returns how many jobs were deleted.
CREATE OR REPLACE FUNCTION notifyq.purge(
    older_than interval,
    statuses text[] DEFAULT '{succeeded,cancelled}',
    tags text[] DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    batch bigint;
    total bigint := 0;
BEGIN
    LOOP
        batch := notifyq.purge_batch(older_than, statuses, 10000, tags);
        total := total + batch;
        EXIT WHEN batch < 10000;
    END LOOP;
    RETURN total;
END
$$;
COMMENT ON FUNCTION notifyq.purge(interval, text[], text[]) IS
    'Delete jobs of the given statuses (default succeeded and cancelled; only succeeded, dead and '
    'cancelled are allowed) that finished more than older_than ago, and have all of tags unless '
    'it is NULL, with their history, 10,000 per batch; never touches queued or running jobs. '
    'Returns how many were deleted.';

REVOKE EXECUTE ON FUNCTION notifyq.retry_dead(text, text, text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.cancel_jobs(text[], text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.purge(interval, text[], text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.purge_batch(interval, text[], integer, text[]) FROM PUBLIC;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT g.name, g.role FROM pg_temp.notifyq_admin_grantees g LOOP
        IF r.name = 'retry_dead' THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION notifyq.retry_dead(text, text, text[]) TO %s',
                           r.role);
        ELSE
            EXECUTE format('GRANT EXECUTE ON FUNCTION notifyq.purge(interval, text[], text[]) TO %s',
                           r.role);
        END IF;
    END LOOP;
END
$$;
DROP TABLE pg_temp.notifyq_admin_grantees;

-- ---------------------------------------------------------------------------
-- Pausing

-- A paused queue (task '*') or task of a queue starts nothing new: every claim,
-- `notifyq serve`'s and notifyq.claim's alike, reads this table (claim_room for
-- the queue, claim_jobs for its tasks) and leaves the paused work queued.  Jobs
-- already running finish as usual.  Separate from the caps, so a pause keeps the
-- queue's cap: resuming restores it as it was.  A claim that started before the
-- pause committed may still start jobs; every claim that starts after it sees it.
-- Pause with notifyq.pause_queue or a plain INSERT (task defaults to '*'); resume
-- with notifyq.resume_queue or a DELETE.
CREATE TABLE IF NOT EXISTS notifyq.queue_pauses (
    queue     text        NOT NULL,
    task      text        NOT NULL DEFAULT '*',  -- '*': every task of the queue
    paused_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, task),
    CONSTRAINT queue_pauses_queue_format CHECK (
        queue ~ '^[a-z0-9_][a-z0-9_-]*$' AND char_length(queue) <= 63),
    CONSTRAINT queue_pauses_task_format CHECK (
        task = '*' OR (task ~ '^[A-Za-z_][A-Za-z0-9_.:-]*$' AND char_length(task) <= 200))
);
COMMENT ON TABLE notifyq.queue_pauses IS
    'Paused queues (task ''*'') and tasks of a queue: no claim starts their jobs; running '
    'ones finish. INSERT to pause (or notifyq.pause_queue), DELETE to resume (or '
    'notifyq.resume_queue).';
COMMENT ON CONSTRAINT queue_pauses_queue_format ON notifyq.queue_pauses IS
    'queue: 1-63 characters of a-z, 0-9, _ and -, not starting with -';
COMMENT ON CONSTRAINT queue_pauses_task_format ON notifyq.queue_pauses IS
    'task: ''*'' (the whole queue) or a task name, as notifyq.jobs.task';

-- A pause lifted wakes the dispatchers and SQL workers of the queue at once, on
-- the channels' own terms: "limit:QUEUE" on notifyq_internal (the cap's message:
-- a dispatcher that found the queue without room, as a paused queue is, ignores
-- its inserts until told it has room again), and the queue's name on
-- notifyq_jobs (as an insert would: a dispatcher or SQL worker whose claims left
-- a paused task's jobs behind is waiting for one).  A pause sends nothing: the
-- next claim sees it.
CREATE OR REPLACE FUNCTION notifyq.notify_pause_lifted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('notifyq_internal', 'limit:' OPERATOR(pg_catalog.||) OLD.queue);
    PERFORM pg_catalog.pg_notify('notifyq_jobs', OLD.queue);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER queue_pauses_lifted
    AFTER UPDATE OR DELETE ON notifyq.queue_pauses
    FOR EACH ROW EXECUTE FUNCTION notifyq.notify_pause_lifted();

-- Pause a queue (task NULL) or one task of it; true if it was not paused
-- already.  Run as the owner, or grant EXECUTE and INSERT on queue_pauses.
CREATE OR REPLACE FUNCTION notifyq.pause_queue(queue text, task text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pause_queue.queue IS NULL THEN
        RAISE EXCEPTION 'notifyq: name the queue to pause'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO notifyq.queue_pauses AS p (queue, task)
    VALUES (pause_queue.queue, coalesce(pause_queue.task, '*'))
    ON CONFLICT ON CONSTRAINT queue_pauses_pkey DO NOTHING;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION notifyq.pause_queue(text, text) IS
    'Pause a queue (task NULL) or one task of it: no claim starts its jobs until resumed; '
    'running ones finish; its cap is kept. Returns false if it was paused already.';

-- Lift the pause of a queue (task NULL: the queue-wide one; a task's pause is
-- lifted by naming the task); true if it was paused.
CREATE OR REPLACE FUNCTION notifyq.resume_queue(queue text, task text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF resume_queue.queue IS NULL THEN
        RAISE EXCEPTION 'notifyq: name the queue to resume'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM notifyq.queue_pauses p
    WHERE p.queue = resume_queue.queue AND p.task = coalesce(resume_queue.task, '*');
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION notifyq.resume_queue(text, text) IS
    'Lift the pause of a queue (task NULL) or of one task of it; its dispatchers are woken at '
    'once. Returns false if it was not paused.';

REVOKE EXECUTE ON FUNCTION notifyq.notify_pause_lifted() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.pause_queue(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.resume_queue(text, text) FROM PUBLIC;

-- Every claim reads it as its caller: the roles that may read the caps (notifyq
-- roles gave the worker role SELECT on queue_limits) may read it; run `notifyq
-- roles` again to be exact.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole AS role
        FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) AS a
        WHERE c.oid = 'notifyq.queue_limits'::regclass
          AND a.privilege_type = 'SELECT' AND a.grantee <> c.relowner AND a.grantee <> 0
    LOOP
        EXECUTE format('GRANT SELECT ON notifyq.queue_pauses TO %s', r.role);
    END LOOP;
END
$$;

-- Per queue: jobs by status, and how long the oldest claimable job has waited;
-- waiting (for dependencies) as version 3 appended it; paused (the whole queue)
-- and paused_tasks (its tasks paused on their own) as version 17 appended them.
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
       count(*) FILTER (WHERE status = 'waiting')                    AS waiting,
       EXISTS (SELECT FROM notifyq.queue_pauses p
               WHERE p.queue = j.queue AND p.task = '*')             AS paused,
       ARRAY(SELECT p.task FROM notifyq.queue_pauses p
             WHERE p.queue = j.queue AND p.task <> '*' ORDER BY p.task) AS paused_tasks
FROM notifyq.jobs j
GROUP BY queue;

-- How many jobs of `queue` a claim may take now: none while it is paused
-- (notifyq.queue_pauses, whatever its cap); `wanted` when it has no
-- cap; else what the cap leaves, counting the jobs running now.  Two claims of
-- a capped queue must not both count the same free room, so the function takes
-- a transaction-level advisory lock per queue (held until the claim commits)
-- before it counts; the count is a statement of its own (this function is
-- VOLATILE), so under READ COMMITTED it sees every claim committed before the
-- lock was granted.  Claims of uncapped queues take no lock.  A dispatcher
-- passes its queues in sorted order, so two claims lock queues in one order.
CREATE OR REPLACE FUNCTION notifyq.claim_room(queue text, wanted integer) RETURNS integer
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cap integer;
    busy integer;
BEGIN
    IF EXISTS (SELECT FROM notifyq.queue_pauses p
               WHERE p.queue = claim_room.queue AND p.task = '*') THEN
        RETURN 0;
    END IF;
    SELECT l.max_running INTO cap FROM notifyq.queue_limits l WHERE l.queue = claim_room.queue;
    IF NOT FOUND THEN
        RETURN wanted;
    END IF;
    PERFORM pg_advisory_xact_lock(28273, hashtext(claim_room.queue));  -- 28273: 'nq'
    SELECT count(*) INTO busy
    FROM notifyq.jobs j
    WHERE j.status = 'running' AND j.queue = claim_room.queue;
    RETURN greatest(0, least(wanted, cap - busy));
END
$$;
COMMENT ON FUNCTION notifyq.claim_room(text, integer) IS
    'Internal to the claim: how many jobs of the queue may be claimed now under its '
    'notifyq.queue_limits cap (wanted when it has none, 0 while it is paused); serialises '
    'claims of a capped queue.';

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
-- Paused work (notifyq.queue_pauses) is never read: a paused queue has no room
-- (claim_room), so it is among full_queues and its dispatchers ignore its inserts
-- until the resume's notification; a paused task's pairs are left out of the
-- probes.  Neither sets the timer (next_in).  One probe of that (small) table per
-- queue and per (queue, task) pair.
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
                FROM (SELECT u.name FROM unnest(claim_jobs.tasks) AS u(name)
                      WHERE NOT EXISTS (SELECT FROM notifyq.queue_pauses z
                                        WHERE z.queue = q.name AND z.task = u.name)) AS t
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
    'NULL telling the next scheduled instant, the queues at their cap and the deferred count.';
