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
