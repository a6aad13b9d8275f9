-- Schema version 9: a producer's open transaction no longer holds up dispatchers.
-- schema.sql holds the same objects for new databases.
--
-- Before, the INSERT trigger locked a new job's dependencies FOR SHARE until the
-- producer's transaction ended, and the UPDATE that finished one of them (a
-- dispatcher's completion) waited for that lock: a producer that left its
-- transaction open froze every completion behind it.  Now the INSERT takes no
-- lock; a constraint trigger deferred to the producer's COMMIT checks again, under
-- the lock, the dependencies of the jobs still waiting, so none is left waiting for
-- a dependency that finished between the INSERT and the COMMIT.

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

REVOKE EXECUTE ON FUNCTION notifyq.dependencies_on_commit() FROM PUBLIC;
