-- Schema version 6: rate limits per rate_key, across every dispatcher.
-- schema.sql holds the same objects for new databases.

-- rate_key: jobs that share it share a rate limit (notifyq.rate_limits), such as
-- one tenant or one external API.  rate_reserved: the job holds a slot the rate
-- limit gave it (its run_at), so the claim at that time admits it without
-- asking again.
ALTER TABLE notifyq.jobs
    ADD COLUMN IF NOT EXISTS rate_key      text,
    ADD COLUMN IF NOT EXISTS rate_reserved boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT jobs_rate_key_length CHECK (char_length(rate_key) BETWEEN 1 AND 200);
COMMENT ON CONSTRAINT jobs_rate_key_length ON notifyq.jobs IS
    'rate_key: NULL or 1-200 characters';

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

REVOKE EXECUTE ON FUNCTION notifyq.rate_admit(bigint[], text[]) FROM PUBLIC;
