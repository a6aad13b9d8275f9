-- Schema version 11: following one job.  Per-job events on the notifyq_events
-- channel for the queues that ask for them (notifyq.queue_events), a per-job
-- token and notifyq.job_status for the program that enqueued a job, and the
-- dispatchers' own messages moved off the public channels to notifyq_internal.
-- schema.sql holds the same objects for new databases.

-- A job's token: whoever knows it may read the job's state through
-- notifyq.job_status, and producers are not given the right to read it from the
-- table (a column grant on it would show them every job's token).  The enqueuer makes one
-- (a random UUID) and keeps it; jobs that name none get one all the same, so no
-- job can be read with a NULL token.  Jobs inserted before this version have
-- none: adding the column with a default for new rows only rewrites nothing.
ALTER TABLE notifyq.jobs ADD COLUMN IF NOT EXISTS token uuid;
ALTER TABLE notifyq.jobs ALTER COLUMN token SET DEFAULT pg_catalog.gen_random_uuid();

-- Internal traffic leaves the public channels: a cap change wakes the
-- dispatchers on notifyq_internal, which only they listen to.
CREATE OR REPLACE FUNCTION notifyq.notify_limit_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(
        'notifyq_internal', 'limit:' OPERATOR(pg_catalog.||) COALESCE(NEW.queue, OLD.queue));
    RETURN NULL;
END
$$;

-- Per-job events
--
-- For each queue listed here, every job's status change (an INSERT counts, with
-- "previous" null) and every change of its progress report is announced on
-- notifyq_events as one JSON object:
--
--   {"v" : 1, "kind" : "status", "id" : 42, "queue" : "q", "task" : "t",
--    "status" : "running", "previous" : "queued", "attempt" : 1}
--   {"v" : 1, "kind" : "progress", "id" : 42, "queue" : "q", "task" : "t",
--    "attempt" : 1, "progress" : 50, "message" : "half way"}
--
-- A statement's events go out as JSON arrays of these objects, in job id order
-- (for one job, its progress before its status), packed into as few
-- notifications as the packing below allows, each shorter than PostgreSQL's
-- 8,000-byte limit on a payload.  A queue without a row costs one probe of this
-- (tiny) table per statement that writes jobs.
CREATE TABLE IF NOT EXISTS notifyq.queue_events (
    queue      text        PRIMARY KEY,
    enabled_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queue_events_queue_format CHECK (queue ~ '^[a-z0-9_][a-z0-9_-]{0,62}$')
);
COMMENT ON TABLE notifyq.queue_events IS
    'Queues whose jobs announce each status change and progress report on notifyq_events; '
    'switch with notifyq.set_events(queue, boolean).';
COMMENT ON CONSTRAINT queue_events_queue_format ON notifyq.queue_events IS
    'queue: 1-63 characters of a-z, 0-9, _ and -, not starting with -';

