-- Schema version 8: a dispatcher claims only jobs whose task it can run, along
-- an index that keeps each probe cheap whatever the backlog; the registry says
-- which tasks each dispatcher runs, so jobs nobody can run are reported.
-- schema.sql holds the same objects for new databases.
--
-- Both indexes are rebuilt inside the migration's transaction: on a table with
-- a large backlog, claims wait for the build (a few seconds per million rows).

-- Claimable rows, in claim order per (queue, task): the claim probes one
-- (queue, task) pair at a time, so jobs of tasks it cannot run (and of other
-- queues) are never read, however many there are.
DROP INDEX IF EXISTS notifyq.jobs_claim_idx;
CREATE INDEX jobs_claim_idx
    ON notifyq.jobs (queue, task, priority DESC, run_at, id) WHERE status = 'queued';
-- The earliest future run_at per (queue, task), for the dispatcher's precise timer.
DROP INDEX IF EXISTS notifyq.jobs_scheduled_idx;
CREATE INDEX jobs_scheduled_idx
    ON notifyq.jobs (queue, task, run_at) WHERE status = 'queued';

-- The tasks the dispatcher has handlers for; NULL (a dispatcher older than
-- version 8) means any task.
ALTER TABLE notifyq.dispatchers ADD COLUMN IF NOT EXISTS tasks text[];

-- Appended column (CREATE OR REPLACE VIEW can only append).
CREATE OR REPLACE VIEW notifyq.dispatcher_status AS
SELECT d.claimant, d.host, d.pid, d.queues, d.concurrency, d.running, d.heartbeat,
       d.started_at, d.heartbeat_at, d.stopped_at,
       CASE WHEN d.stopped_at IS NOT NULL THEN 'stopped'
            WHEN d.heartbeat_at < now() - make_interval(secs => 3 * d.heartbeat) THEN 'lost'
            ELSE 'running' END AS state,
       d.tasks
FROM notifyq.dispatchers d;
