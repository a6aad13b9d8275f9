-- Every query notifyq runs at run time, one named block each.  store.py loads
-- this file once; a block starts with "-- name: NAME" and the next comment
-- line says what it is for.  Parameters are psycopg's %(name)s placeholders.

-- name: enqueue
-- Insert one job; NULL arguments fall back to the column defaults.
INSERT INTO notifyq.jobs (queue, task, payload, priority, run_at, max_attempts)
VALUES (%(queue)s, %(task)s, %(payload)s::jsonb, %(priority)s,
        coalesce(%(run_at)s, now() + make_interval(secs => %(delay)s)), %(max_attempts)s)
RETURNING id;

-- name: claim
-- Claim up to %(limit)s ready jobs of the served queues, marking them running
-- under our lease and counting the attempt, in one statement.  Each queue's
-- best rows come from its own index scan (LATERAL), so serving many queues
-- never sorts the whole backlog; the outer ORDER BY/LIMIT picks the global best.
-- The candidates CTE is MATERIALIZED so the locked set is computed once: a
-- `WHERE id IN (SELECT ... LIMIT n)` may be re-evaluated and claim more than n.
-- The last row (id NULL) carries the seconds until the next scheduled job, by
-- the database clock, so the dispatcher can sleep exactly that long.
WITH candidates AS MATERIALIZED (
    SELECT c.id
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM notifyq.jobs j
        WHERE j.status = 'queued' AND j.queue = q.name AND j.run_at <= now()
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.priority DESC, c.run_at, c.id
    LIMIT %(limit)s
), claimed AS (
    UPDATE notifyq.jobs j
    SET status = 'running',
        attempts = j.attempts + 1,
        started_at = now(),
        claimed_by = %(claimant)s,
        lease_expires_at = now() + make_interval(secs => %(lease)s),
        max_attempts = coalesce(
            j.max_attempts,
            (SELECT t.max_attempts
             FROM unnest(%(task_names)s::text[], %(task_max_attempts)s::int[])
                  AS t(name, max_attempts)
             WHERE t.name = j.task),
            %(default_max_attempts)s)
    FROM candidates c
    WHERE j.id = c.id
    RETURNING j.id, j.queue, j.task, j.payload, j.attempts, j.max_attempts
)
SELECT id, queue, task, payload, attempts, max_attempts, NULL::float8 AS next_in
FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL,
       (SELECT extract(epoch FROM j.run_at - clock_timestamp())::float8
        FROM notifyq.jobs j
        WHERE j.status = 'queued' AND j.run_at > now() AND j.queue = ANY(%(queues)s::text[])
        ORDER BY j.run_at
        LIMIT 1);

-- name: complete
-- Write a batch of outcomes at once.  Fenced: a row changes only while it is
-- still running under our claim and the same attempt, so a late completion of
-- an attempt whose lease expired (and was rescued) cannot overwrite the newer one.
UPDATE notifyq.jobs j
SET status = o.status,
    finished_at = CASE WHEN o.status = 'queued' THEN NULL ELSE now() END,
    run_at = CASE WHEN o.status = 'queued'
                  THEN now() + make_interval(secs => o.delay) ELSE j.run_at END,
    last_error = coalesce(o.error, j.last_error),
    claimed_by = NULL,
    lease_expires_at = NULL
FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(statuses)s::text[],
            %(delays)s::float8[], %(errors)s::text[])
     AS o(id, attempt, status, delay, error)
WHERE j.id = o.id
  AND j.status = 'running'
  AND j.claimed_by = %(claimant)s
  AND j.attempts = o.attempt
RETURNING j.id;

-- name: renew_leases
-- Heartbeat: extend the lease of every job we are still running.
UPDATE notifyq.jobs
SET lease_expires_at = now() + make_interval(secs => %(lease)s)
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'running' AND claimed_by = %(claimant)s
RETURNING id;

