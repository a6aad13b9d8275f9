"""Two attempts of one job in one process: the late one is fenced, the process serves on.

When a dispatcher's own lease lapses while an attempt still runs (its loop was
blocked, the process was paused), the job is rescued and this very process
can claim it again.  Both attempts then run side by side; whichever ends
first must not disturb the other's bookkeeping.  The rescue is done here by
hand, exactly as a rescuer's statement does it, so the test needs no stall
of a real lease (and no timing luck).
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import query, wait_until
from tests.faults import harness
from tests.faults.harness import Dispatcher

RESCUE_BY_HAND = """
UPDATE notifyq.jobs
SET status = 'queued', claimed_by = NULL, lease_expires_at = NULL,
    last_error = 'attempt 1 lost: rescued by the test'
WHERE id = %s AND status = 'running'
"""


def test_a_late_attempt_of_a_job_claimed_again_is_fenced_and_serving_goes_on(
    fault_dsn: str, tmp_path: Path
) -> None:
    (job,) = harness.seed(fault_dsn, 1, task="faults.hold_first")
    with Dispatcher(fault_dsn, log=tmp_path / "d.log") as proc:
        wait_until(
            lambda: harness.executions(fault_dsn, f"job_id = {job} AND attempt = 1"),
            message="attempt 1 to start",
        )
        harness.fault(fault_dsn, "rescue", pid=proc.pid, detail="job rescued by hand")
        query(fault_dsn, RESCUE_BY_HAND, job)
        # The status change wakes the same dispatcher, which claims attempt 2 while
        # attempt 1 still holds; attempt 2 succeeds at once.
        wait_until(
            lambda: (
                query(fault_dsn, "SELECT status, attempts FROM notifyq.jobs WHERE id = %s", job)
                == [("succeeded", 2)]
            ),
            message="attempt 2 to succeed in the same process",
        )
        assert harness.executions(fault_dsn, f"job_id = {job} AND attempt = 2")[0][2] == proc.pid
        query(fault_dsn, "INSERT INTO release (job_id) VALUES (%s)", job)
        wait_until(
            lambda: f"completion of job={job} not written" in proc.log_text(),
            message="attempt 1's late outcome to be fenced",
        )
        # Still serving: a new job runs.
        (later,) = harness.seed(fault_dsn, 1, task="faults.record")
        wait_until(
            lambda: (
                query(fault_dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", later)
                == [("succeeded",)]
            ),
            message="the dispatcher to go on serving",
        )
        assert proc.alive()
        assert query(fault_dsn, "SELECT status, attempts FROM notifyq.jobs WHERE id = %s", job) == [
            ("succeeded", 2)
        ]
        harness.check_invariants(fault_dsn, listeners=1, logs=[proc.log])
    assert "Traceback" not in proc.log_text()
