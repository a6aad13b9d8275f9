-- Schema version 13: the queue and task name rules of notifyq.jobs, checked faster.
-- schema.sql holds the same constraints for new databases.
--
-- The rules are unchanged.  PostgreSQL's regular expressions evaluate a bounded
-- repetition ({0,199}) slowly, more so the longer the name, and every INSERT and
-- every UPDATE of a job evaluates both checks, whichever columns it sets: about
-- 40 µs per row for a 23-character task name, a third of what claiming or
-- completing a job costs the server.  An unbounded repetition and a separate length
-- test accept exactly the same names (tests/test_schema.py compares them) in under a
-- microsecond (benchmarks/name_checks.py).
-- Adding the checks reads notifyq.jobs once to validate them, under the ACCESS
-- EXCLUSIVE lock the ALTER TABLE takes: about 0.3 s per 200,000 jobs.
ALTER TABLE notifyq.jobs
    DROP CONSTRAINT jobs_queue_format,
    DROP CONSTRAINT jobs_task_format,
    ADD CONSTRAINT jobs_queue_format
        CHECK (queue ~ '^[a-z0-9_][a-z0-9_-]*$' AND char_length(queue) <= 63),
    ADD CONSTRAINT jobs_task_format
        CHECK (task ~ '^[A-Za-z_][A-Za-z0-9_.:-]*$' AND char_length(task) <= 200);
COMMENT ON CONSTRAINT jobs_queue_format ON notifyq.jobs IS
    'queue: 1-63 characters of a-z, 0-9, _ and -, not starting with -';
COMMENT ON CONSTRAINT jobs_task_format ON notifyq.jobs IS
    'task: 1-200 characters of letters, digits, _ . : and -, starting with a letter or _';
