-- Schema version 4: per-queue concurrency caps that hold across every dispatcher.
-- schema.sql holds the same objects for new databases.

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
-- that found it full ignore inserts into it until told it has room.  The
-- payload "limit:QUEUE" can never be a queue name (':' is not allowed there).
CREATE OR REPLACE FUNCTION notifyq.notify_limit_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(
        'notifyq_jobs', 'limit:' OPERATOR(pg_catalog.||) COALESCE(NEW.queue, OLD.queue));
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER queue_limits_changed
    AFTER INSERT OR UPDATE OR DELETE ON notifyq.queue_limits
    FOR EACH ROW EXECUTE FUNCTION notifyq.notify_limit_changed();

-- How many jobs of `queue` a claim may take now: `wanted` when the queue has no
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
    'notifyq.queue_limits cap (wanted when it has none); serialises claims of a capped queue.';

REVOKE EXECUTE ON FUNCTION notifyq.claim_room(text, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION notifyq.notify_limit_changed() FROM PUBLIC;
