-- notifyq schema: the newest version, whole, to read.
--
-- `notifyq migrate` builds exactly this from the numbered migrations in
-- notifyq/sql/migrations/ (0001_initial.sql, then each later one in order,
-- in one transaction under an advisory lock, recording each version); a test
-- proves the two equal.  By hand, this file does the same in one go, on a
-- database without the notifyq schema:
--
--     psql -1 -v ON_ERROR_STOP=1 -f schema.sql "$DSN"
--
-- Every statement is idempotent, so applying it twice changes nothing.  It is
-- no upgrade: on a database built by an older release it skips the tables
-- that exist (and so their new columns), then fails on a statement that needs
-- one, or records versions whose changes it did not make.  Upgrade with
-- `notifyq migrate`, which applies what is missing.
--
-- The public contract (what other languages may rely on) is: the table
-- notifyq.jobs with its columns id, queue, task, payload, priority, run_at,
-- status, attempts, max_attempts, last_error, created_at, started_at,
-- finished_at, dedupe_key, result, progress, progress_message, checkpoint,
-- depends_on, on_dependency_failure, rate_key, token, trace_context, tags,
-- unique_for, on_duplicate, callback_url; the status values; the view
-- notifyq.queue_stats; the monitoring functions notifyq.queue_health,
-- failed_recent and stuck; the tables notifyq.job_history,
-- notifyq.queue_limits, notifyq.queue_pauses, notifyq.rate_limits,
-- notifyq.periodic, notifyq.tasks, notifyq.queue_events,
-- notifyq.webhook_allowlist and notifyq.webhook_deliveries;
-- the table notifyq.circuit_breakers (its config columns task, failures,
-- failure_window, cooldown; state, opened_at and opens to read) with
-- notifyq.set_circuit_breaker and notifyq.reset_circuit_breaker;
-- the SQL worker protocol (notifyq.claim with its row type notifyq.claimed_job,
-- heartbeat, complete, fail, progress, hold_session, hand_back, stop_worker);
-- notifyq.job_status, notifyq.dependency_results, notifyq.set_events, notifyq.pause_queue and
-- notifyq.resume_queue; and the notification channels
-- notifyq_jobs, notifyq_status, notifyq_progress and notifyq_events, with the
-- payloads described where they are sent (nothing else is sent on them).
-- notifyq_internal carries the dispatchers' own messages and is not part of
-- it.  Columns whose names start with lease_, claimed_ or rate_reserved are
-- the dispatchers' bookkeeping.

CREATE SCHEMA IF NOT EXISTS notifyq;

