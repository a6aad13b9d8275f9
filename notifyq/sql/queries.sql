-- Every query notifyq runs at run time, one named block each.  notifyq/store/
-- loads this file once and runs each block through a typed function that
-- returns named rows (a column of a block is a field of its row type, by name).
-- A block starts with "-- name: NAME" and the next comment line says what it is
-- for.  Parameters are psycopg's %(name)s placeholders.

-- name: enqueue
-- Insert one job; NULL arguments fall back to the column defaults.  With
-- depends_on, the schema's trigger sets the status (waiting, queued, cancelled).
-- The token is ours (the caller made it): a producer may not read it back.
-- trace_context: the enqueuing span's propagation fields (tracing.py), or NULL.
INSERT INTO notifyq.jobs (queue, task, payload, priority, run_at, max_attempts, depends_on,
                          on_dependency_failure, rate_key, token, trace_context, tags,
                          callback_url)
VALUES (%(queue)s, %(task)s, %(payload)s::pg_catalog.jsonb, %(priority)s,
        coalesce(%(run_at)s, now() + make_interval(secs => %(delay)s)), %(max_attempts)s,
        %(depends_on)s::bigint[], %(on_dependency_failure)s, %(rate_key)s::text,
        %(token)s::uuid, %(trace_context)s::pg_catalog.jsonb, %(tags)s::text[],
        %(callback_url)s::text)
RETURNING id;

-- name: enqueue_deduped
-- `enqueue` with a dedupe_key: while an unfinished job holds the key, nothing is
-- inserted and that job's id comes back instead (created false).  With
-- unique_for, a window the key's last job opened refuses it too (the id is that
-- job's, which may have been purged since); with on_duplicate 'replace', the
-- queued job holding the key got this payload (the schema's dedupe_on_insert).
-- No row at all means the holder committed after this statement's snapshot (a
-- window seen here as ended was opened again since): run it again.
WITH inserted AS (
    INSERT INTO notifyq.jobs (queue, task, payload, priority, run_at, max_attempts, depends_on,
                              on_dependency_failure, dedupe_key, rate_key, token, trace_context,
                              unique_for, on_duplicate, tags, callback_url)
    VALUES (%(queue)s, %(task)s, %(payload)s::pg_catalog.jsonb, %(priority)s,
            coalesce(%(run_at)s, now() + make_interval(secs => %(delay)s)), %(max_attempts)s,
            %(depends_on)s::bigint[], %(on_dependency_failure)s, %(dedupe_key)s,
            %(rate_key)s::text, %(token)s::uuid, %(trace_context)s::pg_catalog.jsonb,
            make_interval(secs => %(unique_for)s::float8), %(on_duplicate)s::text,
            %(tags)s::text[], %(callback_url)s::text)
    ON CONFLICT DO NOTHING
    RETURNING id
)
SELECT id, true AS created FROM inserted
UNION ALL
(SELECT h.id, false
 FROM (SELECT j.id, 1 AS rank FROM notifyq.jobs j
       WHERE j.dedupe_key = %(dedupe_key)s
         AND j.status NOT IN ('succeeded', 'dead', 'cancelled')
       UNION ALL
       SELECT w.job_id, 2 FROM notifyq.unique_windows w
       WHERE %(unique_for)s::float8 IS NOT NULL AND w.dedupe_key = %(dedupe_key)s
         AND w.expires_at > now()) AS h
 WHERE NOT EXISTS (SELECT FROM inserted)
 ORDER BY h.rank
 LIMIT 1);