-- SECURITY DEFINER: it reads notifyq.queue_events, which the roles that write
-- jobs (producers, workers, operators' own roles) need no right on; it runs as
-- the owner with search_path pinned, so nothing on a writer's search_path can
-- stand in for what it calls.  Packing: an event of n bytes costs n + 1 (its
-- comma, or the closing bracket); an array is cut where the running total
-- crosses a multiple of 7998 - (the statement's largest event), so each holds
-- at most 7,999 bytes with its brackets, and all but the last are filled to
-- within one event of that.
CREATE OR REPLACE FUNCTION notifyq.notify_events() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    events text[];
BEGIN
    -- The path of every statement while no queue has events on.
    IF NOT EXISTS (SELECT FROM notifyq.queue_events) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(json_build_object(
                   'v', 1, 'kind', 'status', 'id', n.id, 'queue', n.queue, 'task', n.task,
                   'status', n.status, 'previous', NULL::text, 'attempt', n.attempts)::text
                   ORDER BY n.id)
        INTO events
        FROM new_rows n JOIN notifyq.queue_events e ON e.queue = n.queue;
    ELSE
        SELECT array_agg(x.event ORDER BY n.id, x.ord)
        INTO events
        FROM new_rows n
        JOIN old_rows o ON o.id = n.id
        JOIN notifyq.queue_events e ON e.queue = n.queue
        CROSS JOIN LATERAL (VALUES
            (1, CASE WHEN (n.progress IS DISTINCT FROM o.progress
                           OR n.progress_message IS DISTINCT FROM o.progress_message)
                          AND (n.progress IS NOT NULL OR n.progress_message IS NOT NULL)
                     THEN json_build_object(
                         'v', 1, 'kind', 'progress', 'id', n.id, 'queue', n.queue,
                         'task', n.task, 'attempt', n.attempts, 'progress', n.progress,
                         'message', n.progress_message)::text END),
            (2, CASE WHEN n.status IS DISTINCT FROM o.status
                     THEN json_build_object(
                         'v', 1, 'kind', 'status', 'id', n.id, 'queue', n.queue,
                         'task', n.task, 'status', n.status, 'previous', o.status,
                         'attempt', n.attempts)::text END)
        ) AS x(ord, event)
        WHERE x.event IS NOT NULL;
    END IF;
    IF events IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('notifyq_events', p.payload)
    FROM (SELECT '[' || string_agg(s.event, ',' ORDER BY s.n) || ']' AS payload, min(s.n) AS first
          FROM (SELECT e.event, e.n,
                       sum(octet_length(e.event) + 1) OVER (ORDER BY e.n) AS total,
                       max(octet_length(e.event)) OVER () AS largest
                FROM unnest(events) WITH ORDINALITY AS e(event, n)) AS s
          GROUP BY (s.total - 1) / (7998 - s.largest)
          ORDER BY first) AS p;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_events_inserted
    AFTER INSERT ON notifyq.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_events();

CREATE OR REPLACE TRIGGER jobs_events_changed
    AFTER UPDATE ON notifyq.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_events();

-- Switch a queue's events on or off (run it as the owner of notifyq.queue_events,
-- or grant EXECUTE and the table's INSERT and DELETE); returns whether they are on.
CREATE OR REPLACE FUNCTION notifyq.set_events(queue text, enabled boolean) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF enabled THEN
        INSERT INTO notifyq.queue_events AS e (queue) VALUES (set_events.queue)
        ON CONFLICT ON CONSTRAINT queue_events_pkey DO NOTHING;
    ELSE
        DELETE FROM notifyq.queue_events e WHERE e.queue = set_events.queue;
    END IF;
    RETURN enabled;
END
$$;
COMMENT ON FUNCTION notifyq.set_events(text, boolean) IS
    'Switch the per-job events on notifyq_events on or off for one queue; returns whether on.';

-- What the program that enqueued a job may know of it, given the job's token:
-- no row for a wrong token, an unknown id or a job without a token (there is no
-- telling them apart).  SECURITY DEFINER: its caller needs no right on
-- notifyq.jobs, only EXECUTE on this function (the producer role has it).
CREATE OR REPLACE FUNCTION notifyq.job_status(job_id bigint, token uuid)
RETURNS TABLE (
    id               bigint,
    queue            text,
    task             text,
    status           text,
    attempts         integer,
    max_attempts     integer,
    progress         real,
    progress_message text,
    result           jsonb,
    last_error       text,
    run_at           timestamptz,
    created_at       timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz
)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT j.id, j.queue, j.task, j.status, j.attempts, j.max_attempts, j.progress,
           j.progress_message, j.result, j.last_error, j.run_at, j.created_at, j.started_at,
           j.finished_at
    FROM notifyq.jobs j
    WHERE j.id = $1 AND j.token = $2
$$;
COMMENT ON FUNCTION notifyq.job_status(bigint, uuid) IS
    'One job''s status, progress, result and error, for whoever holds its token; no row '
    'otherwise.';

REVOKE EXECUTE ON FUNCTION notifyq.notify_events() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.set_events(text, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.job_status(bigint, uuid) FROM PUBLIC;

-- The roles that may enqueue (notifyq roles gave them INSERT on jobs.task) may
-- give a job its token and read their jobs by it; run `notifyq roles` again to be
-- exact.
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
        EXECUTE format('GRANT INSERT (token) ON notifyq.jobs TO %s', r.role);
        EXECUTE format('GRANT EXECUTE ON FUNCTION notifyq.job_status(bigint, uuid) TO %s',
                       r.role);
    END LOOP;
END
$$;
