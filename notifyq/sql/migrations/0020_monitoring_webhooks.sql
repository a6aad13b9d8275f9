-- Schema version 20: monitoring functions for people who query rather than click
-- (notifyq.queue_health, notifyq.failed_recent, notifyq.stuck), and completion
-- webhooks (jobs.callback_url, the owner's notifyq.webhook_allowlist, the outbox
-- notifyq.webhook_deliveries that `notifyq serve` delivers from).  New objects
-- only: no existing function changes.  schema.sql holds the same objects for new
-- databases.

-- ---------------------------------------------------------------------------
-- Monitoring
--
-- Plain SQL functions, STABLE, without SET or SECURITY DEFINER: PostgreSQL inlines
-- them into the calling query, so a caller's filter and EXPLAIN see the statement
-- itself, and each reads notifyq.jobs along a partial index only (never the
-- finished rows as a whole).  They run with the caller's rights: SELECT on
-- notifyq.jobs and notifyq.queue_pauses (the worker role has both).

-- Per queue: ready, scheduled and the oldest ready job's age in seconds
-- (jobs_claim_idx), running (jobs_lease_idx), dead (jobs_dead_idx), succeeded in
-- the last minute and finished (not cancelled) in the last 10 s
-- (jobs_finished_idx), jobs whose last attempt failed in the last minute
-- (jobs_failed_idx), enqueue-to-start waits p50/p95 in seconds over the latest
-- 2,000 starts of the last minute, and pauses (notifyq.queue_pauses).  queues
-- NULL: every queue; tags: only the jobs that have every one of them.  `notifyq
-- watch` reads the same function.
CREATE OR REPLACE FUNCTION notifyq.queue_health(queues text[] DEFAULT NULL, tags text[] DEFAULT NULL)
RETURNS TABLE (queue text, ready bigint, scheduled bigint, running bigint, succeeded_1m bigint,
               failed_1m bigint, dead bigint, done_10s bigint, p50 float8, p95 float8,
               oldest_ready float8, paused boolean, paused_tasks text[])
LANGUAGE sql STABLE
AS $$
WITH queued AS (
    SELECT j.queue,
           count(*) FILTER (WHERE j.run_at <= now()) AS ready,
           count(*) FILTER (WHERE j.run_at > now()) AS scheduled,
           extract(epoch FROM now() - min(j.run_at) FILTER (WHERE j.run_at <= now()))::float8
               AS oldest_ready
    FROM notifyq.jobs j
    WHERE j.status = 'queued' AND coalesce(j.queue = ANY(queue_health.queues), true)
      AND (queue_health.tags IS NULL OR j.tags @> queue_health.tags)
    GROUP BY j.queue
), running AS (
    SELECT j.queue, count(*) AS running
    FROM notifyq.jobs j
    WHERE j.status = 'running' AND coalesce(j.queue = ANY(queue_health.queues), true)
      AND (queue_health.tags IS NULL OR j.tags @> queue_health.tags)
    GROUP BY j.queue
), dead AS (
    SELECT j.queue, count(*) AS dead
    FROM notifyq.jobs j
    WHERE j.status = 'dead' AND coalesce(j.queue = ANY(queue_health.queues), true)
      AND (queue_health.tags IS NULL OR j.tags @> queue_health.tags)
    GROUP BY j.queue
), finished AS (
    SELECT j.queue,
           count(*) FILTER (WHERE j.status = 'succeeded') AS succeeded_1m,
           count(*) FILTER (WHERE j.status <> 'cancelled'
                              AND j.finished_at > now() - interval '10 seconds') AS done_10s
    FROM notifyq.jobs j
    WHERE j.status IN ('succeeded', 'dead', 'cancelled')
      AND j.finished_at > now() - interval '1 minute'
      AND coalesce(j.queue = ANY(queue_health.queues), true)
      AND (queue_health.tags IS NULL OR j.tags @> queue_health.tags)
    GROUP BY j.queue
), failed AS (
    SELECT j.queue, count(*) AS failed_1m
    FROM notifyq.jobs j
    WHERE j.last_error IS NOT NULL AND j.started_at > now() - interval '1 minute'
      AND j.status IN ('queued', 'dead') AND coalesce(j.queue = ANY(queue_health.queues), true)
      AND (queue_health.tags IS NULL OR j.tags @> queue_health.tags)
    GROUP BY j.queue
), starts AS (
    (SELECT j.queue, j.started_at - j.run_at AS wait
     FROM notifyq.jobs j
     WHERE j.status IN ('succeeded', 'dead') AND j.finished_at > now() - interval '1 minute'
       AND j.started_at > now() - interval '1 minute' AND j.started_at >= j.run_at
       AND coalesce(j.queue = ANY(queue_health.queues), true)
       AND (queue_health.tags IS NULL OR j.tags @> queue_health.tags)
     ORDER BY j.finished_at DESC
     LIMIT 2000)
    UNION ALL
    SELECT j.queue, j.started_at - j.run_at
    FROM notifyq.jobs j
    WHERE j.status = 'running' AND j.started_at > now() - interval '1 minute'
      AND j.started_at >= j.run_at AND coalesce(j.queue = ANY(queue_health.queues), true)
      AND (queue_health.tags IS NULL OR j.tags @> queue_health.tags)
), latency AS (
    SELECT s.queue,
           extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY s.wait))::float8 AS p50,
           extract(epoch FROM percentile_cont(0.95) WITHIN GROUP (ORDER BY s.wait))::float8 AS p95
    FROM starts s
    GROUP BY s.queue
), names AS (
    SELECT q.queue FROM queued q UNION SELECT r.queue FROM running r
    UNION SELECT d.queue FROM dead d UNION SELECT f.queue FROM finished f
    UNION SELECT x.queue FROM failed x
    UNION SELECT unnest(queue_health.queues)
    UNION SELECT p.queue FROM notifyq.queue_pauses p
          WHERE coalesce(p.queue = ANY(queue_health.queues), true)
)
SELECT n.queue,
       coalesce(q.ready, 0),
       coalesce(q.scheduled, 0),
       coalesce(r.running, 0),
       coalesce(f.succeeded_1m, 0),
       coalesce(x.failed_1m, 0),
       coalesce(d.dead, 0),
       coalesce(f.done_10s, 0),
       l.p50,
       l.p95,
       q.oldest_ready,
       EXISTS (SELECT FROM notifyq.queue_pauses p WHERE p.queue = n.queue AND p.task = '*'),
       ARRAY(SELECT p.task FROM notifyq.queue_pauses p
             WHERE p.queue = n.queue AND p.task <> '*' ORDER BY p.task)