-- name: enqueue_many
-- Insert many jobs of one task in one statement: the statement-level trigger
-- sends one notification per queue however many rows.  Identity values are
-- drawn in ORDINALITY order, so the caller sorts the returned ids into the
-- payloads' order (and so their tokens').  Casts are explicit: a NULL parameter
-- has no type here.  The batch shares one trace_context (its enqueuing span's)
-- and its tags.
INSERT INTO notifyq.jobs (queue, task, payload, priority, run_at, max_attempts, depends_on,
                          on_dependency_failure, rate_key, token, trace_context, tags,
                          callback_url)
SELECT %(queue)s::text, %(task)s::text, p.payload::pg_catalog.jsonb, %(priority)s::integer,
       coalesce(%(run_at)s::timestamptz,
                now() + pg_catalog.make_interval(secs => %(delay)s::float8)),
       %(max_attempts)s::integer, %(depends_on)s::bigint[], %(on_dependency_failure)s::text,
       %(rate_key)s::text, p.token, %(trace_context)s::pg_catalog.jsonb, %(tags)s::text[],
       %(callback_url)s::text
FROM ROWS FROM (pg_catalog.unnest(%(payloads)s::text[]), pg_catalog.unnest(%(tokens)s::uuid[]))
     WITH ORDINALITY AS p (payload, token, n)
ORDER BY p.n
RETURNING id;

-- name: claim
-- Claim up to %(limit)s ready jobs of the served queues whose task is one of
-- %(task_names)s (the tasks we have handlers for): notifyq.claim_jobs, the claim
-- every SQL worker shares (schema.sql says how it reads and locks).  A job of
-- any other task is never read, let alone claimed: it waits for a dispatcher
-- that can run it (see unserved_jobs).  The jobs claimed, then a row with id
-- NULL: the seconds until the next scheduled job or rate slot, the served queues
-- at their concurrency cap, and how many candidates a rate limit deferred.
-- trace_context: what the job's producer set, for the attempt's span (tracing.py).
SELECT c.id, c.queue, c.task, c.payload, c.attempt, c.max_attempts, c.next_in, c.checkpoint,
       c.full_queues, c.deferred, c.trace_context
FROM notifyq.claim_jobs(%(claimant)s, %(queues)s::text[], %(task_names)s::text[], %(limit)s,
                        make_interval(secs => %(lease)s)) AS c;

-- name: complete
-- Write a batch of outcomes (succeeded, failed, dead) with notifyq.finish_jobs,
-- the write every SQL worker shares: fenced by our claim and the attempt, the
-- task's retry policy applied (notifyq.tasks), rows another transaction holds
-- locked skipped and returned 'busy' (their outcomes are written again later).
-- retry_in: seconds before a failed job runs again (a handler's Retry(after=...)),
-- NULL where the task's backoff decides.
-- NULL arrays (the common batch of bare successes) send nothing per job.
SELECT f.id, f.attempt, f.status, f.run_at, f.holder
FROM notifyq.finish_jobs(%(claimant)s, %(ids)s::bigint[], %(attempts)s::int[],
                         %(outcomes)s::text[], %(results)s::text[]::pg_catalog.jsonb[],
                         %(errors)s::text[], %(retry_in)s::float8[], %(progresses)s::real[],
                         %(progress_messages)s::text[]) AS f;

-- name: renew_leases
-- Heartbeat: extend the lease of every job we are still running.  SKIP LOCKED:
-- a row locked right now is being completed or handed back (by our own other
-- connection, in another order) or changed by an admin; waiting for it could
-- deadlock, and the next heartbeat, a third of a lease later, renews it anyway.
-- By id through the primary key, never jobs_lease_idx: see `complete`.
WITH mine AS MATERIALIZED (
    SELECT id
    FROM notifyq.jobs
    WHERE id = ANY(%(ids)s::bigint[]) AND status = 'running' COLLATE "C" AND claimed_by = %(claimant)s
    FOR UPDATE SKIP LOCKED
)
UPDATE notifyq.jobs j
SET lease_expires_at = now() + make_interval(secs => %(lease)s)
FROM mine
WHERE j.id = mine.id
RETURNING j.id, j.attempts;

-- name: still_claimed
-- Which of these jobs are still running under our claim (a plain read, no lock):
-- tells a lease really lost from a row renewal skipped because it was locked.
-- By id through the primary key, never jobs_lease_idx: see `complete`.
SELECT id, attempts FROM notifyq.jobs
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'running' COLLATE "C" AND claimed_by = %(claimant)s;

-- name: save_progress
-- Handlers' latest progress reports, one row per job, fenced like `complete` (a
-- report of an attempt that lost its claim is dropped).  Each row written is
-- announced on notifyq_progress, for notifyq watch and any client that LISTENs.
-- SKIP LOCKED: a report is a hint; the row's next report, or the outcome, carries it.
-- By id through the primary key, never jobs_lease_idx: see `complete`.
WITH mine AS MATERIALIZED (
    SELECT j.id, o.progress, o.message
    FROM notifyq.jobs j
    JOIN unnest(%(ids)s::bigint[], %(attempts)s::int[], %(percents)s::real[],
                %(messages)s::text[]) AS o(id, attempt, progress, message) ON j.id = o.id
    WHERE j.status = 'running' COLLATE "C"
      AND j.claimed_by = %(claimant)s
      AND j.attempts = o.attempt
    FOR NO KEY UPDATE OF j SKIP LOCKED
), written AS (
    UPDATE notifyq.jobs j
    SET progress = m.progress, progress_message = m.message
    FROM mine m
    WHERE j.id = m.id
    RETURNING j.id, j.queue, j.task, j.attempts, j.progress, j.progress_message
)
SELECT pg_notify('notifyq_progress',
                 json_build_object('id', id, 'queue', queue, 'task', task, 'attempt', attempts,
                                   'progress', progress, 'message', progress_message)::text)
FROM written;

-- name: save_checkpoint
-- A handler's checkpoint, for the job's next attempt; fenced like `complete`.
UPDATE notifyq.jobs
SET checkpoint = %(checkpoint)s::pg_catalog.jsonb
WHERE id = %(id)s AND status = 'running' COLLATE "C" AND claimed_by = %(claimant)s
  AND attempts = %(attempt)s
RETURNING id;

-- name: dependency_results
-- JobContext.dependency_results: the jobs a job depends on, their status and result
-- (notifyq.dependency_results: the job by primary key, each dependency by it too).
SELECT d.id, d.status, d.result FROM notifyq.dependency_results(%(id)s) AS d;

-- name: expire_unique_windows
-- Retention: delete a batch of unique_for windows that ended (the SQL function).
SELECT notifyq.expire_unique_windows(%(limit)s) AS deleted;

-- name: cancelled_among
-- Which of the jobs this dispatcher runs were cancelled meanwhile (notifyq.cancel_job,
-- or a plain UPDATE to 'cancelled'): their handlers are interrupted.
SELECT id FROM notifyq.jobs WHERE id = ANY(%(ids)s::bigint[]) AND status = 'cancelled';

-- name: work_left
-- For `serve --until-empty`, asked only once a claim found nothing and nothing runs
-- here: is any job of the served queues still to be started now?  Ready ones that a
-- concurrency cap held by other dispatchers kept from us count, and so do those a
-- rate limit gave a slot (rate_reserved: ready work spread out, not scheduled work).
-- Delayed jobs and retries waiting out their backoff do not: they are for a later run.
-- Only the tasks we have handlers for: another app's jobs are not ours to wait for.
-- Paused ones (notifyq.queue_pauses) do not count either: they start on no one's
-- claim until resumed, so a run until empty ends without them.
-- One probe per (queue, task) pair, as the claim reads (jobs_claim_idx, then
-- jobs_scheduled_idx), never a scan of the table; the second reads the pair's
-- scheduled jobs only when nothing is ready, i.e. once, at the end.
SELECT EXISTS (SELECT FROM unnest(%(queues)s::text[]) AS q(name)
               CROSS JOIN unnest(%(tasks)s::text[]) AS t(name)
               CROSS JOIN LATERAL (
                   SELECT FROM notifyq.jobs j
                   WHERE j.status = 'queued' AND j.queue = q.name AND j.task = t.name
                     AND j.run_at <= now()
                     AND NOT EXISTS (SELECT FROM notifyq.queue_pauses z  -- before any read
                                     WHERE z.queue = q.name AND z.task IN (t.name, '*'))
                   ORDER BY j.priority DESC, j.run_at, j.id  -- jobs_claim_idx's order
                   LIMIT 1) AS ready)
    OR EXISTS (SELECT FROM unnest(%(queues)s::text[]) AS q(name)
               CROSS JOIN unnest(%(tasks)s::text[]) AS t(name)
               CROSS JOIN LATERAL (
                   SELECT FROM notifyq.jobs j
                   WHERE j.status = 'queued' AND j.queue = q.name AND j.task = t.name
                     AND j.rate_reserved
                     AND NOT EXISTS (SELECT FROM notifyq.queue_pauses z
                                     WHERE z.queue = q.name AND z.task IN (t.name, '*'))
                   ORDER BY j.run_at  -- jobs_scheduled_idx's order
                   LIMIT 1) AS paced);

-- name: hand_back
-- Graceful shutdown: return unfinished jobs to the queue, ready now, without
-- charging the attempt that was interrupted (notifyq.hand_back_jobs).  Fenced,
-- and skipping locked rows (returned 'busy'), like `complete`.
SELECT h.id, h.attempt, h.status, h.run_at, h.holder
FROM notifyq.hand_back_jobs(%(claimant)s, %(ids)s::bigint[], %(attempts)s::int[]) AS h;

-- name: sync_tasks
-- At start-up: our @app.task settings into notifyq.tasks, where every worker's
-- claims and failures read them.  A row already equal is left alone (no write).
INSERT INTO notifyq.tasks AS t (task, max_attempts, backoff_base, backoff_factor, backoff_max,
                                timeout)
SELECT s.task, s.max_attempts, make_interval(secs => s.base), s.factor,
       make_interval(secs => s.max_delay), make_interval(secs => s.timeout)
FROM unnest(%(tasks)s::text[], %(max_attempts)s::int[], %(bases)s::float8[],
            %(factors)s::float8[], %(max_delays)s::float8[], %(timeouts)s::float8[])
     AS s(task, max_attempts, base, factor, max_delay, timeout)
ORDER BY s.task
ON CONFLICT (task) DO UPDATE
SET max_attempts = excluded.max_attempts, backoff_base = excluded.backoff_base,
    backoff_factor = excluded.backoff_factor, backoff_max = excluded.backoff_max,
    timeout = excluded.timeout, updated_at = now()
WHERE (t.max_attempts, t.backoff_base, t.backoff_factor, t.backoff_max, t.timeout)
      IS DISTINCT FROM (excluded.max_attempts, excluded.backoff_base, excluded.backoff_factor,
                        excluded.backoff_max, excluded.timeout)
RETURNING t.task;

-- name: sync_breakers
-- At start-up: our @app.task(circuit_breaker=...) settings into notifyq.circuit_breakers
-- (notifyq.set_circuit_breaker's upsert, which the worker role may not call); a breaker's
-- state is kept, and a row already equal is left alone (no write).
INSERT INTO notifyq.circuit_breakers AS b (task, failures, failure_window, cooldown)
SELECT s.task, s.failures, make_interval(secs => s.span), make_interval(secs => s.cooldown)
FROM unnest(%(tasks)s::text[], %(failures)s::int[], %(windows)s::float8[],
            %(cooldowns)s::float8[]) AS s(task, failures, span, cooldown)
ORDER BY s.task
ON CONFLICT (task) DO UPDATE
SET failures = excluded.failures, failure_window = excluded.failure_window,
    cooldown = excluded.cooldown, changed_at = now()
WHERE (b.failures, b.failure_window, b.cooldown)
      IS DISTINCT FROM (excluded.failures, excluded.failure_window, excluded.cooldown)
RETURNING b.task;

-- name: endpoints
-- The HTTP endpoints (notifyq.endpoints) a dispatcher serves: read before its first
-- claim and again when a change is announced on notifyq_internal.
SELECT e.task, e.url, e.timeout, e.max_concurrency, e.headers, e.secret
FROM notifyq.endpoints e
ORDER BY e.task;

-- name: release_orphans
-- After a claim whose reply was lost (the connection broke after the commit):
-- jobs running under our name that we never received go back, uncharged.  A row
-- locked right now is skipped, not waited for: its lease, which nobody renews,
-- returns it.
WITH orphans AS MATERIALIZED (
    SELECT id
    FROM notifyq.jobs
    WHERE status = 'running'
      AND claimed_by = %(claimant)s
      AND NOT (id = ANY(%(held)s::bigint[]))
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE notifyq.jobs j
SET status = 'queued',
    attempts = j.attempts - 1,
    started_at = NULL,
    claimed_by = NULL,
    lease_expires_at = NULL
FROM orphans o
WHERE j.id = o.id
RETURNING j.id;

-- name: rescue
-- Re-queue the running jobs of dispatchers whose database session ended, and of
-- those whose lease expired (notifyq.rescue_jobs, schema.sql); the last row (id
-- NULL) says how many other live claimants with running jobs are watched.
SELECT id, status, cause, watched
FROM notifyq.rescue_jobs(%(claimant)s, make_interval(secs => %(session_grace)s),
                         make_interval(secs => %(restart_grace)s), %(trust_sessions)s,
                         %(limit)s);

-- name: alive
-- The lease keeper's beat while it holds jobs: with its liveness lock free but a
-- recent beat, a dispatcher is alive (only its listening connection dropped).
UPDATE notifyq.dispatchers SET alive_at = now() WHERE claimant = %(claimant)s;

-- name: lock_timeout
-- How long a dispatcher's statement may wait for a lock: for the session (local
-- false), or, behind a pooler in transaction mode, for the statement's own
-- transaction (a session setting would stay on the pooler's server connection,
-- for whichever client gets it next).
SELECT set_config('lock_timeout', %(lock_timeout)s, %(local)s);

-- name: upkeep
-- The listening connection's fallback poll, one statement that is also its ping:
-- is a job of the served queues and tasks ready (then the dispatcher claims), and
-- has a rescue sweep anything to look at (notifyq.rescue_due; then the lease
-- keeper sweeps)?  One probe per (queue, task) pair along jobs_claim_idx, as
-- work_left; jobs kept by a cap or a rate limit count as ready (the claim says),
-- paused ones do not (no claim would start them: a poll finding them would only
-- make an empty claim, every time).  The pause is a condition on the pair only, so
-- it is tested once per pair before its probe reads a row.  Nor do those a circuit
-- breaker holds (open in its cool-down, or half-open with its probe running), for
-- the same reason.
SELECT EXISTS (SELECT FROM unnest(%(queues)s::text[]) AS q(name)
               CROSS JOIN (SELECT u.name FROM unnest(%(tasks)s::text[]) AS u(name)
                           WHERE NOT EXISTS (
                               SELECT FROM notifyq.circuit_breakers b
                               WHERE b.task = u.name
                                 AND (b.state = 'open' AND b.opened_at + b.cooldown > now()
                                      OR b.state = 'half_open' AND EXISTS (
                                          SELECT FROM notifyq.jobs p  -- by primary key
                                          WHERE p.id = b.probe_job
                                            AND p.status = 'running' COLLATE "C"
                                            AND p.attempts = b.probe_attempt)))) AS t
               CROSS JOIN LATERAL (
                   SELECT FROM notifyq.jobs j
                   WHERE j.status = 'queued' AND j.queue = q.name AND j.task = t.name
                     AND j.run_at <= now()
                     AND NOT EXISTS (SELECT FROM notifyq.queue_pauses z  -- before any read
                                     WHERE z.queue = q.name AND z.task IN (t.name, '*'))
                   ORDER BY j.priority DESC, j.run_at, j.id  -- jobs_claim_idx's order
                   LIMIT 1) AS ready)
           AS ready,
       notifyq.rescue_due(%(claimant)s) AS rescue;

-- name: liveness_lock
-- The listener's connection takes this dispatcher's liveness lock for as long as
-- it lives (see notifyq.rescue_jobs): false while another session still holds it.
SELECT pg_try_advisory_lock(28274, hashtext(%(claimant)s)) AS locked;

-- name: set_appetite
-- This dispatcher's appetite for its queues (hungry, draining, or NULL: gone);
-- notifyq.set_appetite (schema.sql) says what inserts make of it.
SELECT notifyq.set_appetite(%(claimant)s, %(queues)s::text[], %(state)s::text,
                            make_interval(secs => %(ttl)s));

-- name: appetite_barrier
-- After turning hungry, before claiming again: wait (20 ms at most) for the
-- producer transactions that may have read this dispatcher's queues draining.
SELECT notifyq.appetite_barrier(%(queues)s::text[]) AS passed;

-- name: wakeups
-- Prometheus scrape: how many inserts notified, and how many skipped their
-- notification while every dispatcher of their queue was draining (the insert
-- trigger's counting sequences; the whole database, since the schema was made).
SELECT (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM notifyq.wakeups_sent) AS sent,
       (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM notifyq.wakeups_skipped)
           AS skipped;

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

-- name: migrate_guard
-- `notifyq schema sql --from N`: refuse, before anything changes, a database whose schema
-- is not at version N (0: no schema yet), which the script would break or fail on half-way.
-- Run after migrate_lock, so it sees what a concurrent migration committed.  A DO block
-- takes no parameters: migration_sql fills the script's versions in as text.
DO $$
DECLARE
    script_from constant int := %(after)s;
    script_to constant int := %(target)s;
    found int := 0;
BEGIN
    IF pg_catalog.to_regclass('notifyq.schema_version') IS NOT NULL THEN
        SELECT coalesce(max(version), 0) INTO found FROM notifyq.schema_version;
    END IF;
    IF found <> script_from THEN
        RAISE EXCEPTION 'notifyq: this script is for a database %, but this one %: stopping before any change',
            CASE script_from WHEN 0 THEN 'without the notifyq schema'
                 ELSE 'at notifyq schema version ' || script_from END,
            CASE found WHEN 0 THEN 'has no notifyq schema' ELSE 'is at version ' || found END
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = CASE
                  WHEN found = 0 THEN 'generate the script for it with: notifyq schema sql'
                  WHEN found = script_to THEN 'nothing to apply: it is at the version this script installs'
                  ELSE pg_catalog.format(
                      'generate the script for it with: notifyq schema sql --from %s', found)
              END;
    END IF;
END
$$;

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

-- name: register_dispatcher
-- Lease keeper: upsert this dispatcher's registry row with the jobs it holds, at
-- start, when what it says changed, and on every heartbeat while it does not
-- listen; the same statement deletes rows of dispatchers stopped or silent for a
-- day (skipping any row locked right now: the next write prunes it).  A silent
-- row whose liveness lock is held is an idle dispatcher that listens: kept.
-- tasks: the tasks it has handlers for, the only ones it claims (see unserved_jobs).
WITH stale AS MATERIALIZED (
    SELECT claimant
    FROM notifyq.dispatchers
    WHERE claimant <> %(claimant)s
      AND coalesce(stopped_at, greatest(heartbeat_at, alive_at)) < now() - interval '1 day'
      AND NOT (stopped_at IS NULL AND liveness_lock AND notifyq.liveness_held(claimant))
    FOR UPDATE SKIP LOCKED
), pruned AS (
    DELETE FROM notifyq.dispatchers d USING stale s WHERE d.claimant = s.claimant
)
INSERT INTO notifyq.dispatchers AS d
    (claimant, host, pid, queues, concurrency, running, heartbeat, liveness_lock, tasks)
VALUES (%(claimant)s, %(host)s, %(pid)s, %(queues)s::text[], %(concurrency)s, %(running)s,
        %(heartbeat)s, %(liveness_lock)s, %(tasks)s::text[])
ON CONFLICT (claimant) DO UPDATE
SET running = excluded.running, tasks = excluded.tasks, heartbeat_at = now();

-- name: dispatcher_stopped
-- Graceful exit: mark this dispatcher's registry row stopped, and forget its
-- appetite (a draining row would keep inserts from notifying until it expired).
WITH gone AS (
    DELETE FROM notifyq.queue_appetite WHERE claimant = %(claimant)s
)
UPDATE notifyq.dispatchers SET stopped_at = now(), running = 0 WHERE claimant = %(claimant)s;

-- name: watch_queues
-- notifyq watch/stats: per queue, notifyq.queue_health (schema.sql says what each
-- column counts and along which partial index; the function is inlined here, so
-- the plan is this statement's own).  %(queues)s NULL means every queue; %(tags)s,
-- when not NULL, counts only the jobs that have every one of them (watch --tag).
SELECT queue, ready, scheduled, running, succeeded_1m, failed_1m, dead, done_10s, p50, p95,
       oldest_ready, paused, paused_tasks
FROM notifyq.queue_health(%(queues)s::text[], %(tags)s::text[]);

-- name: monitor_failed_recent
-- The latest failed attempts (notifyq.failed_recent, along jobs_failed_idx).
SELECT id, queue, task, status, attempts, max_attempts, error, started_at, finished_at
FROM notifyq.failed_recent(make_interval(secs => %(within)s), %(limit)s);

-- name: monitor_stuck
-- Running jobs past their lease or running longer than %(seconds)s (notifyq.stuck,
-- along jobs_lease_idx).
SELECT id, queue, task, attempts, claimed_by, started_at, lease_expires_at,
       extract(epoch FROM running_for)::float8 AS running_for, lease_expired
FROM notifyq.stuck(make_interval(secs => %(seconds)s));

-- name: watch_failures
-- notifyq watch: the latest jobs whose last attempt failed (waiting for a retry,
-- or dead), newest first, along jobs_failed_idx (with every one of %(tags)s).
SELECT id, queue, task, attempts, status, split_part(last_error, E'\n', 1) AS error,
       extract(epoch FROM now() - started_at)::float8 AS age
FROM notifyq.jobs
WHERE last_error IS NOT NULL AND started_at IS NOT NULL AND status IN ('queued', 'dead')
  AND coalesce(queue = ANY(%(queues)s::text[]), true)
  AND (%(tags)s::text[] IS NULL OR tags @> %(tags)s::text[])
ORDER BY started_at DESC
LIMIT %(limit)s;

-- name: watch_running
-- notifyq watch: the jobs running longest, along jobs_lease_idx (running rows
-- only, at most the dispatchers' total concurrency), with who runs them and
-- how far their handlers say they are (with every one of %(tags)s).
SELECT id, queue, task, attempts, claimed_by,
       extract(epoch FROM now() - started_at)::float8 AS running_for,
       progress::float8, progress_message
FROM notifyq.jobs
WHERE status = 'running' AND coalesce(queue = ANY(%(queues)s::text[]), true)
  AND (%(tags)s::text[] IS NULL OR tags @> %(tags)s::text[])
ORDER BY started_at
LIMIT %(limit)s;

-- name: watch_dispatchers
-- notifyq watch: the dispatcher registry with each one's state (running, stopped, lost),
-- `notifyq serve` processes and SQL workers alike (kind).  running: its jobs running now,
-- counted in the jobs table along jobs_lease_idx (running rows only), as the queues'
-- running and the running jobs are; the registry's own count is as old as the last
-- heartbeat and contradicted them.
WITH running AS (
    SELECT claimed_by, count(*)::int AS running
    FROM notifyq.jobs
    WHERE status = 'running'
    GROUP BY claimed_by
)
SELECT d.claimant, d.host, d.pid, d.queues, d.concurrency, coalesce(r.running, 0) AS running,
       d.state,
       extract(epoch FROM now() - d.started_at)::float8 AS up,
       extract(epoch FROM now() - d.heartbeat_at)::float8 AS silent,
       d.kind
FROM notifyq.dispatcher_status d
LEFT JOIN running r ON r.claimed_by = d.claimant
ORDER BY d.state <> 'running', d.started_at;

-- name: wait_outcomes
-- App.wait: where the awaited jobs stand, by primary key (needs SELECT on jobs).
SELECT id, queue, status, result, last_error FROM notifyq.jobs WHERE id = ANY(%(ids)s::bigint[]);

-- name: wait_outcomes_by_token
-- App.wait of jobs whose tokens we hold: the same, through notifyq.job_status
-- (a producer role may; a wrong token reads as no job).
SELECT s.id, s.queue, s.status, s.result, s.last_error
FROM ROWS FROM (pg_catalog.unnest(%(ids)s::bigint[]), pg_catalog.unnest(%(tokens)s::uuid[]))
     AS w (id, token)
CROSS JOIN LATERAL notifyq.job_status(w.id, w.token) AS s;

-- name: job_status
-- App.status with the job's token: notifyq.job_status.
SELECT s.id, s.queue, s.task, s.status, s.attempts, s.max_attempts, s.progress,
       s.progress_message, s.result, s.last_error, s.run_at, s.created_at, s.started_at,
       s.finished_at
FROM notifyq.job_status(%(id)s, %(token)s::uuid) AS s;

-- name: job_status_by_id
-- App.status without a token: the same columns, read from the table (needs SELECT).
SELECT j.id, j.queue, j.task, j.status, j.attempts, j.max_attempts, j.progress,
       j.progress_message, j.result, j.last_error, j.run_at, j.created_at, j.started_at,
       j.finished_at
FROM notifyq.jobs j WHERE j.id = %(id)s;

-- name: task_record
-- A job as a framework's result API shows it (Django's get_result): JSON as text, so the
-- caller's connection decodes it the same whatever loaders it registered.
SELECT j.id, j.queue, j.task, j.status, j.priority, j.attempts, j.run_at, j.created_at,
       j.started_at, j.finished_at, j.claimed_by, j.payload::text AS payload_json,
       j.result::text AS result_json, j.last_error
FROM notifyq.jobs j WHERE j.id = %(id)s;

-- name: task_attempts
-- The same: every recorded status change of the job, oldest first, errors whole.
SELECT h.at, h.from_status, h.to_status, h.attempt, h.dispatcher, h.error
FROM notifyq.job_history h
WHERE h.job_id = %(id)s
ORDER BY h.id;

-- name: jobs_list
-- notifyq jobs list: the newest jobs, optionally of one queue, task and status, and
-- with every one of %(tags)s (jobs_tags_idx, when the tags are rare enough).
SELECT id, queue, task, status, attempts, max_attempts, priority, run_at, created_at,
       finished_at, split_part(last_error, E'\n', 1) AS error, tags
FROM notifyq.jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(task)s::text IS NULL OR task = %(task)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(tags)s::text[] IS NULL OR tags @> %(tags)s::text[])
ORDER BY id DESC
LIMIT %(limit)s;

-- name: job_show
-- notifyq jobs show: every column of one job.
SELECT id, queue, task, status, priority, attempts, max_attempts, dedupe_key, run_at,
       created_at, started_at, finished_at, claimed_by, lease_expires_at, depends_on,
       on_dependency_failure, rate_key, rate_reserved, progress, progress_message, payload,
       checkpoint, result, last_error, trace_context, tags
FROM notifyq.jobs
WHERE id = %(id)s;

-- name: retry_job
-- notifyq retry ID: the SQL function; returns the status the job had.
SELECT notifyq.retry_job(%(id)s);

-- name: retry_dead
-- notifyq retry --dead: the SQL function; returns how many jobs were re-queued.
SELECT notifyq.retry_dead(%(queue)s, %(task)s, %(tags)s::text[]);

-- name: cancel_job
-- notifyq cancel ID: the SQL function; returns the status the job had.
SELECT notifyq.cancel_job(%(id)s);

-- name: cancel_jobs
-- notifyq cancel --tag: the SQL function; returns how many jobs were cancelled.
SELECT notifyq.cancel_jobs(%(tags)s::text[], %(queue)s, %(task)s);

-- name: purge
-- notifyq purge: the SQL function; returns how many jobs were deleted.
SELECT notifyq.purge(make_interval(secs => %(seconds)s), %(statuses)s::text[],
                     %(tags)s::text[]);

-- name: purge_batch
-- notifyq serve's retention: one batch of the SQL function, in its own transaction,
-- for the statuses kept equally long.  next_in: seconds until a row still here may
-- be old enough, from the oldest finished row younger than the cutoff, of any
-- status (one probe of jobs_finished_idx; never later than the truth); NULL: none,
-- so nothing can be due before a job finishing now would be.
SELECT notifyq.purge_batch(make_interval(secs => %(seconds)s), %(statuses)s::text[],
                           %(limit)s) AS deleted,
       extract(epoch FROM (SELECT j.finished_at FROM notifyq.jobs j
                           WHERE j.status IN ('succeeded', 'dead', 'cancelled')
                             AND j.finished_at >= now() - make_interval(secs => %(seconds)s)
                           ORDER BY j.finished_at
                           LIMIT 1)
                          + make_interval(secs => %(seconds)s) - now())::float8 AS next_in;

-- name: set_history
-- notifyq history on|off: the SQL function.
SELECT notifyq.set_history(%(enabled)s);

-- name: history_enabled
-- notifyq history: whether the history triggers fire (tgenabled 'D' is disabled).
SELECT bool_and(tgenabled <> 'D') FROM pg_catalog.pg_trigger
WHERE tgrelid = 'notifyq.jobs'::pg_catalog.regclass
  AND tgname IN ('jobs_history_inserted', 'jobs_history_changed');

-- name: job_history
-- notifyq jobs show: every recorded status change of one job, oldest first.
SELECT at, from_status, to_status, attempt, dispatcher, split_part(error, E'\n', 1) AS error
FROM notifyq.job_history
WHERE job_id = %(id)s
ORDER BY id;

-- name: queue_limits
-- notifyq limit: every cap, with how many of the queue's jobs run now.
SELECT l.queue, l.max_running,
       (SELECT count(*) FROM notifyq.jobs j WHERE j.status = 'running' AND j.queue = l.queue)
           AS running
FROM notifyq.queue_limits l
ORDER BY l.queue;

-- name: set_queue_limit
-- notifyq limit QUEUE N: set (or change) a queue's cap.
INSERT INTO notifyq.queue_limits (queue, max_running) VALUES (%(queue)s, %(max_running)s)
ON CONFLICT (queue) DO UPDATE SET max_running = excluded.max_running
RETURNING queue;

-- name: clear_queue_limit
-- notifyq limit QUEUE none: lift a queue's cap.
DELETE FROM notifyq.queue_limits WHERE queue = %(queue)s RETURNING queue;

-- name: circuit_breakers
-- notifyq breaker list, watch, health and the metrics: every circuit breaker, with
-- the seconds until an open one's cool-down ends (0: over, the next claim probes)
-- and the failures its current window has counted (0 once the window passed).
SELECT b.task, b.state, b.failures,
       extract(epoch FROM b.failure_window)::float8 AS window_seconds,
       extract(epoch FROM b.cooldown)::float8 AS cooldown_seconds,
       CASE WHEN b.state = 'closed' AND b.failed_since > now() - b.failure_window
            THEN b.failed ELSE 0 END AS failed,
       b.opened_at,
       CASE WHEN b.state = 'open'
            THEN greatest(extract(epoch FROM b.opened_at + b.cooldown - now()), 0)::float8
       END AS reopen_in,
       b.probe_job, b.opens
FROM notifyq.circuit_breakers b
ORDER BY b.task;

-- name: set_circuit_breaker
-- notifyq breaker set TASK: the SQL function.
SELECT notifyq.set_circuit_breaker(%(task)s, %(failures)s, make_interval(secs => %(window)s),
                                   make_interval(secs => %(cooldown)s));

-- name: reset_circuit_breaker
-- notifyq breaker reset TASK, App.reset_circuit_breaker: the SQL function; the state it had.
SELECT notifyq.reset_circuit_breaker(%(task)s);

-- name: remove_circuit_breaker
-- notifyq breaker remove TASK: the task has no breaker any more.
DELETE FROM notifyq.circuit_breakers WHERE task = %(task)s RETURNING task;

-- name: pause_queue
-- notifyq pause QUEUE [--task TASK]: the SQL function; false if it was paused already.
SELECT notifyq.pause_queue(%(queue)s, %(task)s);

-- name: resume_queue
-- notifyq resume QUEUE [--task TASK]: the SQL function; false if it was not paused.
SELECT notifyq.resume_queue(%(queue)s, %(task)s);

-- name: queue_pauses
-- notifyq pause, health and the metrics: every pause (task '*': the whole queue), with
-- how many of its jobs are ready now, counted up to 10,000 along jobs_claim_idx (more
-- says there are more).
SELECT p.queue, p.task, p.paused_at,
       extract(epoch FROM now() - p.paused_at)::float8 AS paused_for,
       least(c.ready, 10000) AS ready, c.ready > 10000 AS more
FROM notifyq.queue_pauses p
CROSS JOIN LATERAL (
    SELECT count(*) AS ready
    FROM (SELECT FROM notifyq.jobs j
          WHERE j.status = 'queued' AND j.queue = p.queue
            AND (p.task = '*' OR j.task = p.task) AND j.run_at <= now()
          LIMIT 10001) AS k
) AS c
ORDER BY p.queue, p.task;

-- name: set_events
-- notifyq events on|off QUEUE: the SQL function.
SELECT notifyq.set_events(%(queue)s, %(enabled)s);

-- name: queue_events
-- notifyq events: the queues whose jobs announce their changes on notifyq_events.
SELECT queue, enabled_at FROM notifyq.queue_events ORDER BY queue;

-- name: metrics_depth
-- Prometheus scrape: queued jobs per queue, ready and scheduled (jobs_claim_idx only).
SELECT queue, count(*) FILTER (WHERE run_at <= now()) AS ready,
       count(*) FILTER (WHERE run_at > now()) AS scheduled
FROM notifyq.jobs
WHERE status = 'queued'
GROUP BY queue;

-- name: metrics_waits
-- Prometheus scrape: enqueue-to-start wait of attempts this dispatcher started, by
-- primary key; a job queued again since (a retry) no longer has its start's run_at.
SELECT queue, task, extract(epoch FROM started_at - run_at)::float8 AS wait
FROM notifyq.jobs
WHERE id = ANY(%(ids)s::bigint[]) AND status <> 'queued' AND started_at >= run_at;

-- name: unserved_jobs
-- notifyq health, watch and the metrics: ready jobs that no live dispatcher
-- (notifyq.dispatcher_status, state running) would claim, per (queue, task):
-- nobody serves the queue (served false), or nobody serving it has a handler
-- for the task.  A dispatcher whose tasks is NULL (from before schema version 8)
-- claims any task.  Such jobs stay queued until a dispatcher that runs them
-- starts.  The (queue, task) pairs come from a loose scan of jobs_claim_idx (one
-- probe per pair, however many jobs), and only unserved pairs' jobs are counted.
-- %(queues)s NULL means every queue.
WITH RECURSIVE pairs AS (
    (SELECT j.queue, j.task
     FROM notifyq.jobs j
     WHERE j.status = 'queued'
     ORDER BY j.queue, j.task
     LIMIT 1)
    UNION ALL
    SELECT n.queue, n.task
    FROM pairs p
    CROSS JOIN LATERAL (
        SELECT j.queue, j.task
        FROM notifyq.jobs j
        WHERE j.status = 'queued' AND (j.queue, j.task) > (p.queue, p.task)
        ORDER BY j.queue, j.task
        LIMIT 1
    ) AS n
), live AS MATERIALIZED (
    SELECT d.queues, d.tasks FROM notifyq.dispatcher_status d WHERE d.state = 'running'
), unserved AS MATERIALIZED (  -- before counting: a served pair's jobs are never counted
    SELECT p.queue, p.task, EXISTS (SELECT FROM live d WHERE p.queue = ANY(d.queues)) AS served
    FROM pairs p
    WHERE coalesce(p.queue = ANY(%(queues)s::text[]), true)
      AND NOT EXISTS (SELECT FROM live d
                      WHERE p.queue = ANY(d.queues)
                        AND (d.tasks IS NULL OR p.task = ANY(d.tasks)))
)
SELECT u.queue, u.task, least(c.jobs, 10000) AS jobs, c.oldest, u.served, c.jobs > 10000 AS more
FROM unserved u
CROSS JOIN LATERAL (
    -- Counted up to 10,000 (more says there are more): a million unserved jobs must not
    -- cost every watch refresh, health check and scrape a scan of them.
    SELECT (SELECT count(*) FROM (SELECT FROM notifyq.jobs j
                                  WHERE j.status = 'queued' AND j.queue = u.queue
                                    AND j.task = u.task AND j.run_at <= now()
                                  LIMIT 10001) AS k) AS jobs,
           (SELECT extract(epoch FROM now() - j.run_at)::float8
            FROM notifyq.jobs j
            WHERE j.status = 'queued' AND j.queue = u.queue AND j.task = u.task
              AND j.run_at <= now()
            ORDER BY j.run_at
            LIMIT 1) AS oldest
) AS c
WHERE c.jobs > 0
ORDER BY u.queue, u.task;

-- name: health_lost_dispatchers
-- notifyq health: dispatchers whose heartbeat stopped without a graceful exit.
SELECT count(*) AS lost,
       coalesce(string_agg(host || ':' || pid, ', ' ORDER BY heartbeat_at), '') AS which
FROM notifyq.dispatcher_status
WHERE state = 'lost';

-- name: periodic_define
-- Create or update a schedule the app defines in Python (at dispatcher start).
-- An operator's `paused` and the progress (`last_instant`) are kept; `defined_at`
-- moves only when the schedule or its zone changes, so instants of the new
-- schedule from before the change are never due.  Unchanged rows are not written
-- (and not returned).
INSERT INTO notifyq.periodic AS p
    (name, task, schedule, timezone, missed, queue, payload, priority, max_attempts)
VALUES (%(name)s, %(task)s, %(schedule)s, %(timezone)s, %(missed)s, %(queue)s,
        %(payload)s::pg_catalog.jsonb, %(priority)s, %(max_attempts)s)
ON CONFLICT (name) DO UPDATE
SET task = excluded.task,
    schedule = excluded.schedule,
    timezone = excluded.timezone,
    missed = excluded.missed,
    queue = excluded.queue,
    payload = excluded.payload,
    priority = excluded.priority,
    max_attempts = excluded.max_attempts,
    defined_at = CASE WHEN (p.schedule, p.timezone) IS DISTINCT FROM
                           (excluded.schedule, excluded.timezone)
                      THEN now() ELSE p.defined_at END
WHERE (p.task, p.schedule, p.timezone, p.missed, p.queue, p.payload, p.priority,
       p.max_attempts)
      IS DISTINCT FROM
      (excluded.task, excluded.schedule, excluded.timezone, excluded.missed, excluded.queue,
       excluded.payload, excluded.priority, excluded.max_attempts)
RETURNING p.name;

-- name: periodic_schedules
-- The scheduler's view: every schedule not paused, with the instant after which
-- its next one is due, and the database clock's now() (one row with NULLs when
-- there is no schedule, so the clock is read all the same).
SELECT now() AS now, p.name, p.schedule, p.timezone,
       greatest(p.last_instant, p.defined_at) AS since
FROM (VALUES (1)) AS clock (one)
LEFT JOIN notifyq.periodic p ON NOT p.paused
ORDER BY p.name;

-- name: periodic_fire
-- Deal with instant %(instant)s of one schedule, at most once whoever asks.
-- The conditional UPDATE moves last_instant forward only past it: of two
-- dispatchers racing for one instant, the second waits on the row lock, then
-- re-reads the committed row, finds last_instant no longer before the instant
-- and updates nothing, so it inserts nothing (the job is inserted by the same
-- statement, in the same transaction).  The database clock decides that the
-- instant is due, and the row must still hold the schedule and zone the
-- instant was computed from.  An instant reached more than %(grace)s seconds
-- late was missed (downtime, a pause): with missed = 'skip' it is recorded
-- without a job.  One row back when this call dealt with it: whether a job was
-- enqueued, and its id.
WITH fired AS (
    UPDATE notifyq.periodic p
    SET last_instant = %(instant)s
    WHERE p.name = %(name)s
      AND p.schedule = %(schedule)s
      AND p.timezone = %(timezone)s
      AND NOT p.paused
      AND %(instant)s <= now()
      AND %(instant)s > greatest(p.last_instant, p.defined_at)
    RETURNING p.task, p.queue, p.payload, p.priority, p.max_attempts,
              p.missed = 'once'
                  OR now() - %(instant)s <= make_interval(secs => %(grace)s) AS enqueue
), job AS (
    INSERT INTO notifyq.jobs (queue, task, payload, priority, run_at, max_attempts)
    SELECT f.queue, f.task,
           f.payload || pg_catalog.jsonb_build_object('instant', %(instant_text)s::text),
           f.priority, %(instant)s, f.max_attempts
    FROM fired f
    WHERE f.enqueue
    RETURNING id
)
SELECT f.enqueue, (SELECT id FROM job) AS job_id
FROM fired f;

-- name: testing_jobs
-- notifyq.testing: every job, or those of %(ids)s, in enqueue order (job_show's columns).
SELECT id, queue, task, status, priority, attempts, max_attempts, dedupe_key, run_at,
       created_at, started_at, finished_at, claimed_by, lease_expires_at, depends_on,
       on_dependency_failure, rate_key, rate_reserved, progress, progress_message, payload,
       checkpoint, result, last_error, trace_context, tags
FROM notifyq.jobs
WHERE %(ids)s::bigint[] IS NULL OR id = ANY (%(ids)s::bigint[])
ORDER BY id;

-- name: testing_reset
-- notifyq.testing: the clean state of a test, every notifyq table but schema_version
-- emptied and identities from 1 again.  Found in the catalog, so a table a later
-- migration adds is emptied too.  DELETE, not TRUNCATE: on a test's few rows it is over
-- ten times faster (TRUNCATE makes new files for every table and its indexes), and a
-- database per test slower still (benchmarks/test_isolation.py).
DO $reset$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT c.oid::regclass AS name FROM pg_catalog.pg_class c
        WHERE c.relnamespace = 'notifyq'::regnamespace AND c.relkind IN ('r', 'p')
          AND c.relname <> 'schema_version'
    LOOP
        EXECUTE 'DELETE FROM ' || t.name::text;
    END LOOP;
    FOR t IN
        SELECT a.attrelid::regclass::text AS tab, a.attname::text AS col
        FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
        WHERE c.relnamespace = 'notifyq'::regnamespace AND a.attidentity <> ''
    LOOP
        PERFORM pg_catalog.setval(pg_catalog.pg_get_serial_sequence(t.tab, t.col), 1, false);
    END LOOP;
END
$reset$;

-- name: testing_advance
-- notifyq.testing's clock: %(seconds)s pass for what the database keeps time of.  Every
-- timestamp of the jobs that are not running moves back by that much (run_at included:
-- delayed jobs and retries come due), so do the rate limits' slots, the history and
-- the unique_for windows (they end);
-- leases, dispatchers and periodic schedules keep the real clock.  How many jobs moved.
WITH shift AS (
    SELECT pg_catalog.make_interval(secs => %(seconds)s) AS by
), jobs AS (
    UPDATE notifyq.jobs j
    SET run_at = j.run_at - s.by, created_at = j.created_at - s.by,
        started_at = j.started_at - s.by, finished_at = j.finished_at - s.by
    FROM shift s
    WHERE j.status <> 'running'
    RETURNING j.id
), rates AS (
    UPDATE notifyq.rate_state r SET tat = r.tat - s.by FROM shift s RETURNING r.rate_key
), history AS (
    UPDATE notifyq.job_history h SET at = h.at - s.by FROM shift s RETURNING h.id
), windows AS (
    UPDATE notifyq.unique_windows w SET expires_at = w.expires_at - s.by FROM shift s
    RETURNING w.dedupe_key
)
-- Every data-modifying CTE runs once, whether or not the query reads it.
SELECT count(*) FROM jobs;

-- name: testing_retries_due
-- notifyq.testing's drain: the jobs of %(tasks)s in %(queues)s that wait out a retry's
-- backoff (attempted before, queued for later) are due now.  Jobs never attempted keep
-- their run_at (a delay is the clock's business), and so do a rate limit's slots.
UPDATE notifyq.jobs
SET run_at = now()
WHERE status = 'queued' AND attempts > 0 AND run_at > now() AND NOT rate_reserved
  AND queue = ANY (%(queues)s::text[]) AND task = ANY (%(tasks)s::text[])
RETURNING id;

-- name: testing_busy
-- notifyq.testing's drain: is a job of %(tasks)s in %(queues)s due now, or running?
-- A rate limit's slot counts once it is due, not before (a drain does not wait for it).
-- A paused one (notifyq.queue_pauses) does not: no claim starts it, so the drain ends
-- with it queued, as `serve --until-empty` does.
SELECT EXISTS (
    SELECT FROM notifyq.jobs j
    WHERE j.queue = ANY (%(queues)s::text[]) AND j.task = ANY (%(tasks)s::text[])
      AND (j.status = 'running'
           OR (j.status = 'queued' AND j.run_at <= now()
               AND NOT EXISTS (SELECT FROM notifyq.queue_pauses z
                               WHERE z.queue = j.queue AND z.task IN (j.task, '*')))));

-- name: webhook_claim
-- Claim up to %(limit)s due completion webhooks (notifyq.webhook_deliveries) along
-- webhook_deliveries_due_idx.  SKIP LOCKED: dispatchers claiming at once share the
-- rows; the claim moves next_at %(lease)s seconds ahead, so another claims the row
-- only if this one has neither delivered it nor rescheduled it by then (the lease
-- outlasts a request's timeout).  The CTE keeps the LIMIT to the locked rows.
-- allowed: the URL still starts with a prefix of notifyq.webhook_allowlist (a
-- prefix removed since the job was enqueued stops its deliveries), with the
-- prefix's signing secret name.
WITH due AS (
    SELECT d.id
    FROM notifyq.webhook_deliveries d
    WHERE d.status = 'pending' AND d.next_at <= now()
    ORDER BY d.next_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE notifyq.webhook_deliveries d
SET attempts = d.attempts + 1, next_at = now() + make_interval(secs => %(lease)s)
FROM due
WHERE d.id = due.id
RETURNING d.id, d.job_id, d.url, d.body::text AS body, d.attempts,
          (SELECT a.secret FROM notifyq.webhook_allowlist a
           WHERE starts_with(d.url, a.prefix) ORDER BY length(a.prefix) DESC LIMIT 1) AS secret,
          EXISTS (SELECT FROM notifyq.webhook_allowlist a WHERE starts_with(d.url, a.prefix))
              AS allowed;

-- name: webhook_next_due
-- Seconds until the next pending webhook is due (NULL: none), one probe of
-- webhook_deliveries_due_idx: how long the sender may wait when nothing is due.
SELECT extract(epoch FROM min(next_at) - now())::float8 AS seconds
FROM notifyq.webhook_deliveries
WHERE status = 'pending';

-- name: webhook_settle
-- Write the outcomes of claimed deliveries, fenced by the attempt claimed (a row
-- claimed again after our lease ran out is not ours to settle): delivered; or
-- failed with %(errors)s and due again after %(retry_in)s seconds, or given up
-- (status failed) when retry_in is NULL.
UPDATE notifyq.webhook_deliveries d
SET status = CASE WHEN o.delivered THEN 'delivered'
                  WHEN o.retry_in IS NULL THEN 'failed' ELSE 'pending' END,
    delivered_at = CASE WHEN o.delivered THEN now() END,
    last_error = CASE WHEN o.delivered THEN d.last_error ELSE o.error END,
    next_at = CASE WHEN o.retry_in IS NULL THEN d.next_at
                   ELSE now() + make_interval(secs => o.retry_in) END
FROM ROWS FROM (unnest(%(ids)s::bigint[]), unnest(%(attempts)s::integer[]),
                unnest(%(delivered)s::boolean[]), unnest(%(errors)s::text[]),
                unnest(%(retry_in)s::float8[]))
     AS o (id, attempt, delivered, error, retry_in)
WHERE d.id = o.id AND d.attempts = o.attempt AND d.status = 'pending'
RETURNING d.id;

-- name: web_jobs
-- notifyq web's job search: the newest jobs matching every filter given (NULL: any),
-- walking the primary key backwards and stopping at %(limit)s, like jobs_list; the
-- time range is on created_at; the payload filter compares one top-level key's value
-- as text (so 42 matches "42"), never builds a path or an expression from the input.
SELECT id, queue, task, status, attempts, max_attempts, priority, run_at, created_at,
       finished_at, split_part(last_error, E'\n', 1) AS error, tags
FROM notifyq.jobs
WHERE (%(id)s::bigint IS NULL OR id = %(id)s::bigint)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(task)s::text IS NULL OR task = %(task)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
  AND (%(key)s::text IS NULL OR payload ->> %(key)s::text = %(value)s::text)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: web_periodic
-- notifyq web's schedules page: every periodic schedule, paused ones too, with the
-- instant after which its next one is due and the database clock's now().
SELECT now() AS now, name, task, queue, schedule, timezone, missed, paused,
       last_instant, greatest(last_instant, defined_at) AS since
FROM notifyq.periodic
ORDER BY name;