-- name: hand_back
-- Graceful shutdown: return unfinished jobs to the queue, ready now, without
-- charging the attempt that was interrupted.  Fenced like `complete`.
UPDATE notifyq.jobs j
SET status = 'queued',
    attempts = j.attempts - 1,
    started_at = NULL,
    claimed_by = NULL,
    lease_expires_at = NULL
FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS h(id, attempt)
WHERE j.id = h.id
  AND j.status = 'running'
  AND j.claimed_by = %(claimant)s
  AND j.attempts = h.attempt
RETURNING j.id;

-- name: release_orphans
-- After a claim whose reply was lost (the connection broke after the commit):
-- jobs running under our name that we never received go back, uncharged.
UPDATE notifyq.jobs
SET status = 'queued',
    attempts = attempts - 1,
    started_at = NULL,
    claimed_by = NULL,
    lease_expires_at = NULL
WHERE status = 'running'
  AND claimed_by = %(claimant)s
  AND NOT (id = ANY(%(held)s::bigint[]))
RETURNING id;

-- name: rescue
-- Re-queue jobs whose lease expired (their dispatcher died or lost the
-- database); the attempt counts, and a job with no attempts left goes dead.
-- SKIP LOCKED lets every live dispatcher run this without waiting on another.
WITH expired AS MATERIALIZED (
    SELECT id
    FROM notifyq.jobs
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE notifyq.jobs j
SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
    finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
    run_at = now(),
    last_error = format('attempt %%s lost: the lease of dispatcher %%s expired at %%s '
                        '(process killed or cut off from the database)',
                        j.attempts, j.claimed_by, j.lease_expires_at),
    claimed_by = NULL,
    lease_expires_at = NULL
FROM expired e
WHERE j.id = e.id
RETURNING j.id, j.status;

-- name: notify
-- The listener's probe: a notification from another connection than the listener's.
SELECT pg_notify(%(channel)s, %(payload)s);

-- name: schema_present
-- Whether the notifyq schema has been installed at all.
SELECT to_regclass('notifyq.schema_version') IS NOT NULL AS present;

-- name: schema_version
-- The newest schema version applied.
SELECT coalesce(max(version), 0) AS version FROM notifyq.schema_version;

-- name: migrate_lock
-- Serialise concurrent migrations (two dispatchers starting at once).
SELECT pg_advisory_xact_lock(hashtext('notifyq.migrate'));

-- name: record_version
-- Record a migration as applied, in the same transaction as the migration.
INSERT INTO notifyq.schema_version (version) VALUES (%(version)s)
ON CONFLICT (version) DO NOTHING;

-- name: health_server
-- notifyq health: the server answers; its version and our database's name.
SELECT current_setting('server_version') AS version, current_database() AS database;

-- name: health_oldest_transaction
-- notifyq health: the oldest transaction open in this database, other than ours
-- (client backends only; idle connections without a transaction have no xact_start).
-- Until it ends, vacuum cannot remove the rows dead since it began.
SELECT pid,
       extract(epoch FROM clock_timestamp() - xact_start)::float8 AS age,
       coalesce(application_name, '') AS application_name,
       coalesce(state, '') AS state
FROM pg_stat_activity
WHERE datname = current_database()
  AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'
  AND xact_start IS NOT NULL
ORDER BY xact_start
LIMIT 1;

-- name: health_expired_leases
-- notifyq health: running jobs whose lease expired over %(grace)s seconds ago,
-- which a live dispatcher would have rescued.
SELECT count(*) AS jobs,
       coalesce(extract(epoch FROM now() - min(lease_expires_at))::float8, 0) AS oldest
FROM notifyq.jobs
WHERE status = 'running' AND lease_expires_at < now() - make_interval(secs => %(grace)s);

-- name: health_jobs_table
-- notifyq health: live and dead tuples of notifyq.jobs (statistics, so approximate).
SELECT n_live_tup, n_dead_tup
FROM pg_stat_user_tables
WHERE relid = 'notifyq.jobs'::regclass;