CREATE TABLE IF NOT EXISTS notifyq.schema_version (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS notifyq.jobs (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text        NOT NULL DEFAULT 'default',
    task             text        NOT NULL,
    payload          jsonb       NOT NULL DEFAULT '{}',
    priority         integer     NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    status           text        NOT NULL DEFAULT 'queued',
    attempts         integer     NOT NULL DEFAULT 0,
    -- NULL means "the task's own setting": the first claim fills it in.
    max_attempts     integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- Which dispatcher runs the current attempt, and until when its lease holds.
    claimed_by       text,
    lease_expires_at timestamptz,
    -- While a job with a dedupe_key is unfinished, another INSERT with the same
    -- key conflicts (jobs_dedupe_idx): ON CONFLICT DO NOTHING makes it a no-op.
    dedupe_key       text,
    -- What the handler returned (JSON), written with 'succeeded'.  result and
    -- checkpoint are written by dispatchers only, which keep them under 1 MiB
    -- of JSON text before sending (a CHECK here could fail a whole batch).
    result           jsonb,
    -- The handler's last progress report, percent and a short message.
    progress         real,
    progress_message text,
    -- The handler's last saved checkpoint: the next attempt starts from it.
    checkpoint       jsonb,
    -- Jobs this one waits for (see "Dependencies" below), and what a failed one means.
    depends_on       bigint[],
    on_dependency_failure text NOT NULL DEFAULT 'cancel',
    -- Jobs that share a rate_key share a rate limit (notifyq.rate_limits);
    -- rate_reserved: run_at is a slot the rate limit gave, admitted when due.
    rate_key         text,
    rate_reserved    boolean     NOT NULL DEFAULT false,
    -- Whoever holds a job's token may read it through notifyq.job_status (see
    -- "Following a job" below); the producer role may not read it.
    token            uuid        DEFAULT pg_catalog.gen_random_uuid(),
    -- The enqueuing trace's propagation fields, as an OpenTelemetry propagator injects
    -- them into a map ({"traceparent": ..., "tracestate": ...}): any producer may set
    -- it, from any language, and each attempt's span links to it (docs/tracing.md).
    -- The CHECK keeps it small, as every claim returns it; NULL costs nothing.
    trace_context    jsonb,
    -- Labels to find jobs by (`tags @> ARRAY['customer:42']`, jobs_tags_idx): set at
    -- enqueue, never read by the dispatchers.
    tags             text[],
    -- With dedupe_key, what another INSERT with the key meets (see "Keys beyond
    -- unfinished jobs" below): unique_for, the key is held that long after this
    -- job was enqueued, even once it finished; on_duplicate 'replace', an INSERT
    -- with 'replace' meeting this job queued gives it its payload and run_at
    -- instead (debounce).
    unique_for       interval,
    on_duplicate     text,
    -- POSTed to when the job ends (see "Completion webhooks" below); must start with a
    -- prefix of notifyq.webhook_allowlist, which the database checks.
    callback_url     text,

    -- Unbounded patterns and a length test: a bounded repetition ({0,199}) costs
    -- every INSERT and UPDATE of a job tens of microseconds (migration 0013).
    CONSTRAINT jobs_queue_format CHECK (queue ~ '^[a-z0-9_][a-z0-9_-]*$' AND char_length(queue) <= 63),
    CONSTRAINT jobs_task_format CHECK (task ~ '^[A-Za-z_][A-Za-z0-9_.:-]*$' AND char_length(task) <= 200),
    CONSTRAINT jobs_priority_range CHECK (priority BETWEEN -1000 AND 1000),
    CONSTRAINT jobs_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 1000),
    CONSTRAINT jobs_attempts_nonnegative CHECK (attempts >= 0),
    CONSTRAINT jobs_payload_size CHECK (pg_column_size(payload) <= 1048576),
    CONSTRAINT jobs_status_valid CHECK (
        status IN ('queued', 'running', 'succeeded', 'dead', 'cancelled', 'waiting')),
    CONSTRAINT jobs_running_has_lease CHECK (
        status <> 'running' OR (claimed_by IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT jobs_dedupe_key_length CHECK (char_length(dedupe_key) BETWEEN 1 AND 255),
    CONSTRAINT jobs_progress_range CHECK (progress BETWEEN 0 AND 100),
    CONSTRAINT jobs_progress_message_length CHECK (char_length(progress_message) <= 200),
    CONSTRAINT jobs_on_dependency_failure_valid CHECK (
        on_dependency_failure IN ('cancel', 'run')),
    CONSTRAINT jobs_depends_on_valid CHECK (
        cardinality(depends_on) <= 1000
        AND array_position(depends_on, NULL) IS NULL),
    CONSTRAINT jobs_rate_key_length CHECK (char_length(rate_key) BETWEEN 1 AND 200),
    CONSTRAINT jobs_trace_context_valid CHECK (
        pg_catalog.jsonb_typeof(trace_context) = 'object'
        AND pg_catalog.pg_column_size(trace_context) <= 4096
        AND NOT pg_catalog.jsonb_path_exists(trace_context, '$.* ? (@.type() != "string")')),
    -- Built-in functions only, no per-element subquery: a function looping over the
    -- tags costs every write of a tagged row about 5 µs, this well under one.
    CONSTRAINT jobs_tags_valid CHECK (
        cardinality(tags) <= 20 AND array_ndims(tags) = 1
        AND array_position(tags, NULL) IS NULL AND array_position(tags, '') IS NULL
        AND char_length(array_to_string(tags, '')) <= 1000),
    CONSTRAINT jobs_unique_for_valid CHECK (
        unique_for IS NULL
        OR (unique_for > interval '0' AND unique_for <= interval '10 years'
            AND dedupe_key IS NOT NULL)),
    CONSTRAINT jobs_on_duplicate_valid CHECK (
        on_duplicate IS NULL
        OR (on_duplicate IN ('refuse', 'replace') AND dedupe_key IS NOT NULL
            AND (on_duplicate = 'refuse' OR unique_for IS NULL))),
    CONSTRAINT jobs_callback_url_format CHECK (
        callback_url ~* '^https?://[^/?#@[:space:]]+/[^[:space:]]*$'
        AND char_length(callback_url) <= 2048)
);

COMMENT ON TABLE notifyq.jobs IS
    'notifyq jobs. Enqueue with INSERT INTO notifyq.jobs (task, payload) VALUES (...).';
COMMENT ON CONSTRAINT jobs_queue_format ON notifyq.jobs IS
    'queue: 1-63 characters of a-z, 0-9, _ and -, not starting with -';
COMMENT ON CONSTRAINT jobs_task_format ON notifyq.jobs IS
    'task: 1-200 characters of letters, digits, _ . : and -, starting with a letter or _';
COMMENT ON CONSTRAINT jobs_priority_range ON notifyq.jobs IS
    'priority: an integer from -1000 to 1000; higher runs first';
COMMENT ON CONSTRAINT jobs_max_attempts_range ON notifyq.jobs IS
    'max_attempts: NULL (the task''s setting) or an integer from 1 to 1000';
COMMENT ON CONSTRAINT jobs_payload_size ON notifyq.jobs IS
    'payload: at most 1 MiB as jsonb before compression';
COMMENT ON CONSTRAINT jobs_attempts_nonnegative ON notifyq.jobs IS
    'attempts: never negative';
COMMENT ON CONSTRAINT jobs_status_valid ON notifyq.jobs IS
    'status: one of queued, running, succeeded, dead, cancelled, waiting';
COMMENT ON CONSTRAINT jobs_running_has_lease ON notifyq.jobs IS
    'a running job has claimed_by and lease_expires_at (set by the dispatcher that claimed it)';
COMMENT ON CONSTRAINT jobs_dedupe_key_length ON notifyq.jobs IS
    'dedupe_key: NULL or 1-255 characters';
COMMENT ON CONSTRAINT jobs_progress_range ON notifyq.jobs IS
    'progress: NULL or a percentage from 0 to 100';
COMMENT ON CONSTRAINT jobs_progress_message_length ON notifyq.jobs IS
    'progress_message: at most 200 characters';
COMMENT ON CONSTRAINT jobs_on_dependency_failure_valid ON notifyq.jobs IS
    'on_dependency_failure: cancel (the job is cancelled when a dependency ends dead or '
    'cancelled) or run (it runs once every dependency finished, however)';
COMMENT ON CONSTRAINT jobs_depends_on_valid ON notifyq.jobs IS
    'depends_on: NULL or up to 1000 job ids, none of them NULL';
COMMENT ON CONSTRAINT jobs_rate_key_length ON notifyq.jobs IS
    'rate_key: NULL or 1-200 characters';
COMMENT ON CONSTRAINT jobs_trace_context_valid ON notifyq.jobs IS
    'trace_context: NULL or a JSON object of string values, at most 4096 bytes as jsonb';
COMMENT ON COLUMN notifyq.jobs.trace_context IS
    'The enqueuing trace''s propagation fields ({"traceparent": ..., "tracestate": ...}, '
    'as an OpenTelemetry propagator injects them into a map); each attempt''s span links to it.';
COMMENT ON CONSTRAINT jobs_tags_valid ON notifyq.jobs IS
    'tags: NULL or a one-dimensional array of at most 20 non-empty tags, none NULL, '
    '1000 characters in all';
COMMENT ON COLUMN notifyq.jobs.tags IS
    'Labels to find jobs by (tags @> ARRAY[...]): notifyq jobs list/retry/cancel/purge/watch --tag.';
COMMENT ON CONSTRAINT jobs_unique_for_valid ON notifyq.jobs IS
    'unique_for: NULL, or more than 0 and at most 10 years, with a dedupe_key';
COMMENT ON CONSTRAINT jobs_on_duplicate_valid ON notifyq.jobs IS
    'on_duplicate: NULL, refuse or replace, with a dedupe_key; replace not with unique_for';
COMMENT ON COLUMN notifyq.jobs.unique_for IS
    'With dedupe_key: no other job with the key is inserted for this long after this one '
    'was enqueued, even once it finished.';
COMMENT ON COLUMN notifyq.jobs.on_duplicate IS
    'With dedupe_key, replace: an INSERT with replace meeting a queued job with the key, '
    'inserted with replace too, gives it its payload and run_at instead of being refused '
    '(debounce).';
COMMENT ON CONSTRAINT jobs_callback_url_format ON notifyq.jobs IS
    'callback_url: NULL or an http:// or https:// URL with a host and a path (at least /), '
    'no spaces, at most 2048 characters';
COMMENT ON COLUMN notifyq.jobs.callback_url IS
    'POSTed to when the job ends (succeeded, dead, cancelled); must start with a prefix of '
    'notifyq.webhook_allowlist.';

-- Claimable rows, in claim order per (queue, task): the claim probes one
-- (queue, task) pair at a time, so jobs of tasks it cannot run (and of other
-- queues) are never read, however many there are.  Partial, so finished rows
-- cost nothing here.
CREATE INDEX IF NOT EXISTS jobs_claim_idx
    ON notifyq.jobs (queue, task, priority DESC, run_at, id) WHERE status = 'queued';
-- The earliest future run_at per (queue, task), for the dispatcher's precise timer.
CREATE INDEX IF NOT EXISTS jobs_scheduled_idx
    ON notifyq.jobs (queue, task, run_at) WHERE status = 'queued';
-- Running jobs by lease, for the rescuer and for lease renewal.
CREATE INDEX IF NOT EXISTS jobs_lease_idx
    ON notifyq.jobs (lease_expires_at) WHERE status = 'running';
-- One unfinished job per dedupe_key.  Any status that is not final counts as
-- unfinished, so a job waiting for a retry's backoff still holds its key.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_dedupe_idx
    ON notifyq.jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND status NOT IN ('succeeded', 'dead', 'cancelled');
-- Tagged rows by tag, for `tags @> ARRAY[...]` (GIN).  Partial: an untagged job
-- costs it nothing, on insert or on any later update.  A tagged one costs an entry
-- per tag on every write that is not HOT (a status change is never HOT: status is
-- in other indexes' predicates), most of it deferred to vacuum by fastupdate's
-- pending list.
CREATE INDEX IF NOT EXISTS jobs_tags_idx
    ON notifyq.jobs USING gin (tags) WHERE tags IS NOT NULL;

-- The trigger functions run as whoever writes the row (a dispatcher, an
-- operator), so every function and type they name is qualified with
-- pg_catalog: a better-matching function in a schema on the writer's
-- search_path (public is writable by everyone before PostgreSQL 15), or a temp
-- table named like a type, cannot capture the call.  Qualified names cost
-- nothing, unlike a SET search_path clause on the enqueue path.  The
-- transition tables (inserted, new_rows, old_rows) are found before any table
-- of the same name.

-- ---------------------------------------------------------------------------
-- Appetite: notifying only when a dispatcher needs waking
--
-- PostgreSQL serialises the commits of every transaction that sent a
-- notification (one lock for the whole database, held across the commit's WAL
-- flush), so many producers committing single-row INSERTs run at about half
-- their rate once each INSERT notifies.  Most of those notifications wake
-- nobody: a dispatcher whose last claim came back full claims again as soon as
-- it has room, whatever it hears.  So each consumer of notifyq_jobs states its
-- appetite per queue here, and the insert trigger skips the notification while
-- every consumer of the queue is draining:
--
--   hungry    its last claim came back short: it waits for a notification.
--             SQL workers (notifyq.claim) always count as hungry.
--   draining  its last claim came back full: it claims again without being told.
--             Valid until expires_at; the dispatcher renews it while it drains,
--             so the row of a dispatcher that died stops counting on its own.
--
-- notifyq_jobs stays a wake-up hint: a notification is skipped (not merely
-- late) only when the rule below proves the job is claimed without it.
--
-- The rule.  An INSERT of queued jobs into queue q skips its notification iff,
-- read after taking the appetite lock (28275, hashtext(q)) SHARED until the
-- end of its transaction, in a READ COMMITTED transaction: no hungry row names
-- q (or '*', every queue), and some draining row of q has not expired.
--
-- A dispatcher whose claim comes back short, before it waits: (1) commits its
-- rows as hungry; (2) takes the appetite lock of each of its queues EXCLUSIVE
-- for a moment (notifyq.appetite_barrier), which waits for every
-- producer transaction holding it SHARED to end; (3) claims again.
--
-- Why no job waits for the fallback poll.  Take a job J committed into q by a
-- producer P whose trigger skipped the notification.  P read, at some time r,
-- every consumer of q draining.  Each such consumer D either keeps draining
-- (it claims again, and J is ready, so D reaches it in claim order) or goes
-- hungry, which it commits at some h > r (had it committed before r, P's read,
-- with a snapshot taken after r, would have seen it: READ COMMITTED takes a
-- new snapshot for each statement of the trigger).  P took the lock before r
-- and holds it until its commit is visible (PostgreSQL releases a transaction's
-- locks after it marks it committed).  D's barrier starts after h > r, so it is
-- granted only once P has released the lock: J is committed, and visible, before
-- D's re-claim takes its snapshot.  So J is claimed by that re-claim, or by an
-- earlier claim, or left to a claim that comes back full (D stays draining);
-- or J was not claimable by D (another task, a queue cap, a rate limit, run_at
-- ahead) and the same argument applies to the consumer that can claim it.  A
-- dispatcher with no row yet (it just started, or its rows were dropped) is
-- covered too: it claims again at once while its claims come back full, and
-- before it waits it commits a hungry row and passes the barrier, the same
-- three steps, so whatever P read, J is claimed by a claim after P's commit.  A
-- SQL worker has a hungry row from its first claim (notifyq.claim writes it in
-- the claim's transaction): a job committed in the moment before that reaches it
-- by its next claim or its poll, unless a draining dispatcher claims it first.
-- A REPEATABLE READ or SERIALIZABLE producer reads the table with its
-- transaction's snapshot, which may predate h: it always notifies.  Not
-- covered: a program of its own that LISTENs on notifyq_jobs without a row (a
-- dispatcher older than this version, a monitor): it hears no skipped insert.
--
-- The barrier waits at most a few milliseconds (lock_timeout in the function):
-- while it waits, new producers of q queue behind it.  A producer transaction
-- held open longer (it inserted a job, then went on with other work) makes the
-- barrier give up; the dispatcher then stays hungry (so new producers notify
-- it) and tries the barrier again with a growing pause, claiming after the
-- first that passes: a job of such a transaction is claimed within that pause
-- of its commit, not a poll interval.
--
-- Cost on the producer side: one SHARED advisory lock per statement and queue
-- (shared locks do not conflict with each other: producers do not serialise on
-- it, they only meet on the lock manager's partition lock for a moment), one
-- probe of this small table, and one nextval() to count the decision.
CREATE TABLE IF NOT EXISTS notifyq.queue_appetite (
    queue      text        NOT NULL,
    claimant   text        NOT NULL,
    state      text        NOT NULL,
    since      timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    PRIMARY KEY (queue, claimant),
    CONSTRAINT queue_appetite_queue_format CHECK (
        queue = '*' OR (queue ~ '^[a-z0-9_][a-z0-9_-]*$' AND char_length(queue) <= 63)),
    CONSTRAINT queue_appetite_state_valid CHECK (state IN ('hungry', 'draining')),
    CONSTRAINT queue_appetite_draining_expires CHECK (state = 'hungry' OR expires_at IS NOT NULL)
);
COMMENT ON TABLE notifyq.queue_appetite IS
    'Whether each consumer of a queue waits for notifications (hungry) or claims without '
    'them (draining): inserts skip pg_notify while every one drains. Kept by the '
    'dispatchers and notifyq.claim: read it, do not write it.';

-- Counts of the insert trigger's decisions, for metrics (notifyq.metrics reads
-- them).  A sequence, not a counter row: nextval() takes no row lock and writes
-- WAL once per 32 values, so counting costs the producers no serialisation.
-- Not transactional: an INSERT rolled back still counted its decision.
CREATE SEQUENCE IF NOT EXISTS notifyq.wakeups_sent;
CREATE SEQUENCE IF NOT EXISTS notifyq.wakeups_skipped;

-- One notification per statement per queue, never one per row: a 100,000-row
-- INSERT wakes the dispatchers once.  The payload is the queue name only; a
-- notification is a hint to look at the table, never the job itself.
-- SECURITY DEFINER: producers need no right on the appetite table or the
-- counting sequences, and nothing on their search_path can stand in for what
-- it calls.
CREATE OR REPLACE FUNCTION notifyq.notify_inserted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text;
    -- Another isolation level reads with the transaction's snapshot (see above).
    fresh boolean := current_setting('transaction_isolation') = 'read committed';
    sated boolean;
BEGIN
    FOR q IN SELECT DISTINCT i.queue FROM inserted i WHERE i.status = 'queued' LOOP
        IF fresh THEN
            -- Before the read (a statement of its own: the read's snapshot must be
            -- taken after it), and held to the commit: the dispatchers' barrier.
            PERFORM pg_advisory_xact_lock_shared(28275, hashtext(q));
            -- One probe of the queue's rows (and the '*' rows of SQL workers).
            SELECT count(*) FILTER (WHERE a.state = 'hungry') = 0
                   AND count(*) FILTER (WHERE a.state = 'draining' AND a.queue = q
                                          AND a.expires_at > statement_timestamp()) > 0
            INTO sated
            FROM notifyq.queue_appetite a
            WHERE a.queue IN (q, '*');
            IF sated THEN
                PERFORM nextval('notifyq.wakeups_skipped');
                CONTINUE;
            END IF;
        END IF;
        PERFORM pg_notify('notifyq_jobs', q);
        PERFORM nextval('notifyq.wakeups_sent');
    END LOOP;
    RETURN NULL;
END
$$;

-- A dispatcher states its appetite for its queues: hungry (after a short claim,
-- before notifyq.appetite_barrier), draining (after a full claim, for `ttl`),
-- or gone (state NULL: a graceful stop).  The same statement forgets the rows
-- of other consumers of these queues that can no longer claim: stopped, not
-- seen for a day, or (a serve process) whose liveness lock is free although it
-- registered one and whose heartbeat is a minute old (its session ended; a stale
-- hungry row would only cost notifications, a stale draining one expires anyway).  A minute's grace: a
-- consumer's row may come before its registry row.
CREATE OR REPLACE FUNCTION notifyq.set_appetite(
    claimant text, queues text[], state text, ttl interval DEFAULT interval '10 seconds'
) RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    IF state IS NULL THEN
        DELETE FROM notifyq.queue_appetite a WHERE a.claimant = claimant;
        RETURN;
    END IF;
    INSERT INTO notifyq.queue_appetite AS a (queue, claimant, state, since, expires_at)
    SELECT q, claimant, state, now(), CASE WHEN state = 'draining' THEN now() + ttl END
    FROM unnest(queues) AS q
    ON CONFLICT ON CONSTRAINT queue_appetite_pkey DO UPDATE
    SET state = excluded.state, since = excluded.since, expires_at = excluded.expires_at;
    DELETE FROM notifyq.queue_appetite a
    WHERE a.queue = ANY(queues || '{*}'::text[]) AND a.claimant <> claimant
      AND a.since < now() - interval '1 minute'
      AND NOT EXISTS (
          SELECT FROM notifyq.dispatchers d
          WHERE d.claimant = a.claimant AND d.stopped_at IS NULL
            -- An idle dispatcher that listens writes no heartbeat (schema version 15):
            -- its lock, held, says it lives however old its row.
            AND (greatest(d.heartbeat_at, d.alive_at) > now() - interval '1 day'
                 OR (d.liveness_lock AND notifyq.liveness_held(d.claimant)))
            -- Like the rescue, both signs of life must fail: the session's lock
            -- (free for a moment while its listener reconnects) and the registry's
            -- heartbeat.
            AND NOT (d.kind = 'serve' AND d.liveness_lock
                     AND d.heartbeat_at < now() - interval '1 minute'
                     -- Shared: two dispatchers testing at once do not see each
                     -- other's test as the owner's lock.
                     AND pg_try_advisory_xact_lock_shared(28274, hashtext(d.claimant))));
END
$$;
COMMENT ON FUNCTION notifyq.set_appetite(text, text[], text, interval) IS
    'A dispatcher''s appetite for its queues: hungry, draining (for ttl) or NULL (gone).';
REVOKE EXECUTE ON FUNCTION notifyq.set_appetite(text, text[], text, interval) FROM PUBLIC;

-- The barrier a dispatcher passes after committing its rows hungry and before
-- claiming again: every producer transaction that may have read them draining
-- has ended.  false: a producer transaction held a lock for longer than 20 ms
-- (the dispatcher tries again later).  Transaction-level, each in a block of its
-- own: when the lock is granted in the instant its timeout fires, PostgreSQL
-- both keeps it and raises the timeout, and only the block's rollback lets go
-- of it (a session-level lock would stay, and stop every producer of the queue).
-- The locks taken are held to the end of the caller's statement (autocommit):
-- with several queues, producers of the first may wait behind it for the
-- others' 20 ms.
CREATE OR REPLACE FUNCTION notifyq.appetite_barrier(queues text[]) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
-- The patience: new producers of the queue queue up behind the waiting barrier.
SET lock_timeout = '20ms'
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT DISTINCT u.q FROM unnest(queues) AS u(q) ORDER BY 1 LOOP
        BEGIN
            PERFORM pg_advisory_xact_lock(28275, hashtext(q));
        EXCEPTION WHEN lock_not_available THEN
            RETURN false;
        END;
    END LOOP;
    RETURN true;
END
$$;
COMMENT ON FUNCTION notifyq.appetite_barrier(text[]) IS
    'Wait (up to 20 ms) for producer transactions that may have read a queue''s '
    'appetite before it turned hungry; false if one is still open.';
REVOKE EXECUTE ON FUNCTION notifyq.appetite_barrier(text[]) FROM PUBLIC;

-- On every status change: notifyq_status gets one {"queue","status"} per
-- statement per pair (for monitors and waiters).  A job that became 'queued'
-- again (retry, re-queued dead job, rescued lease), or a queued job moved to
-- another queue or to an earlier run_at, wakes the dispatchers on
-- notifyq_jobs like an insert does.
CREATE OR REPLACE FUNCTION notifyq.notify_status_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(
        'notifyq_status',
        pg_catalog.json_build_object('queue', c.queue, 'status', c.status)::pg_catalog.text)
    FROM (SELECT DISTINCT n.queue, n.status
          FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.status IS DISTINCT FROM o.status) AS c;
    PERFORM pg_catalog.pg_notify('notifyq_jobs', r.queue)
    FROM (SELECT DISTINCT n.queue
          FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.status = 'queued'
            AND (o.status <> 'queued' OR o.queue <> n.queue OR n.run_at < o.run_at)) AS r;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_notify_inserted
    AFTER INSERT ON notifyq.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_inserted();

CREATE OR REPLACE TRIGGER jobs_notify_status_changed
    AFTER UPDATE ON notifyq.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_status_changed();

-- ---------------------------------------------------------------------------
-- Following a job

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

-- Dependencies
--
-- A job names the jobs it depends on in depends_on (ids of jobs that exist when
-- it is inserted).  It starts 'waiting' and becomes 'queued' when every one of
-- them has succeeded.  If one ends dead or cancelled, on_dependency_failure
-- decides: 'cancel' (the default) cancels it with a reason in last_error (which
-- cascades to its own dependents), 'run' queues it once all of them finished.
-- No polling: the statement that finishes a job releases its dependents, in
-- the same transaction.  Jobs without depends_on pay nothing: the BEFORE
-- INSERT trigger fires only for rows that have dependencies.
--
-- Cycles are impossible: a dependency must exist when its dependent is
-- inserted, and ids only grow, so a job can depend only on older jobs (and
-- never on itself).  depends_on is read at INSERT and whenever a dependency
-- finishes: do not change it afterwards.

-- The waiting jobs that depend on any of a set of jobs, for the release when
-- jobs finish: partial, so it holds only waiting rows, and GIN, so the lookup
-- (depends_on && finished ids) never scans the table.
CREATE INDEX IF NOT EXISTS jobs_waiting_idx
    ON notifyq.jobs USING gin (depends_on) WHERE status = 'waiting';

-- The status a job with these dependencies should have now, and why:
-- 'cancelled' with a reason when one of them ended dead or cancelled and the
-- policy is 'cancel'; 'waiting' while one has not finished; else 'queued'.
-- A dependency that no longer exists counts as finished: the INSERT trigger
-- refuses unknown ids, so one that is gone was deleted later, and purge
-- deletes finished jobs only.  Reads with the caller's snapshot.
CREATE OR REPLACE FUNCTION notifyq.dependency_status(
    depends_on bigint[], on_failure text, OUT status text, OUT reason text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    failed record;
BEGIN
    SELECT j.id, j.status INTO failed
    FROM notifyq.jobs j
    WHERE j.id = ANY(dependency_status.depends_on) AND j.status IN ('dead', 'cancelled')
    ORDER BY j.id
    LIMIT 1;
    IF FOUND AND on_failure = 'cancel' THEN
        status := 'cancelled';
        reason := format('cancelled: job %s, which this job depends on, %s', failed.id,
                         CASE failed.status WHEN 'dead' THEN 'ended dead' ELSE 'was cancelled' END);
    ELSIF EXISTS (SELECT FROM notifyq.jobs j
                  WHERE j.id = ANY(dependency_status.depends_on)
                    AND j.status NOT IN ('succeeded', 'dead', 'cancelled')) THEN
        status := 'waiting';
    ELSE
        status := 'queued';
    END IF;
END
$$;
COMMENT ON FUNCTION notifyq.dependency_status(bigint[], text) IS
    'Internal: the status (queued, waiting or cancelled, with the reason) that a job with '
    'these dependencies and this on_dependency_failure policy should have now.';

-- BEFORE INSERT, only for rows with dependencies (the trigger's WHEN): checks
-- that every dependency exists and sets the row's initial status.  It takes no
-- lock: a producer's transaction, however long it stays open, holds nothing a
-- dispatcher needs (the INSERT's own row is invisible to everyone else).
--
-- The race that leaves: a dependency finishing while its dependent's
-- transaction is open.  The finishing transaction releases the dependents it can
-- see; a dependent whose transaction has not committed is invisible to it and
-- would wait forever.  So a constraint trigger deferred to the producer's COMMIT
-- (dependencies_on_commit, below) looks again at every dependent still waiting:
-- it locks its dependencies FOR SHARE, which conflicts with the FOR NO KEY
-- UPDATE lock every status UPDATE takes (FOR KEY SHARE would not), and reads
-- their status in a new statement.  Under READ COMMITTED (the dispatchers'):
--   * finished before the COMMIT: the new snapshot sees it, and the trigger gives
--     the dependent the status the dependency calls for, as the release would;
--   * finishing during the COMMIT (its UPDATE holds the row): the lock waits until
--     that transaction ends, then the snapshot sees the dependency finished;
--   * finishing after the lock: the finishing UPDATE meets the lock (a
--     dispatcher's completion skips the row and tries again; anyone else waits),
--     and only after this transaction committed does its release trigger run,
--     with a snapshot that sees the committed dependent.
-- The lock lives from the check to the end of the COMMIT, not for the life of
-- the transaction, unless the producer runs SET CONSTRAINTS ... IMMEDIATE or
-- PREPARE TRANSACTION: then from the check to COMMIT (PREPARED), and the jobs
-- it depends on wait that long to be finished.  Locks are taken in id order, as
-- everywhere a statement locks many rows.
--
-- SECURITY DEFINER: a producer may INSERT jobs but neither read them nor lock
-- them (a row lock needs UPDATE privilege), and both triggers must.  The pinned
-- search_path costs only rows that have dependencies.
CREATE OR REPLACE FUNCTION notifyq.dependencies_on_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found bigint[];
    missing bigint;
    initial record;
BEGIN
    SELECT array_agg(j.id) INTO found FROM notifyq.jobs j WHERE j.id = ANY(NEW.depends_on);
    SELECT d.id INTO missing
    FROM unnest(NEW.depends_on) AS d(id)
    WHERE found IS NULL OR NOT d.id = ANY(found)
    LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'notifyq: job depends on job %, which does not exist', missing
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'depends_on names jobs inserted before this one (committed, or '
                         'earlier in the same transaction).';
    END IF;
    IF NEW.status = 'queued' THEN
        initial := notifyq.dependency_status(NEW.depends_on, NEW.on_dependency_failure);
        NEW.status := initial.status;
        IF initial.status = 'cancelled' THEN
            NEW.last_error := initial.reason;
            NEW.finished_at := now();
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER jobs_dependencies_on_insert
    BEFORE INSERT ON notifyq.jobs
    FOR EACH ROW
    WHEN (NEW.depends_on IS NOT NULL AND cardinality(NEW.depends_on) > 0)
    EXECUTE FUNCTION notifyq.dependencies_on_insert();

-- At the producer's COMMIT, once per job inserted 'waiting' (the WHEN): the
-- second look described above.  The UPDATE it may run fires the release
-- trigger like any other, so a cancellation cascades to the jobs this
-- transaction made depend on this one.
CREATE OR REPLACE FUNCTION notifyq.dependencies_on_commit() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    job record;
    locked bigint[];
    now_due record;
BEGIN
    -- The row as it is now: this transaction may have changed it since (a cascade).
    SELECT j.status, j.depends_on, j.on_dependency_failure INTO job
    FROM notifyq.jobs j WHERE j.id = NEW.id;
    IF NOT FOUND OR job.status <> 'waiting' THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(l.id) INTO locked
    FROM (SELECT j.id FROM notifyq.jobs j WHERE j.id = ANY(job.depends_on)
          ORDER BY j.id FOR SHARE) AS l;
    -- A new statement: its snapshot sees what the locks waited for.
    now_due := notifyq.dependency_status(job.depends_on, job.on_dependency_failure);
    IF now_due.status <> 'waiting' THEN
        UPDATE notifyq.jobs j
        SET status = now_due.status,
            last_error = coalesce(now_due.reason, j.last_error),
            finished_at = CASE WHEN now_due.status = 'cancelled' THEN now() END
        WHERE j.id = NEW.id AND j.status = 'waiting';
    END IF;
    RETURN NULL;
END
$$;

-- A constraint trigger cannot be replaced in place.
DROP TRIGGER IF EXISTS jobs_dependencies_on_commit ON notifyq.jobs;
CREATE CONSTRAINT TRIGGER jobs_dependencies_on_commit
    AFTER INSERT ON notifyq.jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.status = 'waiting' AND NEW.depends_on IS NOT NULL
          AND cardinality(NEW.depends_on) > 0)
    EXECUTE FUNCTION notifyq.dependencies_on_commit();

-- AFTER UPDATE, once per statement: when jobs finished (succeeded, dead,
-- cancelled), the waiting jobs that depend on them get the status their
-- dependencies now call for, in the same transaction.  waiting -> queued wakes
-- the dispatchers through jobs_notify_status_changed.
--
-- Cancellation cascades: the jobs waiting (under 'cancel') on a job cancelled
-- here, and the ones waiting on those, and so on, are found level by level in
-- a loop and cancelled by the same UPDATE.  Letting the UPDATE's own trigger
-- do the next level instead would nest one trigger call per level, and a chain
-- of a few hundred jobs would exceed max_stack_depth (and fail the statement
-- that finished the first job).  That UPDATE fires this trigger once more, for
-- the 'run' jobs waiting on the cancelled ones: at most three calls deep.
--
-- Two jobs finishing in concurrent transactions, with a dependent waiting for
-- both: each would see the other still running and leave the dependent waiting
-- forever.  So the dependents are locked first (FOR UPDATE, in id order): the
-- second transaction waits for the first to end, and its next statement (with
-- a new snapshot) sees the first one's job finished.
--
-- SECURITY DEFINER, like the INSERT trigger: whoever finishes a job (a
-- dispatcher, an operator's UPDATE) needs no right on the helper function.
-- The pinned search_path is one setting per statement, not per row.
CREATE OR REPLACE FUNCTION notifyq.release_dependents() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    finished bigint[];
    dependents bigint[];
    released bigint[];
    doomed bigint[];
    reasons text[];
    frontier bigint[];
    more bigint[];
    more_reasons text[];
BEGIN
    SELECT array_agg(n.id) INTO finished
    FROM new_rows n
    WHERE n.status IN ('succeeded', 'dead', 'cancelled');
    IF finished IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(l.id) INTO dependents
    FROM (SELECT j.id FROM notifyq.jobs j
          WHERE j.status = 'waiting' AND j.depends_on && finished
          ORDER BY j.id FOR UPDATE) AS l;
    IF dependents IS NULL THEN
        RETURN NULL;
    END IF;
    -- A new statement, so a new snapshot: it sees what the locks waited for.
    SELECT array_agg(j.id) FILTER (WHERE s.status = 'queued'),
           array_agg(j.id) FILTER (WHERE s.status = 'cancelled'),
           array_agg(s.reason) FILTER (WHERE s.status = 'cancelled')
    INTO released, doomed, reasons
    FROM notifyq.jobs j
    CROSS JOIN LATERAL notifyq.dependency_status(j.depends_on, j.on_dependency_failure) AS s
    WHERE j.id = ANY(dependents);
    frontier := doomed;
    WHILE frontier IS NOT NULL LOOP
        SELECT array_agg(l.id), array_agg(l.reason) INTO more, more_reasons
        FROM (SELECT j.id,
                     format('cancelled: job %s, which this job depends on, was cancelled',
                            (SELECT min(d) FROM unnest(j.depends_on) AS d WHERE d = ANY(frontier)))
                         AS reason
              FROM notifyq.jobs j
              WHERE j.status = 'waiting' AND j.depends_on && frontier
                AND j.on_dependency_failure = 'cancel' AND NOT j.id = ANY(doomed)
              ORDER BY j.id FOR UPDATE) AS l;
        doomed := doomed || more;
        reasons := reasons || more_reasons;
        frontier := more;
    END LOOP;
    UPDATE notifyq.jobs j
    SET status = c.status,
        last_error = coalesce(c.reason, j.last_error),
        finished_at = CASE WHEN c.status = 'cancelled' THEN now() END
    FROM (SELECT r.id, 'queued' AS status, NULL AS reason FROM unnest(released) AS r(id)
          UNION ALL
          SELECT d.id, 'cancelled', d.reason FROM unnest(doomed, reasons) AS d(id, reason))
         AS c
    WHERE j.id = c.id AND j.status = 'waiting';
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_release_dependents
    AFTER UPDATE ON notifyq.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.release_dependents();

-- ---------------------------------------------------------------------------
-- Keys beyond unfinished jobs
--
-- A dedupe_key alone holds while its job is unfinished (jobs_dedupe_idx).  Two
-- columns, both NULL by default and both needing a dedupe_key, change what
-- another INSERT with the key meets:
--
--   unique_for    the key is also held for this long after the job was enqueued
--                 (now() of the INSERT), even once the job finished: an INSERT
--                 with the key and unique_for inserts nothing while that window
--                 lasts.  A sliding window from the enqueue that opened it, not a
--                 fixed bucket: "at most one job per hour per key" must not allow
--                 two jobs a second apart across a bucket's edge.  A refused
--                 INSERT does not open or extend a window.
--   on_duplicate  'replace': while a queued (or waiting) job inserted with
--                 'replace' too holds the key, the INSERT inserts nothing and
--                 gives that job its payload and run_at instead (debounce).  While
--                 the holder runs, it may have read its payload already: the
--                 INSERT goes in as a new job, and the running job gives up the
--                 key to it.  A holder inserted without 'replace' is never
--                 changed: the key's own rule refuses the row.  'refuse' (or
--                 NULL) is the dedupe_key's own rule.
--
-- Refused and replaced rows are dropped by the BEFORE INSERT trigger below
-- (RETURN NULL), with or without ON CONFLICT: the INSERT reports fewer rows and
-- `RETURNING id` returns none, as ON CONFLICT DO NOTHING does for a dedupe_key.
-- The two are not combined (a window that replaces is a throttle, a feature of
-- its own).

-- One row per key whose window was opened: the job that opened it and when it
-- ends.  Written only for a row that went in (jobs_unique_window_opened).  Rows
-- whose window ended are deleted by retention (notifyq.expire_unique_windows) or
-- reused by the key's next window.
CREATE TABLE IF NOT EXISTS notifyq.unique_windows (
    dedupe_key text        PRIMARY KEY,
    job_id     bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);
COMMENT ON TABLE notifyq.unique_windows IS
    'The open unique_for windows: no job with dedupe_key is inserted before expires_at. '
    'Kept by the insert trigger and retention: read it, do not write it.';
-- Retention finds the windows that ended without reading the others.
CREATE INDEX IF NOT EXISTS unique_windows_expires_idx ON notifyq.unique_windows (expires_at);

-- BEFORE INSERT, only for rows with unique_for or on_duplicate = 'replace' (the
-- trigger's WHEN): every other INSERT pays nothing.  Its name sorts before
-- jobs_dependencies_on_insert, so a refused row costs no dependency check.
--
-- Race-free under concurrent producers in READ COMMITTED (the default):
--   unique_for: a transaction-level advisory lock on the key (28279, hashtext
--     of it) orders the producers of one key until each commits; the window is
--     then read with a new snapshot, which sees every earlier producer's window.
--     So one job per window, however many producers race.  An unfinished job
--     holding the key (jobs_dedupe_idx) refuses the row too.  The window is
--     written only once the row is in (AFTER INSERT, open_unique_window): a row
--     dropped after this trigger, by ON CONFLICT on jobs_dedupe_idx (a job of
--     the key not committed yet when it looked: a producer not using unique_for,
--     a dead job retried), opens no window.
--   replace: the same lock on the key orders the replacing producers of one
--     key until each commits; the
--     holder is then read (a new snapshot: it sees every earlier producer's
--     job) and locked FOR NO KEY UPDATE, as a completion locks it.  A claim
--     skips the locked row (SKIP LOCKED) and takes it, with the new payload,
--     once this transaction ends; a claim that locked it first makes this wait,
--     and then the holder is running.  So the last producer's payload is the
--     one that runs.
-- In REPEATABLE READ or SERIALIZABLE a producer that meets a concurrent change
-- fails with a serialization error (retry the transaction); replace can insert
-- a second job there, which jobs_dedupe_idx refuses.  Producers that use one key
-- with and without these columns are not ordered against each other: use a key
-- one way.  Several keys used in one transaction are locked in the order
-- given: two transactions giving them in different orders can deadlock (one is
-- cancelled).
--
-- SECURITY DEFINER: a producer may neither read nor lock jobs, nor write the
-- windows.  The pinned search_path costs only the rows that use the feature.
CREATE OR REPLACE FUNCTION notifyq.dedupe_on_insert() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    holder record;
    window_ends timestamptz;
BEGIN
    -- Every row a CHECK refuses goes on to it, even while a window would drop it.
    IF NEW.dedupe_key IS NULL OR char_length(NEW.dedupe_key) > 255
       OR (NEW.unique_for IS NOT NULL AND NEW.on_duplicate = 'replace')
       OR NEW.unique_for <= interval '0' OR NEW.unique_for > interval '10 years'
       OR NEW.on_duplicate NOT IN ('refuse', 'replace') THEN
        RETURN NEW;  -- the CHECK constraints refuse it, with their names
    END IF;
    IF NEW.on_duplicate = 'replace' THEN
        PERFORM pg_advisory_xact_lock(28279, hashtext(NEW.dedupe_key));
        -- Only a job enqueued to be replaced is: one whose producer chose the key's
        -- own rule keeps its payload, run_at and key, whoever inserts the key next
        -- (the producer role may not change jobs).  Then jobs_dedupe_idx refuses this
        -- row, as it refuses any duplicate of that key.
        SELECT j.id, j.status, j.task, j.rate_reserved, j.attempts INTO holder
        FROM notifyq.jobs j
        WHERE j.dedupe_key = NEW.dedupe_key AND j.status NOT IN ('succeeded', 'dead', 'cancelled')
          AND j.on_duplicate = 'replace'
        FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN NEW;
        END IF;
        IF holder.task <> NEW.task THEN
            RAISE EXCEPTION 'notifyq: dedupe_key % is held by job %, of task %, not %',
                pg_catalog.quote_literal(NEW.dedupe_key), holder.id, holder.task, NEW.task
                USING ERRCODE = 'check_violation',
                      HINT = 'on_duplicate = ''replace'' replaces the payload of a job of '
                             'the same task: give each task keys of its own.';
        END IF;
        IF holder.status IN ('queued', 'waiting') THEN
            -- A job already attempted (queued again for its retry's backoff) or given a
            -- rate limit's slot keeps the later run_at: replacing never runs it sooner
            -- than its backoff or its slot.  Moved past its slot, it gives the slot up:
            -- a reserved job starts when due without the rate check, so keeping the
            -- flag would start it at a time the rate limit never granted.  The
            -- checkpoint belonged to the old payload.
            UPDATE notifyq.jobs j
            SET payload = NEW.payload,
                run_at = CASE WHEN holder.rate_reserved OR holder.attempts > 0
                              THEN greatest(j.run_at, NEW.run_at) ELSE NEW.run_at END,
                rate_reserved = j.rate_reserved AND NEW.run_at <= j.run_at,
                checkpoint = NULL
            WHERE j.id = holder.id;
            RETURN NULL;
        END IF;
        -- Running: the new payload needs a run of its own, and takes over the key.
        UPDATE notifyq.jobs j SET dedupe_key = NULL, on_duplicate = NULL WHERE j.id = holder.id;
        RETURN NEW;
    END IF;
    -- unique_for.  In REPEATABLE READ the reads below keep the transaction's
    -- snapshot: a window or job committed meanwhile is met by the window's write or
    -- the key's index instead, which raise a serialization error.
    PERFORM pg_advisory_xact_lock(28279, hashtext(NEW.dedupe_key));
    SELECT w.expires_at INTO window_ends
    FROM notifyq.unique_windows w WHERE w.dedupe_key = NEW.dedupe_key;
    IF FOUND AND window_ends > now() THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT FROM notifyq.jobs j
               WHERE j.dedupe_key = NEW.dedupe_key
                 AND j.status NOT IN ('succeeded', 'dead', 'cancelled')) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;  -- open_unique_window opens the key's next window, once the row is in
END
$$;

CREATE OR REPLACE TRIGGER jobs_dedupe_on_insert
    BEFORE INSERT ON notifyq.jobs
    FOR EACH ROW
    WHEN (NEW.unique_for IS NOT NULL OR NEW.on_duplicate = 'replace')
    EXECUTE FUNCTION notifyq.dedupe_on_insert();

-- AFTER INSERT, only for rows with unique_for: the row went in (no ON CONFLICT
-- dropped it), so it opens its key's window, or the next one where one ended.
-- The key's lock, taken by dedupe_on_insert and held to the commit, keeps
-- every other producer of the key away meanwhile.
CREATE OR REPLACE FUNCTION notifyq.open_unique_window() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO notifyq.unique_windows AS w (dedupe_key, job_id, expires_at)
    VALUES (NEW.dedupe_key, NEW.id, now() + NEW.unique_for)
    ON CONFLICT (dedupe_key) DO UPDATE
    SET job_id = excluded.job_id, expires_at = excluded.expires_at;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_unique_window_opened
    AFTER INSERT ON notifyq.jobs
    FOR EACH ROW
    WHEN (NEW.unique_for IS NOT NULL)
    EXECUTE FUNCTION notifyq.open_unique_window();

-- Retention: delete up to max_rows windows that ended (oldest first), skipping
-- rows an INSERT holds right now; returns how many.  A window that ended while
-- its job is unfinished holds nothing the job's dedupe_key does not.  SECURITY
-- DEFINER: the worker role runs it without any right on the table.
CREATE OR REPLACE FUNCTION notifyq.expire_unique_windows(max_rows integer) RETURNS integer
LANGUAGE sql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH ended AS (
        SELECT w.dedupe_key FROM notifyq.unique_windows w
        WHERE w.expires_at <= now()
        ORDER BY w.expires_at
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM notifyq.unique_windows w USING ended e
        WHERE w.dedupe_key = e.dedupe_key
        RETURNING 1
    )
    SELECT count(*)::integer FROM deleted
$$;
COMMENT ON FUNCTION notifyq.expire_unique_windows(integer) IS
    'Delete up to max_rows unique_for windows that ended; returns how many.';
REVOKE EXECUTE ON FUNCTION notifyq.expire_unique_windows(integer) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Results for dependents
--
-- The dependencies of job_id, in depends_on's order, each with its status and
-- result (NULL unless it succeeded; status NULL: deleted since).  For the worker
-- that runs the job, in any language: read when asked, so a claim pays nothing.
-- SECURITY INVOKER: it reads with the caller's rights, which the worker role has
-- (SELECT on notifyq.jobs).  Not through a job's token: a producer chooses
-- depends_on, so the token of its own job would show it the results of any job.
CREATE OR REPLACE FUNCTION notifyq.dependency_results(job_id bigint)
RETURNS TABLE (id bigint, status text, result jsonb)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT d.id, j.status, j.result
    FROM notifyq.jobs me
    CROSS JOIN LATERAL unnest(me.depends_on) WITH ORDINALITY AS d(id, n)
    LEFT JOIN notifyq.jobs j ON j.id = d.id
    WHERE me.id = $1
    ORDER BY d.n
$$;
COMMENT ON FUNCTION notifyq.dependency_results(bigint) IS
    'The dependencies of a job, in depends_on order: id, status and result (for a worker: '
    'needs SELECT on notifyq.jobs).';
REVOKE EXECUTE ON FUNCTION notifyq.dependency_results(bigint) FROM PUBLIC;

-- Operations
--
-- What `notifyq watch`, the admin commands and the dispatcher registry need.
-- Every admin action is a plain SQL function, so any language (or psql) can do
-- what the CLI does.  EXECUTE on them is revoked from PUBLIC: grant it to the
-- roles that may operate the queue.  They pin search_path to pg_catalog (pg_temp
-- last), so no function, operator or type from another schema can stand in for
-- a built-in while an operator (often the owner) runs them.

-- Finished rows by finish time: "succeeded/dead in the last minute" for
-- monitors, and purge's range scan (never a scan of the whole table).
CREATE INDEX IF NOT EXISTS jobs_finished_idx
    ON notifyq.jobs (finished_at) INCLUDE (queue, status)
    WHERE status IN ('succeeded', 'dead', 'cancelled');
-- The dead-letter queue per queue, counted on every monitor refresh.
CREATE INDEX IF NOT EXISTS jobs_dead_idx
    ON notifyq.jobs (queue, finished_at) WHERE status = 'dead';
-- Jobs that have failed at least once, by their last start: small while jobs
-- succeed at the first attempt, so it costs the usual path nothing.
CREATE INDEX IF NOT EXISTS jobs_failed_idx
    ON notifyq.jobs (started_at) INCLUDE (queue, status)
    WHERE last_error IS NOT NULL;

-- One row per `notifyq serve` process: written at start, refreshed on every
-- lease heartbeat (with the number of jobs it holds), marked stopped on a
-- graceful exit.  A row whose heartbeat is older than three heartbeat
-- intervals belongs to a process that died or lost the database (see
-- notifyq.dispatcher_status); rows of stopped and lost dispatchers are deleted
-- by the live dispatchers' upkeep a day later.
CREATE TABLE IF NOT EXISTS notifyq.dispatchers (
    claimant     text        PRIMARY KEY,  -- host:pid:random, as in jobs.claimed_by
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    queues       text[]      NOT NULL,
    concurrency  integer     NOT NULL,
    running      integer     NOT NULL DEFAULT 0,  -- jobs claimed, outcome not yet written
    heartbeat    float8      NOT NULL,  -- seconds between two heartbeats of this process
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at   timestamptz,
    -- The dispatcher holds the session-level advisory lock (28274,
    -- hashtext(claimant)) on one connection for as long as it lives, so
    -- PostgreSQL releases it the moment that connection dies (kill -9, crash, a
    -- terminated backend).  alive_at: the last sign of life its lease keeper
    -- wrote (a beat a second while it holds jobs, from another connection).  See
    -- notifyq.rescue_jobs.
    liveness_lock boolean     NOT NULL DEFAULT false,
    alive_at      timestamptz,
    -- The tasks the dispatcher has handlers for; NULL (a dispatcher older than
    -- schema version 8) means any task.
    tasks         text[],
    -- serve: a `notifyq serve` process; sql: a worker using the SQL worker
    -- protocol (notifyq.claim), which writes this row through the functions.
    kind          text        NOT NULL DEFAULT 'serve',
    CONSTRAINT dispatchers_kind_valid CHECK (kind IN ('serve', 'sql'))
);
COMMENT ON TABLE notifyq.dispatchers IS
    'One row per notifyq serve process, kept by the dispatchers themselves: read it, do not write it.';

-- Whether the session-level liveness lock of `claimant` is held right now, by
-- any session of this database (pg_locks: the lock table, no table read).  A
-- rescuer trying the lock holds it for one statement too; that instant aside,
-- held means the dispatcher's listening connection is open.
CREATE OR REPLACE FUNCTION notifyq.liveness_held(claimant text) RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.database = (SELECT db.oid FROM pg_database db
                            WHERE db.datname = current_database())
          AND l.classid = 28274
          AND l.objid = hashtext(liveness_held.claimant)::oid
          AND l.objsubid = 2)
$$;
COMMENT ON FUNCTION notifyq.liveness_held(text) IS
    'Whether the liveness lock of this dispatcher (or SQL worker) is held: its session is open.';

-- The columns are named: a view's `*` is expanded when it is created, so a column
-- added to the table later would be missing from the view of a migrated database.
-- A dispatcher is running while its heartbeat is fresh, or, listening, while
-- its liveness lock is held: an idle one that listens never beats.
CREATE OR REPLACE VIEW notifyq.dispatcher_status AS
SELECT d.claimant, d.host, d.pid, d.queues, d.concurrency, d.running, d.heartbeat,
       d.started_at, d.heartbeat_at, d.stopped_at,
       CASE WHEN d.stopped_at IS NOT NULL THEN 'stopped'
            WHEN greatest(d.heartbeat_at, d.alive_at)
                 >= now() - make_interval(secs => 3 * d.heartbeat) THEN 'running'
            WHEN d.liveness_lock AND notifyq.liveness_held(d.claimant) THEN 'running'
            ELSE 'lost' END AS state,
       d.tasks, d.kind
FROM notifyq.dispatchers d;
COMMENT ON VIEW notifyq.dispatcher_status IS
    'notifyq.dispatchers with a state: running, stopped (graceful exit) or lost '
    '(no heartbeat for three intervals and no liveness lock held: killed, hung or cut off '
    'from the database).';

-- Whether a rescue sweep has anything to look at: a running job whose lease
-- expired, or a suspect of notifyq.rescue_jobs (a claimant other than `me`
-- with a liveness lock, a sign of life within a day and running jobs) whose
-- lock is free.  The listening connection of an idle dispatcher asks this at
-- every fallback poll instead of sweeping; it sweeps when the answer is yes.
CREATE OR REPLACE FUNCTION notifyq.rescue_due(me text) RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM notifyq.jobs j
                   WHERE j.status = 'running' AND j.lease_expires_at < now())
        OR EXISTS (SELECT FROM notifyq.dispatchers r
                   WHERE r.liveness_lock AND r.claimant <> rescue_due.me
                     AND r.stopped_at IS NULL
                     AND greatest(r.heartbeat_at, r.alive_at) >= now() - interval '1 day'
                     AND EXISTS (SELECT FROM notifyq.jobs j
                                 WHERE j.status = 'running' AND j.claimed_by = r.claimant)
                     AND NOT notifyq.liveness_held(r.claimant))
$$;
COMMENT ON FUNCTION notifyq.rescue_due(text) IS
    'Whether notifyq.rescue_jobs would find something to look at: an expired lease, or a '
    'dispatcher with running jobs whose liveness lock is free.';

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
-- The suspects come from the registry: no beat for session_grace, a sign of
-- life (heartbeat or beat) within a day (an idle listening dispatcher writes
-- neither; it holds nothing to rescue), and running jobs (one probe of the
-- running rows each; a dead one's row, left for a day, costs only that).  A
-- live one holds its lock, which costs one try; only a dead one's running jobs
-- are read.  So a sweep costs next to nothing however many jobs run, and
-- every dispatcher can sweep twice a second.
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
    distrusted integer := 0;
    by_session boolean := trust_sessions
        AND now() >= pg_postmaster_start_time() + restart_grace;
BEGIN
    FOR d IN
        SELECT r.claimant
        FROM notifyq.dispatchers r
        WHERE r.liveness_lock AND r.claimant <> rescue_jobs.me
          AND r.stopped_at IS NULL
          AND coalesce(r.alive_at, '-infinity') < now() - session_grace
          AND greatest(r.heartbeat_at, r.alive_at) >= now() - interval '1 day'
          AND EXISTS (SELECT FROM notifyq.jobs j
                      WHERE j.status = 'running' AND j.claimed_by = r.claimant)
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
            -- Sessions not trusted now (an outage): watched until it beats again.
            distrusted := distrusted + (NOT by_session)::integer;
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
    -- Counted after the rescue (what it re-queued is no longer anyone's): peers beating,
    -- or that claimed jobs just now.  The latter covers a dispatcher that started right
    -- after a peer took its jobs: it may sweep before the peer's first beat, and no
    -- status change of the peer's may come to poke it.  (A frozen peer, which neither
    -- beats nor claims, is left to its leases.)
    SELECT count(*) + distrusted INTO counted
    FROM notifyq.dispatchers r
    WHERE r.liveness_lock AND r.claimant <> rescue_jobs.me AND r.stopped_at IS NULL
      AND (r.alive_at >= now() - 2 * session_grace
           OR EXISTS (SELECT FROM notifyq.jobs j
                      WHERE j.status = 'running' AND j.claimed_by = r.claimant
                        AND j.started_at > now() - 2 * session_grace));
    RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::text, counted;
END
$$;
COMMENT ON FUNCTION notifyq.rescue_jobs(text, interval, interval, boolean, integer) IS
    'Re-queue (or send dead) running jobs whose dispatcher''s database session ended (its '
    'liveness lock free and no sign of life for session_grace) or whose lease expired; '
    'returns them, then a row with id NULL and how many other live claimants are watched.';
-- The status of job id, its row locked for the caller's update; raises when
-- there is no such job.  Shared by retry_job and cancel_job.
CREATE OR REPLACE FUNCTION notifyq.lock_job(id bigint) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was text;
BEGIN
    SELECT j.status INTO was FROM notifyq.jobs j WHERE j.id = lock_job.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'notifyq: no job with id %', lock_job.id
            USING ERRCODE = 'no_data_found', HINT = 'List jobs with: notifyq jobs list';
    END IF;
    RETURN was;
END
$$;
COMMENT ON FUNCTION notifyq.lock_job(bigint) IS
    'Internal to retry_job and cancel_job: the job''s status, row locked; raises for an unknown id.';

-- Run one job again, now.  dead or cancelled: queued with attempts from 0
-- (or waiting, if jobs it depends on have not finished; refused while one of
-- them is dead or cancelled: retry that one first); queued (scheduled, or
-- waiting for a retry's backoff): only run_at moves.  A waiting job cannot be
-- retried.  last_error is kept.  Returns the status the job had.
CREATE OR REPLACE FUNCTION notifyq.retry_job(id bigint) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was text := notifyq.lock_job(retry_job.id);
    deps bigint[];
    policy text;
    next record;
BEGIN
    IF was IN ('running', 'succeeded', 'waiting') THEN
        RAISE EXCEPTION 'notifyq: job % is %: it cannot be retried', retry_job.id, was
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = CASE WHEN was = 'running'
                              THEN 'It is running now; cancel it first to stop it.'
                              WHEN was = 'waiting'
                              THEN 'It runs when the jobs it depends on have succeeded.'
                              ELSE 'It has succeeded; enqueue a new job instead.' END;
    END IF;
    SELECT j.depends_on, j.on_dependency_failure INTO deps, policy
    FROM notifyq.jobs j WHERE j.id = retry_job.id;
    next := notifyq.dependency_status(deps, policy);
    IF next.status = 'cancelled' THEN
        RAISE EXCEPTION 'notifyq: job % cannot be retried: %', retry_job.id,
                        replace(next.reason, 'cancelled: ', '')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Retry the jobs it depends on first.';
    END IF;
    UPDATE notifyq.jobs j
    SET status = next.status,
        run_at = now(),
        attempts = CASE WHEN was = 'queued' THEN j.attempts ELSE 0 END,
        started_at = CASE WHEN was = 'queued' THEN j.started_at END,
        finished_at = NULL
    WHERE j.id = retry_job.id;
    RETURN was;
END
$$;
COMMENT ON FUNCTION notifyq.retry_job(bigint) IS
    'Run job id now: dead or cancelled -> queued with attempts reset to 0 (waiting, if jobs it '
    'depends on have not finished); queued -> run_at now(). Keeps last_error. Returns the '
    'previous status; raises for an unknown id, a running, succeeded or waiting job, or one '
    'whose dependency is dead or cancelled.';

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

-- Cancel one job.  queued or waiting: it never runs.  running: marked cancelled at once;
-- the status trigger's notification tells the dispatcher running it, which
-- interrupts an async handler and tells a sync one (JobContext.cancelled);
-- whatever the handler does, nothing more is written: no retry, no second
-- status change.  A plain UPDATE to 'cancelled' does the same.
CREATE OR REPLACE FUNCTION notifyq.cancel_job(id bigint) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    was text := notifyq.lock_job(cancel_job.id);
BEGIN
    IF was NOT IN ('queued', 'running', 'waiting') THEN
        RAISE EXCEPTION 'notifyq: job % is already %: it cannot be cancelled', cancel_job.id, was
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only queued, waiting and running jobs can be cancelled.';
    END IF;
    UPDATE notifyq.jobs j
    SET status = 'cancelled', finished_at = now(), claimed_by = NULL, lease_expires_at = NULL
    WHERE j.id = cancel_job.id;
    RETURN was;
END
$$;
COMMENT ON FUNCTION notifyq.cancel_job(bigint) IS
    'Cancel job id: queued or waiting -> cancelled (it never runs); running -> cancelled at '
    'once (the dispatcher running it interrupts its handler; nothing more is written). Jobs '
    'that depend on it are cancelled too, unless their on_dependency_failure is run. Returns '
    'the previous status; raises for an unknown id or a finished job.';

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

-- History: one row per status transition (and one per insert), written by two
-- statement triggers in the writer's transaction, so the record and the change
-- commit or vanish together.  `notifyq.set_history(false)` disables the
-- triggers where throughput matters more than the audit trail.  Rows go with
-- their job: purge deletes both.
CREATE TABLE IF NOT EXISTS notifyq.job_history (
    job_id      bigint      NOT NULL,
    id          bigint      GENERATED ALWAYS AS IDENTITY,
    at          timestamptz NOT NULL DEFAULT now(),
    from_status text,                -- NULL: the job was inserted
    to_status   text        NOT NULL,
    attempt     integer     NOT NULL,  -- the job's attempts after the change
    error       text,                -- last_error, when this change set it
    dispatcher  text,                -- the claimant involved (claiming, or releasing)
    PRIMARY KEY (job_id, id)
);
COMMENT ON TABLE notifyq.job_history IS
    'Every status change of every job (time, from, to, attempt, error), kept by triggers; '
    'switch with notifyq.set_history(boolean).';

-- SECURITY DEFINER: whoever changes a job (a producer, a dispatcher, an
-- operator) gets its history written without any right on job_history, so no
-- one but the owner can write (or forge) the audit trail.
CREATE OR REPLACE FUNCTION notifyq.record_history() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO notifyq.job_history (job_id, from_status, to_status, attempt)
        SELECT n.id, NULL, n.status, n.attempts FROM new_rows n;
    ELSE
        INSERT INTO notifyq.job_history (job_id, from_status, to_status, attempt, error, dispatcher)
        SELECT n.id, o.status, n.status, n.attempts,
               CASE WHEN n.last_error IS DISTINCT FROM o.last_error THEN n.last_error END,
               COALESCE(n.claimed_by, o.claimed_by)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status IS DISTINCT FROM o.status;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER jobs_history_inserted
    AFTER INSERT ON notifyq.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.record_history();

CREATE OR REPLACE TRIGGER jobs_history_changed
    AFTER UPDATE ON notifyq.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.record_history();

-- Switch the history on or off (both triggers at once); needs the table's owner.
-- Returns whether it is on now.
CREATE OR REPLACE FUNCTION notifyq.set_history(enabled boolean) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF enabled THEN
        ALTER TABLE notifyq.jobs ENABLE TRIGGER jobs_history_inserted;
        ALTER TABLE notifyq.jobs ENABLE TRIGGER jobs_history_changed;
    ELSE
        ALTER TABLE notifyq.jobs DISABLE TRIGGER jobs_history_inserted;
        ALTER TABLE notifyq.jobs DISABLE TRIGGER jobs_history_changed;
    END IF;
    RETURN enabled;
END
$$;
COMMENT ON FUNCTION notifyq.set_history(boolean) IS
    'Switch the status history (notifyq.job_history) on or off; run it as the owner of notifyq.jobs.';

-- Concurrency caps

-- At most max_running jobs of the queue run at once, cluster-wide (0 pauses the
-- queue).  A queue without a row has no cap.  Read by every claim through
-- notifyq.claim_room; change it at any time with plain SQL.
CREATE TABLE IF NOT EXISTS notifyq.queue_limits (
    queue       text    PRIMARY KEY,
    max_running integer NOT NULL,
    CONSTRAINT queue_limits_max_running_range CHECK (max_running BETWEEN 0 AND 1000000)
);
COMMENT ON TABLE notifyq.queue_limits IS
    'Concurrency caps: at most max_running jobs of the queue run at once across all '
    'dispatchers (0 pauses it). INSERT ... ON CONFLICT (queue) DO UPDATE to set, DELETE to lift.';
COMMENT ON CONSTRAINT queue_limits_max_running_range ON notifyq.queue_limits IS
    'max_running: 0 (paused) to 1000000';

-- A cap set, changed or lifted wakes the dispatchers serving the queue: those
-- that found it full ignore inserts into it until told it has room.  On
-- notifyq_internal (only dispatchers listen there), payload "limit:QUEUE".
CREATE OR REPLACE FUNCTION notifyq.notify_limit_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(
        'notifyq_internal', 'limit:' OPERATOR(pg_catalog.||) COALESCE(NEW.queue, OLD.queue));
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER queue_limits_changed
    AFTER INSERT OR UPDATE OR DELETE ON notifyq.queue_limits
    FOR EACH ROW EXECUTE FUNCTION notifyq.notify_limit_changed();

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

-- Periodic jobs (cron): one row per schedule; the dispatchers enqueue each of
-- its instants once, however many of them run (see periodic_fire in queries.sql).
CREATE TABLE IF NOT EXISTS notifyq.periodic (
    name         text        PRIMARY KEY,
    task         text        NOT NULL,
    -- A cron expression: five fields, or six with seconds first.
    schedule     text        NOT NULL,
    -- An IANA zone name: the schedule's fields are local times there.
    timezone     text        NOT NULL DEFAULT 'UTC',
    -- After downtime: 'skip' the missed instants, or run the latest one 'once'.
    missed       text        NOT NULL DEFAULT 'skip',
    queue        text        NOT NULL DEFAULT 'default',
    -- The job's payload is this object plus "instant" (the instant, ISO 8601 in UTC).
    payload      jsonb       NOT NULL DEFAULT '{}',
    priority     integer     NOT NULL DEFAULT 0,
    max_attempts integer,
    -- An operator's switch: a paused schedule enqueues nothing; its instants count as missed.
    paused       boolean     NOT NULL DEFAULT false,
    -- When schedule or timezone last changed: no instant before it is ever due.
    defined_at   timestamptz NOT NULL DEFAULT now(),
    -- The latest instant dealt with (enqueued, or skipped as missed); NULL before the first.
    last_instant timestamptz,

    CONSTRAINT periodic_name_format CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$'),
    CONSTRAINT periodic_task_format CHECK (task ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$'),
    CONSTRAINT periodic_schedule_format CHECK (schedule ~ '^\s*\S+(\s+\S+){4,5}\s*$'),
    CONSTRAINT periodic_timezone_known CHECK (
        pg_catalog.timezone(timezone, TIMESTAMPTZ '2000-01-01 00:00+00') IS NOT NULL),
    CONSTRAINT periodic_missed_valid CHECK (missed IN ('skip', 'once')),
    CONSTRAINT periodic_queue_format CHECK (queue ~ '^[a-z0-9_][a-z0-9_-]{0,62}$'),
    CONSTRAINT periodic_payload_object CHECK (
        pg_catalog.jsonb_typeof(payload) = 'object' AND NOT payload ? 'instant'),
    CONSTRAINT periodic_priority_range CHECK (priority BETWEEN -1000 AND 1000),
    CONSTRAINT periodic_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 1000)
);

COMMENT ON TABLE notifyq.periodic IS
    'notifyq periodic jobs: one row per schedule; every dispatcher enqueues its instants, each once. '
    'Pause with UPDATE notifyq.periodic SET paused = true WHERE name = ...';
COMMENT ON CONSTRAINT periodic_name_format ON notifyq.periodic IS
    'name: 1-200 characters of letters, digits, _ . : and -, starting with a letter or _';
COMMENT ON CONSTRAINT periodic_task_format ON notifyq.periodic IS
    'task: 1-200 characters of letters, digits, _ . : and -, starting with a letter or _';
COMMENT ON CONSTRAINT periodic_schedule_format ON notifyq.periodic IS
    'schedule: a cron expression of five fields, or six with seconds first';
COMMENT ON CONSTRAINT periodic_timezone_known ON notifyq.periodic IS
    'timezone: a time zone name PostgreSQL knows (an IANA name such as Europe/Paris)';
COMMENT ON CONSTRAINT periodic_missed_valid ON notifyq.periodic IS
    'missed: skip (instants missed during downtime are dropped) or once (the latest runs once)';
COMMENT ON CONSTRAINT periodic_queue_format ON notifyq.periodic IS
    'queue: 1-63 characters of a-z, 0-9, _ and -, not starting with -';
COMMENT ON CONSTRAINT periodic_payload_object ON notifyq.periodic IS
    'payload: a JSON object without the key instant, which each job gets';
COMMENT ON CONSTRAINT periodic_priority_range ON notifyq.periodic IS
    'priority: an integer from -1000 to 1000; higher runs first';
COMMENT ON CONSTRAINT periodic_max_attempts_range ON notifyq.periodic IS
    'max_attempts: NULL (the task''s setting) or an integer from 1 to 1000';

-- Rate limits

-- At most per_second jobs a second start per rate_key, with bursts of up to
-- `burst` at once.  The row whose rate_key is '*' applies to every key that has
-- no row of its own, each key separately ("10 a second per tenant").  A key
-- with neither is not limited.
CREATE TABLE IF NOT EXISTS notifyq.rate_limits (
    rate_key   text    PRIMARY KEY,
    per_second float8  NOT NULL,
    burst      integer NOT NULL DEFAULT 1,
    CONSTRAINT rate_limits_per_second_range CHECK (per_second > 0 AND per_second <= 1000000),
    CONSTRAINT rate_limits_burst_range CHECK (burst BETWEEN 1 AND 1000000)
);
COMMENT ON TABLE notifyq.rate_limits IS
    'Rate limits: at most per_second job starts a second per rate_key, bursts of up to burst; '
    'the row ''*'' applies to every key without a row of its own, each separately.';
COMMENT ON CONSTRAINT rate_limits_per_second_range ON notifyq.rate_limits IS
    'per_second: more than 0, at most 1000000';
COMMENT ON CONSTRAINT rate_limits_burst_range ON notifyq.rate_limits IS
    'burst: 1 to 1000000';

-- Per key, the generic cell rate algorithm's "theoretical arrival time": the
-- next start is on time once now() >= tat - (burst - 1) / per_second.  Written
-- only by notifyq.rate_admit, under the row's lock.
CREATE TABLE IF NOT EXISTS notifyq.rate_state (
    rate_key text        PRIMARY KEY,
    tat      timestamptz NOT NULL
);
COMMENT ON TABLE notifyq.rate_state IS
    'Internal to the rate limits (notifyq.rate_admit): read it, do not write it.';

-- The claim's rate check.  `ids` and `keys` are the claim's candidates that have
-- a rate_key and hold no slot yet, in claim order.  Returns the ones that may not
-- start now, each with the slot it gets: the claim moves their run_at there and
-- marks them rate_reserved, so they start at that time without queueing behind
-- the check again, and no dispatcher has to poll for them.  Keys are locked in
-- sorted order (rate_state's row lock, until the claim commits); each key's state
-- is read in a statement of its own (VOLATILE), so it sees every claim committed
-- before.  Keys without a limit are admitted as they are.
CREATE OR REPLACE FUNCTION notifyq.rate_admit(ids bigint[], keys text[])
RETURNS TABLE (id bigint, slot timestamptz)
LANGUAGE plpgsql
VOLATILE
ROWS 1  -- few jobs are deferred per claim: the planner joins them by primary key
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
    per float8;
    size integer;
    step interval;
    tolerance interval;
    next_at timestamptz;
    job bigint;
BEGIN
    FOR k IN SELECT DISTINCT u.key FROM unnest(keys) AS u(key) ORDER BY 1 LOOP
        SELECT l.per_second, l.burst INTO per, size
        FROM notifyq.rate_limits l
        WHERE l.rate_key IN (k, '*')
        ORDER BY l.rate_key = k DESC
        LIMIT 1;
        CONTINUE WHEN NOT FOUND;
        INSERT INTO notifyq.rate_state AS s (rate_key, tat) VALUES (k, '-infinity')
        ON CONFLICT (rate_key) DO NOTHING;
        SELECT s.tat INTO next_at FROM notifyq.rate_state s WHERE s.rate_key = k FOR UPDATE;
        step := make_interval(secs => 1.0 / per);
        tolerance := step * (size - 1);
        FOR job IN
            SELECT u.id FROM unnest(ids, keys) WITH ORDINALITY AS u(id, key, n)
            WHERE u.key = k ORDER BY u.n
        LOOP
            next_at := greatest(next_at, now());
            IF next_at - tolerance > now() THEN
                id := job;
                slot := next_at - tolerance;
                RETURN NEXT;
            END IF;
            next_at := next_at + step;
        END LOOP;
        UPDATE notifyq.rate_state s SET tat = next_at WHERE s.rate_key = k;
    END LOOP;
END
$$;
COMMENT ON FUNCTION notifyq.rate_admit(bigint[], text[]) IS
    'Internal to the claim: which of these rate-keyed candidates may not start now, and the '
    'slot each gets (notifyq.rate_limits, per key, across all dispatchers).';

-- Trigger functions need no EXECUTE privilege to fire; nobody calls them directly.
REVOKE EXECUTE ON FUNCTION notifyq.notify_inserted() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.notify_status_changed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.notify_events() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.set_events(text, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.job_status(bigint, uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.dependency_status(bigint[], text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.dependencies_on_insert() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.dependencies_on_commit() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.release_dependents() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.dedupe_on_insert() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.open_unique_window() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.lock_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.retry_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.retry_dead(text, text, text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.cancel_job(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.cancel_jobs(text[], text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.purge(interval, text[], text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.purge_batch(interval, text[], integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.purge_batch(interval, text[], integer, text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.record_history() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.set_history(boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.claim_room(text, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.rate_admit(bigint[], text[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.notify_limit_changed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.rescue_jobs(text, interval, interval, boolean, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.liveness_held(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.rescue_due(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.notify_pause_lifted() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.pause_queue(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.resume_queue(text, text) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Workers in any language

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
        timeout          interval,     -- notifyq.tasks.timeout, or NULL
        trace_context    jsonb         -- the job's (see notifyq.jobs), or NULL
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
    -- A SQL worker counts as hungry on its queues ('*': every queue), so inserts
    -- there always notify (notifyq.queue_appetite); a row already there is not
    -- written again.
    INSERT INTO notifyq.queue_appetite AS a (queue, claimant, state)
    SELECT q, worker, 'hungry'
    FROM unnest(coalesce(claim.queues, '{*}'::text[])) AS q
    WHERE q = '*' OR (q ~ '^[a-z0-9_][a-z0-9_-]*$' AND char_length(q) <= 63)
    ON CONFLICT ON CONSTRAINT queue_appetite_pkey DO NOTHING;
    RETURN QUERY
    SELECT c.id, c.queue, c.task, c.payload, c.attempt, c.max_attempts, c.checkpoint,
           c.lease_expires_at, t.timeout, c.trace_context
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
    DELETE FROM notifyq.queue_appetite a WHERE a.claimant = stop_worker.worker;
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

-- HTTP endpoints: tasks whose handler is a web endpoint that `notifyq serve`
-- POSTs each job to (docs/http.md has the delivery contract).  A row names
-- the task, its URL and how to call it; the signing secret is only named here
-- (its value lives in the dispatcher's environment or secrets file, never in the
-- database).  Only the schema owner writes this table, and whoever it grants
-- INSERT, UPDATE, DELETE to (an admin role): a role that could write it could
-- point every dispatcher at any address its network reaches (server-side request
-- forgery), so neither the producer nor the worker role may.
CREATE TABLE IF NOT EXISTS notifyq.endpoints (
    task            text             PRIMARY KEY,
    url             text             NOT NULL,
    timeout         double precision NOT NULL DEFAULT 30,
    max_concurrency integer,
    headers         jsonb            NOT NULL DEFAULT '{}',
    secret          text,
    updated_at      timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT endpoints_task_format CHECK (task ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$'),
    CONSTRAINT endpoints_url_scheme CHECK (url ~* '^https?://[^/?#]+' AND length(url) <= 2048),
    CONSTRAINT endpoints_timeout_range CHECK (timeout > 0 AND timeout <= 86400),
    CONSTRAINT endpoints_max_concurrency_range CHECK (max_concurrency >= 1),
    CONSTRAINT endpoints_headers_object CHECK (pg_catalog.jsonb_typeof(headers) = 'object'),
    CONSTRAINT endpoints_secret_format CHECK (secret ~ '^[A-Z0-9_]{1,64}$')
);
COMMENT ON TABLE notifyq.endpoints IS
    'HTTP tasks: notifyq serve POSTs each job of the task to url (docs/http.md). Written by '
    'the schema owner or an admin role only; secret names a signing secret the dispatcher '
    'reads from NOTIFYQ_SECRET_<secret>, never its value.';
COMMENT ON CONSTRAINT endpoints_task_format ON notifyq.endpoints IS
    'task: 1-200 characters of letters, digits, _ . : and -, starting with a letter or _';
COMMENT ON CONSTRAINT endpoints_url_scheme ON notifyq.endpoints IS
    'url: an http:// or https:// URL with a host, at most 2048 characters';
COMMENT ON CONSTRAINT endpoints_timeout_range ON notifyq.endpoints IS
    'timeout: seconds, more than 0 and at most 86400';
COMMENT ON CONSTRAINT endpoints_max_concurrency_range ON notifyq.endpoints IS
    'max_concurrency: NULL (no cap) or at least 1 request at once per dispatcher';
COMMENT ON CONSTRAINT endpoints_headers_object ON notifyq.endpoints IS
    'headers: a JSON object of header names to string values (checked by the dispatcher too)';
COMMENT ON CONSTRAINT endpoints_secret_format ON notifyq.endpoints IS
    'secret: the NAME of a signing secret, 1-64 characters of A-Z, 0-9 and _';

-- Any change tells the dispatchers to read the table again, on notifyq_internal
-- (only dispatchers listen there), payload "endpoints".  Per statement: one
-- message however many rows changed.
CREATE OR REPLACE FUNCTION notifyq.notify_endpoints_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('notifyq_internal', 'endpoints');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER endpoints_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON notifyq.endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_endpoints_changed();

REVOKE ALL ON notifyq.endpoints FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.notify_endpoints_changed() FROM PUBLIC;

-- Any change of a schedule (not the progress the dispatchers write, last_instant)
-- tells the dispatchers to read notifyq.periodic again, on notifyq_internal,
-- payload "periodic": while they listen, they read it only when an instant is
-- due or a change is announced, not every minute.
CREATE OR REPLACE FUNCTION notifyq.notify_periodic_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('notifyq_internal', 'periodic');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER periodic_changed
    AFTER INSERT OR DELETE OR TRUNCATE
       OR UPDATE OF name, task, schedule, timezone, missed, queue, payload, priority,
                    max_attempts, paused, defined_at
    ON notifyq.periodic
    FOR EACH STATEMENT EXECUTE FUNCTION notifyq.notify_periodic_changed();

REVOKE EXECUTE ON FUNCTION notifyq.notify_periodic_changed() FROM PUBLIC;

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

-- Every version this file contains, as the migrations would have recorded them.
INSERT INTO notifyq.schema_version (version) VALUES (1), (2), (3), (4), (5), (6), (7), (8), (9), (10),
    (11), (12), (13), (14), (15), (16), (17), (18), (19), (20)
ON CONFLICT (version) DO NOTHING;
