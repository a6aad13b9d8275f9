"""The invariants checker itself: each invariant fires on a fabricated violation, by name,
with example rows, and a clean ledger passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import query
from tests.faults import harness


def test_a_clean_ledger_passes(fault_dsn: str) -> None:
    (job,) = harness.seed(fault_dsn, 1)
    query(
        fault_dsn,
        "UPDATE notifyq.jobs SET status = 'succeeded', attempts = 1, max_attempts = 5"
        " WHERE id = %s",
        job,
    )
    query(
        fault_dsn,
        "INSERT INTO executions (job_id, attempt, pid, outcome, ended_at)"
        " VALUES (%s, 1, 10, 'success', clock_timestamp())",
        job,
    )
    harness.check_invariants(fault_dsn, deadlocks_before=harness.deadlocks(fault_dsn), listeners=0)


def test_each_violation_is_reported_by_name_with_examples(fault_dsn: str, tmp_path: Path) -> None:
    dsn = fault_dsn
    lost, double, unexplained, overlapping, over, stranded = harness.seed(dsn, 6)
    query(
        dsn,
        "UPDATE notifyq.jobs SET status = 'succeeded', attempts = 1, max_attempts = 5"
        " WHERE id = ANY(%s)",
        [double, unexplained, overlapping],
    )
    query(
        dsn,
        "UPDATE notifyq.jobs SET status = 'dead', attempts = 3, max_attempts = 2 WHERE id = %s",
        over,
    )
    query(
        dsn,
        "UPDATE notifyq.jobs SET status = 'running', attempts = 1, claimed_by = 'x:1:y',"
        " lease_expires_at = now() - interval '1 minute' WHERE id = %s",
        stranded,
    )
    query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('faults.record')")  # never acked
    executions = [
        (double, 1, 10, "success", "0 s", "1 s"),
        (double, 1, 11, "success", "2 s", "3 s"),
        (unexplained, 1, 12, "success", "0 s", "1 s"),  # ran again later: no fault, no failure
        (unexplained, 1, 13, "success", "2 s", "3 s"),
        (overlapping, 1, 14, "running", "0 s", None),  # still running when the next began
        (overlapping, 1, 15, "success", "1 s", "2 s"),
    ]
    for job_id, attempt, pid, outcome, start, end in executions:
        query(
            dsn,
            "INSERT INTO executions (job_id, attempt, pid, outcome, started_at, ended_at)"
            " VALUES (%s, %s, %s, %s, now() + %s::interval, now() + %s::interval)",
            job_id,
            attempt,
            pid,
            outcome,
            start,
            end,
        )
    log = tmp_path / "serve.log"
    log.write_text("ERROR: deadlock detected\n")
    with pytest.raises(harness.InvariantsFailed) as caught:
        harness.check_invariants(
            dsn,
            deadlocks_before=harness.deadlocks(dsn) - 1,
            listeners=1,
            logs=[log],
            listener_wait=0.2,
        )
    names = {name for name, _, _ in caught.value.failures}
    assert names == {
        "acked_jobs_terminal",  # `lost` is still queued, `stranded` running
        "no_phantom_jobs",
        "one_success_per_attempt",
        "succeeded_by_final_attempt",
        "reexecutions_explained",
        "no_concurrent_executions",
        "attempts_within_max",
        "no_expired_lease_left",
        "one_listener_per_dispatcher",
        "no_deadlocks",
        "no_deadlocks_logged",
    }
    text = str(caught.value)
    assert "- acked_jobs_terminal: every acked job exists" in text
    assert f"({lost}, 'setup', 'queued'" in text
    assert "- reexecutions_explained:" in text and f"({unexplained}, 1, 12, 'success'" in text
    # A fault that killed pid 12 (an hour ago: only its pid can match) explains its re-run.
    query(
        dsn,
        "INSERT INTO faults (kind, pid, at, until)"
        " VALUES ('kill -9', 12, now() - interval '1 hour', now() - interval '1 hour')",
    )
    with pytest.raises(harness.InvariantsFailed) as again:
        harness.check_invariants(dsn)
    explained = {name for name, _, _ in again.value.failures}
    assert "reexecutions_explained" in explained  # pid 10's success is still unexplained
    rows = next(r for n, _, r in again.value.failures if n == "reexecutions_explained")
    assert {r[2] for r in rows} == {10, 14}