FROM names n
LEFT JOIN queued q ON q.queue = n.queue
LEFT JOIN running r ON r.queue = n.queue
LEFT JOIN dead d ON d.queue = n.queue
LEFT JOIN finished f ON f.queue = n.queue
LEFT JOIN failed x ON x.queue = n.queue
LEFT JOIN latency l ON l.queue = n.queue
ORDER BY n.queue
$$;
COMMENT ON FUNCTION notifyq.queue_health(text[], text[]) IS
    'Per queue: ready, scheduled, running, succeeded and failed in the last minute, dead, '
    'enqueue-to-start p50/p95 and the oldest ready age (seconds), pauses; along the partial '
    'indexes. SELECT * FROM notifyq.queue_health()';

-- The latest failed attempts, newest first: jobs waiting for their retry
-- (queued, with the error of the attempt that failed) and dead ones, whose
-- failing attempt started within `within`; at most `max_rows` of them.  Along
-- jobs_failed_idx (jobs that ever failed, by their last start), backwards: it
-- reads about the rows it returns.  error is last_error whole (the traceback).
CREATE OR REPLACE FUNCTION notifyq.failed_recent(
    within interval DEFAULT '1 hour', max_rows integer DEFAULT 100
) RETURNS TABLE (id bigint, queue text, task text, status text, attempts integer,
                 max_attempts integer, error text, started_at timestamptz,
                 finished_at timestamptz)
LANGUAGE sql STABLE
AS $$
SELECT j.id, j.queue, j.task, j.status, j.attempts, j.max_attempts, j.last_error,
       j.started_at, j.finished_at
FROM notifyq.jobs j
WHERE j.last_error IS NOT NULL AND j.status IN ('queued', 'dead')
  AND j.started_at > now() - failed_recent.within
ORDER BY j.started_at DESC
LIMIT failed_recent.max_rows
$$;
COMMENT ON FUNCTION notifyq.failed_recent(interval, integer) IS
    'The latest failed attempts (jobs waiting for a retry, and dead jobs) started within '
    '`within`, newest first, at most max_rows, with the whole error.';

