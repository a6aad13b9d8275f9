"""Scenario 8: malformed rows written by plain SQL.

Every CHECK constraint in schema.sql rejects its bad row at INSERT with an
error naming it.  Rows that pass the CHECKs but cannot run end `dead` after
exactly one attempt with a last_error that says why (a payload the task's
`decode` rejects), or are never claimed at all (a task no dispatcher has a
handler for: it waits, queued, for one that has), while the valid jobs
inserted around them keep flowing.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import REPO, query, wait_until
from tests.faults import harness

# constraint -> (columns, values) of a row that violates it and nothing else.
BAD_ROWS = {
    "jobs_queue_format": ("task, queue", "'faults.record', 'No Spaces'"),
    "jobs_task_format": ("task", "'9lives'"),
    "jobs_priority_range": ("task, priority", "'faults.record', 1001"),
    "jobs_max_attempts_range": ("task, max_attempts", "'faults.record', 0"),
    "jobs_attempts_nonnegative": ("task, attempts", "'faults.record', -1"),
    "jobs_payload_size": (
        "task, payload",
        "'faults.record', jsonb_build_object('blob', repeat('x', 1100000))",
    ),
    "jobs_status_valid": ("task, status", "'faults.record', 'paused'"),
    "jobs_running_has_lease": ("task, status", "'faults.record', 'running'"),
    "jobs_dedupe_key_length": ("task, dedupe_key", "'faults.record', ''"),
    "jobs_progress_range": ("task, progress", "'faults.record', 101"),
    "jobs_progress_message_length": ("task, progress_message", "'faults.record', repeat('m', 201)"),
    "jobs_on_dependency_failure_valid": ("task, on_dependency_failure", "'faults.record', 'maybe'"),
    "jobs_depends_on_valid": ("task, depends_on", "'faults.record', ARRAY[NULL]::bigint[]"),
    "jobs_rate_key_length": ("task, rate_key", "'faults.record', ''"),
    "jobs_trace_context_valid": ("task, trace_context", "'faults.record', '[1]'::jsonb"),
    "jobs_tags_valid": ("task, tags", "'faults.record', ARRAY['']"),
    "jobs_unique_for_valid": ("task, unique_for", "'faults.record', interval '1 hour'"),
    "jobs_on_duplicate_valid": ("task, dedupe_key, on_duplicate", "'faults.record', 'k', 'merge'"),
    # Allowed by the prefix (below), so the allow-list's trigger lets the format check see it.
    "jobs_callback_url_format": ("task, callback_url", "'faults.record', 'http://h/a b'"),
}


def test_every_check_constraint_has_a_case() -> None:
    schema = (REPO / "schema.sql").read_text()
    jobs = {name for name in re.findall(r"CONSTRAINT (\w+) CHECK", schema) if name[:5] == "jobs_"}
    assert jobs == set(BAD_ROWS)


@pytest.mark.parametrize("constraint", sorted(BAD_ROWS))
def test_check_constraint_rejects_at_insert_naming_itself(dsn: str, constraint: str) -> None:
    columns, values = BAD_ROWS[constraint]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO notifyq.webhook_allowlist (prefix) VALUES ('http://h/')")
        with pytest.raises(psycopg.errors.CheckViolation) as caught:
            conn.execute(f"INSERT INTO notifyq.jobs ({columns}) VALUES ({values})".encode())
        assert caught.value.diag.constraint_name == constraint
        assert f'violates check constraint "{constraint}"' in str(caught.value)
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]


UNRUNNABLE = [
    # (task, payload, what last_error must say)
    ("faults.typed", '{"n": "seven"}', "TypeError: n must be an integer, got str"),
    ("faults.typed", "{}", "KeyError: 'n'"),
    ("faults.typed", "[1, 2]", "TypeError"),
]


UNKNOWN = ("faults.nope", "{}")  # no dispatcher has a handler for this task


def malformed_among_valid(dsn: str, logs: Path, *, rounds: int, processes: int) -> None:
    baseline = harness.deadlocks(dsn)
    rows: list[tuple[str, str]] = []
    for i in range(rounds):
        for task, payload, _ in UNRUNNABLE:
            rows += [("faults.record", "{}"), (task, payload), ("faults.typed", f'{{"n": {i}}}')]
        rows += [("faults.record", "{}"), UNKNOWN]
    ids = harness.seed_rows(dsn, rows)
    kinds = dict(zip(ids, rows, strict=True))
    unknown = [j for j in ids if kinds[j] == UNKNOWN]
    with harness.dispatchers(dsn, processes, "--poll-interval", "1", logs=logs) as procs:
        # Every job settles but the unknown task's, which every claim saw ready and left.
        t0 = time.monotonic()
        wait_until(
            lambda: harness.unfinished(dsn) == len(unknown),
            timeout=60,
            interval=0.1,
            message="every job but the unknown task's to reach a terminal state",
        )
        harness.record_recovery(
            f"{len(rows)} rows, {rounds * len(UNRUNNABLE)} unrunnable, {len(unknown)} of no"
            " known task: the others settled",
            time.monotonic() - t0,
            60,
        )
        assert query(
            dsn,
            "SELECT status, attempts, count(*) FROM notifyq.jobs WHERE id = ANY(%s)"
            " GROUP BY status, attempts",
            unknown,
        ) == [("queued", 0, len(unknown))]
        # What an operator does with jobs nobody will run: cancel them.
        query(
            dsn,
            "UPDATE notifyq.jobs SET status = 'cancelled', finished_at = now() WHERE id = ANY(%s)",
            unknown,
        )
        harness.check_invariants(
            dsn, deadlocks_before=baseline, listeners=processes, logs=[p.log for p in procs]
        )
        logged = "".join(p.log_text() for p in procs)
    # Each dead job got its warning line, saying why.
    assert logged.count("WARNING notifyq.completion: dead job=") == rounds * len(UNRUNNABLE)
    assert "faults.nope" not in logged
    bad = {(t, p): why for t, p, why in UNRUNNABLE}
    for job_id, status, attempts, last_error in query(
        dsn, "SELECT id, status, attempts, last_error FROM notifyq.jobs ORDER BY id"
    ):
        if kinds[job_id] == UNKNOWN:
            assert (status, attempts, last_error) == ("cancelled", 0, None), job_id
            continue
        why = bad.get(kinds[job_id])
        if why is None:
            assert (status, attempts, last_error) == ("succeeded", 1, None), job_id
            continue
        assert (status, attempts) == ("dead", 1), (job_id, kinds[job_id])
        assert why in last_error, last_error
        if kinds[job_id][0] == "faults.typed":
            assert "PayloadError: payload of job" in last_error
            assert "cannot be decoded for task 'faults.typed'" in last_error
    # The handler never ran for an unrunnable row.
    dead = [j for j in ids if kinds[j] in bad or kinds[j] == UNKNOWN]
    assert query(dsn, "SELECT count(*) FROM executions WHERE job_id = ANY(%s)", dead) == [(0,)]


def test_unrunnable_rows_die_after_one_attempt_valid_ones_flow(
    fault_dsn: str, tmp_path: Path
) -> None:
    malformed_among_valid(fault_dsn, tmp_path, rounds=5, processes=1)


@pytest.mark.faults
def test_many_unrunnable_rows_among_valid_ones(fault_dsn: str, tmp_path: Path) -> None:
    malformed_among_valid(fault_dsn, tmp_path, rounds=500, processes=2)
