-- notifyq roles: two NOLOGIN group roles with least privilege on the notifyq schema.
--
-- `notifyq roles` runs this in one transaction; `notifyq roles --print` prints it
-- with the role names filled in, for a DBA to read and run by hand:
--
--     notifyq roles --print > roles.sql && psql -1 -v ON_ERROR_STOP=1 -f roles.sql "$DSN"
--
-- In this file the role names are placeholders in braces that notifyq fills in
-- (producer and worker as quoted identifiers, producer_name and worker_name as
-- string literals; defaults notifyq_producer, notifyq_worker).  Roles belong to the
-- whole cluster, GRANTs to one database: run this in every database that has the
-- notifyq schema, and again after `notifyq migrate` upgrades it.  Running it
-- twice changes nothing.  Existing roles are kept as they are (LOGIN or not);
-- their privileges on the notifyq schema are reset to exactly those below.
--
-- Give people and programs LOGIN roles of their own that are members of these:
--
--     CREATE ROLE billing_app LOGIN PASSWORD '...' IN ROLE notifyq_producer;
--     CREATE ROLE dispatcher LOGIN PASSWORD '...' IN ROLE notifyq_worker;
--
-- The owner of the schema (whoever ran `notifyq migrate`) keeps every DDL right,
-- and alone may run the admin functions (notifyq.retry_job, cancel_job, ...)
-- unless it grants EXECUTE on them to an operator role.

-- Create a role unless it exists.  A temporary function, so the names arrive as
-- literals outside any quoted body; two runs at once both succeed.
CREATE OR REPLACE FUNCTION pg_temp.notifyq_create_role(role_name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = role_name) THEN
        EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', role_name);
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created meanwhile by a concurrent run
END
$$;

SELECT pg_temp.notifyq_create_role({producer_name});
SELECT pg_temp.notifyq_create_role({worker_name});

-- Start from nothing on the notifyq schema, so the result is exact whatever was granted before.
REVOKE ALL ON ALL TABLES IN SCHEMA notifyq FROM {producer}, {worker};
REVOKE ALL ON ALL SEQUENCES IN SCHEMA notifyq FROM {producer}, {worker};
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA notifyq FROM {producer}, {worker};
REVOKE ALL ON SCHEMA notifyq FROM {producer}, {worker};

-- The producer enqueues: INSERT of the public columns only, and SELECT of id for
-- `RETURNING id` (with dedupe_key and status, to find the job holding a key).
-- It cannot set status, attempts, claimed_by, lease_expires_at, last_error,
-- result or the timestamps, nor read payloads, results or tokens.  The identity
-- column needs no grant on its sequence.  The notification triggers fire for it
-- without EXECUTE on their functions; the history and events triggers run as the
-- owner.  It may give a job its token (a random UUID it keeps) and read that job,
-- and only that job, through notifyq.job_status with it (App.status, App.wait):
-- SELECT on the token column would show it every job's token, so it has none.
GRANT USAGE ON SCHEMA notifyq TO {producer};
GRANT INSERT (queue, task, payload, priority, run_at, max_attempts, dedupe_key, depends_on,
    on_dependency_failure, rate_key, token, trace_context, tags, unique_for, on_duplicate, callback_url)
    ON notifyq.jobs TO {producer};
GRANT SELECT (id, dedupe_key, status) ON notifyq.jobs TO {producer};
-- The job whose unique_for window refused an INSERT, by its key.
GRANT SELECT (dedupe_key, job_id, expires_at) ON notifyq.unique_windows TO {producer};
GRANT EXECUTE ON FUNCTION notifyq.job_status(bigint, uuid) TO {producer};

