-- Enqueueing and inspecting jobs with plain SQL (psql "$(notifyq dsn)" -f examples/enqueue.sql).
-- Any language's PostgreSQL client can run these statements.

-- The minimum: a task name and a JSON payload.
INSERT INTO notifyq.jobs (task, payload) VALUES ('hello.greet', '{"name": "Ada"}');

-- A queue, a priority (higher runs first), a delay and an attempt limit.
INSERT INTO notifyq.jobs (task, payload, queue, priority, run_at, max_attempts)
VALUES ('hello.greet', '{"name": "Grace"}', 'default', 10, now() + interval '5 seconds', 3);

-- Many jobs in one statement: one notification, not one per row.
INSERT INTO notifyq.jobs (task, payload)
SELECT 'hello.greet', jsonb_build_object('name', 'guest ' || i) FROM generate_series(1, 100) AS i;

-- Enqueue only if your own transaction commits.
BEGIN;
-- ... your application's writes ...
INSERT INTO notifyq.jobs (task, payload) VALUES ('hello.shout', '{"name": "Linus"}');
COMMIT;

-- A job to follow: the database makes its token and the statement returns it with the id
-- (a producer role may not read tokens back from the table).  With the two, and nothing
-- more than the producer role, a later statement reads the job (status, progress, result,
-- error):  SELECT * FROM notifyq.job_status(<id>, '<token>');
WITH t AS (SELECT gen_random_uuid() AS token),
     j AS (INSERT INTO notifyq.jobs (task, payload, token)
           SELECT 'hello.greet', '{"name": "Mae"}', t.token FROM t RETURNING id)
SELECT j.id, t.token FROM j, t;

-- What is going on, per queue.
SELECT * FROM notifyq.queue_stats;

-- The dead-letter queue, and re-queueing what is in it for a fresh set of attempts.
SELECT id, task, attempts, last_error FROM notifyq.jobs WHERE status = 'dead';
UPDATE notifyq.jobs
SET status = 'queued', attempts = 0, run_at = now(), finished_at = NULL
WHERE status = 'dead' AND task = 'hello.shout';