-- Running jobs that look stuck: their lease expired (the dispatcher holding them
-- stopped renewing it: the rescuer re-queues them a grace later), or running for
-- longer than `running_longer_than`.  Along jobs_lease_idx (running rows only: at
-- most the dispatchers' total concurrency), longest running first.
CREATE OR REPLACE FUNCTION notifyq.stuck(running_longer_than interval DEFAULT '1 hour')
RETURNS TABLE (id bigint, queue text, task text, attempts integer, claimed_by text,
               started_at timestamptz, lease_expires_at timestamptz, running_for interval,
               lease_expired boolean)
LANGUAGE sql STABLE
AS $$
SELECT j.id, j.queue, j.task, j.attempts, j.claimed_by, j.started_at, j.lease_expires_at,
       now() - j.started_at, j.lease_expires_at < now()
FROM notifyq.jobs j
WHERE j.status = 'running'
  AND (j.lease_expires_at < now() OR j.started_at < now() - stuck.running_longer_than)
ORDER BY j.started_at
$$;
COMMENT ON FUNCTION notifyq.stuck(interval) IS
    'Running jobs past their lease, or running longer than running_longer_than (default 1 '
    'hour), longest running first.';

REVOKE EXECUTE ON FUNCTION notifyq.queue_health(text[], text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.failed_recent(interval, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.stuck(interval) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Completion webhooks
--
-- A job with a callback_url gets a POST when it reaches a final state
-- (succeeded, dead, cancelled).  The trigger below writes a row into the outbox
-- notifyq.webhook_deliveries in the same transaction as the status change, so a
-- completion and its delivery commit together, and the job's own completion never
-- waits on the network: `notifyq serve` delivers from the outbox afterwards,
-- retrying with backoff (docs/http.md, "Completion webhooks").
--
-- A producer must not make the dispatchers call any address it likes (server-side
-- request forgery): a callback_url must start with a prefix of
-- notifyq.webhook_allowlist, which only the schema owner writes (or an admin role
-- it grants), checked at INSERT and UPDATE by the database, and again at delivery.

-- Adding a NULL column rewrites nothing; validating the CHECK reads the table once.
ALTER TABLE notifyq.jobs
    ADD COLUMN IF NOT EXISTS callback_url text,
    ADD CONSTRAINT jobs_callback_url_format CHECK (
        callback_url ~* '^https?://[^/?#@[:space:]]+/[^[:space:]]*$'
        AND char_length(callback_url) <= 2048);
COMMENT ON CONSTRAINT jobs_callback_url_format ON notifyq.jobs IS
    'callback_url: NULL or an http:// or https:// URL with a host and a path (at least /), '
    'no spaces, at most 2048 characters';
COMMENT ON COLUMN notifyq.jobs.callback_url IS
    'POSTed to when the job ends (succeeded, dead, cancelled); must start with a prefix of '
    'notifyq.webhook_allowlist.';

-- URL prefixes a callback_url may start with.  A prefix names at least the scheme,
-- the host and the / after it, so "https://hooks.example.com/" cannot be
-- stretched to https://hooks.example.com.evil.org/.  secret names the signing
-- secret (NOTIFYQ_SECRET_<secret> in the dispatcher's environment, as for HTTP
-- endpoints), never its value; NULL: deliveries to it are not signed.
CREATE TABLE IF NOT EXISTS notifyq.webhook_allowlist (
    prefix   text        PRIMARY KEY,
    secret   text,
    added_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_allowlist_prefix_format CHECK (
        prefix ~* '^https?://[^/?#@[:space:]]+/[^[:space:]]*$' AND char_length(prefix) <= 2048),
    CONSTRAINT webhook_allowlist_secret_format CHECK (secret ~ '^[A-Z0-9_]{1,64}$')
);
COMMENT ON TABLE notifyq.webhook_allowlist IS
    'URL prefixes a job''s callback_url may start with; written by the schema owner (or an '
    'admin role) only. secret names the signing secret (NOTIFYQ_SECRET_<secret>).';
COMMENT ON CONSTRAINT webhook_allowlist_prefix_format ON notifyq.webhook_allowlist IS
    'prefix: http:// or https://, a host, and at least the / after it (so no other host '
    'can match it)';
COMMENT ON CONSTRAINT webhook_allowlist_secret_format ON notifyq.webhook_allowlist IS
    'secret: the NAME of a signing secret, 1-64 characters of A-Z, 0-9 and _';

-- The outbox: one row per final state reached by a job with a callback_url.
-- body is the JSON POSTed, frozen when the job ended.  pending rows are claimed by
-- due time (next_at) with SKIP LOCKED; a claim moves next_at a lease ahead, so a
-- dispatcher that dies mid-delivery leaves the row to be claimed again then.
CREATE TABLE IF NOT EXISTS notifyq.webhook_deliveries (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id       bigint      NOT NULL,
    url          text        NOT NULL,
    body         jsonb       NOT NULL,
    status       text        NOT NULL DEFAULT 'pending',
    attempts     integer     NOT NULL DEFAULT 0,
    next_at      timestamptz NOT NULL DEFAULT now(),
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    CONSTRAINT webhook_deliveries_status_valid CHECK (status IN ('pending', 'delivered', 'failed'))
);
COMMENT ON TABLE notifyq.webhook_deliveries IS
    'Completion webhooks to send (pending), sent (delivered) or given up (failed), filled by '
    'a trigger on notifyq.jobs and delivered by notifyq serve.';
-- Due deliveries, for the claim: partial, so delivered rows cost nothing here.
CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx
    ON notifyq.webhook_deliveries (next_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_job_idx
    ON notifyq.webhook_deliveries (job_id);

-- Refuses a callback_url outside the allow-list.  SECURITY DEFINER: producers need
-- no right on the allow-list (they may not even read it).  Fired only for rows with
-- a callback_url (the triggers' WHEN): every other job costs nothing.
CREATE OR REPLACE FUNCTION notifyq.check_callback_url() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- A dot segment ("..", ".", plain or percent-encoded, ended by / \ ; ? # or the
    -- end) climbs out of the prefix's path once the HTTP client or the receiver
    -- normalises the path (https://hooks.example.com/notifyq/../admin is POSTed to
    -- /admin): starts_with alone would let it through.
    IF NEW.callback_url ~* '(/|\\|%2f|%5c)(\.|%2e){1,2}($|[/\\;?#]|%2f|%5c)' THEN
        RAISE EXCEPTION 'notifyq: callback_url % is not allowed: it has a "." or ".." path '
                        'segment, which would leave its allow-list prefix', NEW.callback_url
            USING ERRCODE = 'check_violation',
                  HINT = 'Give the URL without "." and ".." segments (plain or %2e).';
    END IF;
    IF NOT EXISTS (SELECT FROM notifyq.webhook_allowlist a
                   WHERE starts_with(NEW.callback_url, a.prefix)) THEN
        RAISE EXCEPTION 'notifyq: callback_url % is not allowed: it starts with no prefix of '
                        'notifyq.webhook_allowlist', NEW.callback_url
            USING ERRCODE = 'check_violation',
                  HINT = 'The schema owner allows a prefix: INSERT INTO notifyq.webhook_allowlist '
                         '(prefix) VALUES (''https://hooks.example.com/'')';
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER jobs_callback_url_allowed
    BEFORE INSERT OR UPDATE OF callback_url ON notifyq.jobs
    FOR EACH ROW WHEN (NEW.callback_url IS NOT NULL)
    EXECUTE FUNCTION notifyq.check_callback_url();

-- Queues the delivery of a job that reached a final state.  SECURITY DEFINER:
-- whoever finishes the job (a dispatcher, an operator cancelling it) needs no
-- right on the outbox.  Row triggers whose WHEN keeps jobs without a callback_url
-- (and changes that are not to a final state) from ever calling it.  A job
-- inserted already final (cancelled at once by a failed dependency) counts too.
CREATE OR REPLACE FUNCTION notifyq.queue_webhook() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO notifyq.webhook_deliveries (job_id, url, body)
    VALUES (NEW.id, NEW.callback_url,
            jsonb_build_object(
                'id', NEW.id, 'queue', NEW.queue, 'task', NEW.task, 'status', NEW.status,
                'attempts', NEW.attempts,
                'result', CASE WHEN NEW.status = 'succeeded' THEN NEW.result END,
                'error', CASE WHEN NEW.status <> 'succeeded' THEN NEW.last_error END,
                'finished_at', NEW.finished_at));
    -- A hint for the dispatchers' webhook senders, once per transaction (identical
    -- payloads are merged); their poll finds the row without it.
    PERFORM pg_notify('notifyq_internal', 'webhooks');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_webhook_on_finish
    AFTER UPDATE OF status ON notifyq.jobs
    FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL AND NEW.status IN ('succeeded', 'dead', 'cancelled')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION notifyq.queue_webhook();

CREATE OR REPLACE TRIGGER jobs_webhook_on_insert
    AFTER INSERT ON notifyq.jobs
    FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL AND NEW.status IN ('succeeded', 'dead', 'cancelled'))
    EXECUTE FUNCTION notifyq.queue_webhook();

REVOKE ALL ON notifyq.webhook_allowlist, notifyq.webhook_deliveries FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.check_callback_url() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.queue_webhook() FROM PUBLIC;

-- The roles that may enqueue may set a callback_url; the roles that read the
-- monitoring views (the worker role) may call the monitoring functions, read the
-- allow-list and deliver.  `notifyq roles` grants the same; run it again to be exact.
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
        EXECUTE format('GRANT INSERT (callback_url) ON notifyq.jobs TO %s', r.role);
    END LOOP;
    FOR r IN
        SELECT DISTINCT a.grantee::regrole AS role
        FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) AS a
        WHERE c.oid = 'notifyq.queue_stats'::regclass
          AND a.privilege_type = 'SELECT' AND a.grantee <> c.relowner AND a.grantee <> 0
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION notifyq.queue_health(text[], text[]), '
                       'notifyq.failed_recent(interval, integer), notifyq.stuck(interval) TO %s',
                       r.role);
        EXECUTE format('GRANT SELECT ON notifyq.webhook_allowlist TO %s', r.role);
        EXECUTE format('GRANT SELECT, UPDATE (status, attempts, next_at, last_error, delivered_at) ON notifyq.webhook_deliveries TO %s', r.role);
    END LOOP;
END
$$;