-- The worker runs `notifyq serve`: claims, completions, leases and rescue (SELECT,
-- UPDATE on jobs), its row in the dispatcher registry, the periodic schedules
-- (its app's definitions, and advancing them as it enqueues), the schema version
-- check, the monitoring views; the status history; the concurrency caps, pauses
-- and rate limits (read by every claim through notifyq.claim_room and rate_admit);
-- retention (notifyq.purge_batch, which deletes as the owner, finished jobs
-- only); and, as a member of the producer role, enqueues from handlers.  No DELETE on jobs (whole purges are
-- the owner's), no DDL.
GRANT USAGE ON SCHEMA notifyq TO {worker};
GRANT SELECT, UPDATE ON notifyq.jobs TO {worker};
GRANT SELECT ON notifyq.job_history TO {worker};
GRANT EXECUTE ON FUNCTION notifyq.purge_batch(interval, text[], integer) TO {worker};
-- Retention deletes the unique_for windows that ended (as the owner: the windows only).
GRANT EXECUTE ON FUNCTION notifyq.expire_unique_windows(integer) TO {worker};
-- A handler reads the results of the jobs its job depends on (with its own SELECT).
GRANT EXECUTE ON FUNCTION notifyq.dependency_results(bigint) TO {worker};
GRANT SELECT ON notifyq.queue_limits, notifyq.queue_pauses TO {worker};
GRANT EXECUTE ON FUNCTION notifyq.claim_room(text, integer) TO {worker};
GRANT SELECT ON notifyq.rate_limits TO {worker};
GRANT SELECT, INSERT, UPDATE ON notifyq.rate_state TO {worker};
GRANT EXECUTE ON FUNCTION notifyq.rate_admit(bigint[], text[]) TO {worker};
GRANT SELECT, INSERT, UPDATE, DELETE ON notifyq.dispatchers TO {worker};
-- Rescue: the jobs of dispatchers whose session ended, or whose leases expired.
GRANT EXECUTE ON FUNCTION notifyq.rescue_jobs(text, interval, interval, boolean, integer) TO {worker};
-- Liveness seen in pg_locks: the registry's state (dispatcher_status, pruning) and the
-- listener's upkeep, which asks whether a sweep would find anything.
GRANT EXECUTE ON FUNCTION notifyq.liveness_held(text), notifyq.rescue_due(text) TO {worker};
-- Periodic jobs: each dispatcher defines its app's schedules and advances them.
GRANT SELECT, INSERT, UPDATE ON notifyq.periodic TO {worker};
GRANT SELECT ON notifyq.schema_version, notifyq.queue_stats, notifyq.dispatcher_status
    TO {worker};
-- The monitoring functions (SELECT * FROM notifyq.queue_health(), failed_recent(), stuck()):
-- they read with the caller's rights, which the grants above give.  A monitoring-only
-- role needs USAGE on the schema, SELECT on notifyq.jobs and notifyq.queue_pauses, and these.
GRANT EXECUTE ON FUNCTION notifyq.queue_health(text[], text[]),
    notifyq.failed_recent(interval, integer), notifyq.stuck(interval) TO {worker};
-- The SQL worker protocol (notifyq.claim, heartbeat, complete, fail, ...), which
-- `notifyq serve` runs too, and the per-task settings it reads and its app keeps.
GRANT SELECT, INSERT, UPDATE ON notifyq.tasks TO {worker};
-- Circuit breakers: every claim reads them and may start a probe, every completion
-- counts failures; a dispatcher writes its app's @app.task(circuit_breaker=...).
GRANT SELECT, INSERT, UPDATE ON notifyq.circuit_breakers TO {worker};
GRANT EXECUTE ON FUNCTION
    notifyq.backoff_delay(integer, float8, float8, float8),
    notifyq.claim_jobs(text, text[], text[], integer, interval),
    notifyq.finish_jobs(text, bigint[], integer[], text[], jsonb[], text[], float8[], real[],
                        text[], boolean),
    notifyq.hand_back_jobs(text, bigint[], integer[], boolean),
    notifyq.worker_seen(text, text[], text[], integer, interval, integer),
    notifyq.claim(text, text[], integer, interval, text[]),
    notifyq.heartbeat(text, bigint[], interval),
    notifyq.complete(bigint, text, jsonb, integer),
    notifyq.fail(bigint, text, text, boolean, interval, integer),
    notifyq.progress(bigint, text, real, text, jsonb, integer),
    notifyq.hold_session(text),
    notifyq.rescue(text, boolean),
    notifyq.hand_back(text, bigint[]),
    notifyq.stop_worker(text)
    TO {worker};
-- HTTP endpoints (notifyq.endpoints): read, never written.  Whoever writes that table
-- chooses the addresses dispatchers POST to (server-side request forgery), so only the
-- owner does, or an admin role it names:
--     GRANT SELECT, INSERT, UPDATE, DELETE ON notifyq.endpoints TO notifyq_admin;
GRANT SELECT ON notifyq.endpoints TO {worker};
-- Completion webhooks: the allow-list is read (at delivery, again), never written, for
-- the same reason; the outbox is claimed and marked, never filled (a trigger does that).
--     GRANT SELECT, INSERT, UPDATE, DELETE ON notifyq.webhook_allowlist TO notifyq_admin;
GRANT SELECT ON notifyq.webhook_allowlist TO {worker};
-- UPDATE of the delivery's state only: a worker must not rewrite url or body, which
-- the allow-list's trigger checked at the job's insert.
GRANT SELECT, UPDATE (status, attempts, next_at, last_error, delivered_at) ON notifyq.webhook_deliveries TO {worker};
-- Appetite (notifyq.queue_appetite): each dispatcher states whether it waits for
-- notifications; its metrics read the insert trigger's counts.
GRANT SELECT, INSERT, UPDATE, DELETE ON notifyq.queue_appetite TO {worker};
GRANT EXECUTE ON FUNCTION notifyq.set_appetite(text, text[], text, interval),
    notifyq.appetite_barrier(text[]) TO {worker};
GRANT SELECT ON SEQUENCE notifyq.wakeups_sent, notifyq.wakeups_skipped TO {worker};
GRANT {producer} TO {worker};
