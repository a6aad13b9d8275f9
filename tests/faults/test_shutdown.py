"""Scenario 7: graceful shutdown, and the second signal that exits at once.

SIGTERM with jobs running and more queued: nothing is claimed after the
signal, running jobs get `--shutdown-timeout` to finish, those that cannot
are handed back with their attempt uncharged, and the process exits 0 in
time.  (Moved here from tests/test_faults.py with their assertions.)
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import query, statuses, wait_until
from tests.faults import harness
from tests.faults.harness import Dispatcher

GRACE = 2.0
LEASE, POLL = 3.0, 0.5
EXIT_SLACK = 5.0  # hand-backs written, connections closed, interpreter torn down


def shutdown_under_load(dsn: str, logs: Path, *, holds: int, sleeps: int, queued: int) -> None:
    baseline = harness.deadlocks(dsn)
    concurrency = holds + sleeps
    hold_ids = harness.seed(dsn, holds, task="faults.hold")
    sleep_ids = harness.seed(dsn, sleeps, task="faults.sleep", payload='{"ms": 1000}')
    harness.seed(dsn, queued, task="faults.sleep", payload='{"ms": 1000}')
    args = ("-c", str(concurrency), "--shutdown-timeout", str(GRACE), "--lease", str(LEASE))
    with Dispatcher(dsn, *args, "--poll-interval", str(POLL), log=logs / "a.log") as proc:
        wait_until(
            lambda: len(harness.executions(dsn)) == concurrency,
            timeout=30,
            message="every slot busy",
        )
        harness.fault(dsn, "SIGTERM", pid=proc.pid)
        signalled_at = query(dsn, "SELECT clock_timestamp()")[0][0]
        t0 = time.monotonic()
        proc.term()
        wait_until(lambda: "claiming no more" in proc.log_text(), message="the shutdown")
        late = harness.seed(dsn, 1, task="faults.record")  # inserted after SIGTERM
        assert proc.wait(timeout=GRACE + 30) == 0
        exited = time.monotonic() - t0
        log = proc.log_text()
    harness.record_recovery(
        f"SIGTERM exit ({holds} held, {sleeps} finishing, {queued} queued)",
        exited,
        GRACE + EXIT_SLACK,
        grace=GRACE,
    )
    # No claim after the signal: every execution's claim is older than it.
    assert query(dsn, "SELECT count(*) FROM executions WHERE claimed_at > %s", signalled_at) == [
        (0,)
    ]
    # The jobs that could finish did, within the grace.
    finished = query(
        dsn,
        "SELECT count(*) FROM executions WHERE job_id = ANY(%s) AND outcome = 'success'"
        " AND ended_at <= %s + make_interval(secs => %s)",
        sleep_ids,
        signalled_at,
        GRACE,
    )
    assert finished == [(sleeps,)]
    # The ones that could not were interrupted and handed back, their attempt uncharged.
    assert (
        query(
            dsn,
            "SELECT status, attempts, claimed_by FROM notifyq.jobs WHERE id = ANY(%s)",
            hold_ids,
        )
        == [("queued", 0, None)] * holds
    )
    assert {
        r[3] for r in harness.executions(dsn, f"job_id IN ({','.join(map(str, hold_ids))})")
    } == {"interrupted"}
    assert query(dsn, "SELECT status, attempts FROM notifyq.jobs WHERE id = %s", late[0]) == [
        ("queued", 0)  # inserted after SIGTERM: never claimed
    ]
    # (Hand-backs may be written in several batches.)
    handed = re.findall(r"handed back (\d+) unfinished jobs", log)
    assert sum(map(int, handed)) == holds
    assert exited <= GRACE + EXIT_SLACK
    # A fresh dispatcher runs what was handed back (same attempt number) and the rest.
    query(dsn, "INSERT INTO release VALUES (NULL)")
    with Dispatcher(dsn, *args, log=logs / "b.log") as after:
        harness.wait_terminal(dsn, timeout=60)
        harness.check_invariants(
            dsn, deadlocks_before=baseline, listeners=1, logs=[logs / "a.log", after.log]
        )
    assert query(dsn, "SELECT DISTINCT status, attempts FROM notifyq.jobs") == [("succeeded", 1)]


def test_sigterm_finishes_what_it_can_and_hands_back_the_rest(
    fault_dsn: str, tmp_path: Path
) -> None:
    shutdown_under_load(fault_dsn, tmp_path, holds=2, sleeps=2, queued=20)


@pytest.mark.faults
def test_sigterm_with_many_jobs_running(fault_dsn: str, tmp_path: Path) -> None:
    shutdown_under_load(fault_dsn, tmp_path, holds=40, sleeps=40, queued=500)


def test_second_signal_exits_at_once_and_leases_protect_the_job(
    fault_dsn: str, tmp_path: Path
) -> None:
    dsn = fault_dsn
    baseline = harness.deadlocks(dsn)
    args = ("--lease", str(LEASE), "--poll-interval", str(POLL))
    with Dispatcher(dsn, "--shutdown-timeout", "60", *args, log=tmp_path / "a.log") as proc:
        harness.seed(dsn, 1, task="faults.hold")
        wait_until(lambda: harness.executions(dsn), message="the job to start")
        harness.fault(dsn, "SIGTERM then SIGINT", pid=proc.pid)
        proc.term()
        # Two signals pending at once are delivered lowest number first (SIGINT before
        # SIGTERM): send the second only once the first has been taken as the graceful one.
        wait_until(lambda: "received SIGTERM" in proc.log_text(), message="SIGTERM taken")
        proc.proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 128 + signal.SIGINT
        t0 = time.monotonic()
    # Still running in the table, under a lease that will expire and be rescued.
    assert query(dsn, "SELECT status, attempts FROM notifyq.jobs") == [("running", 1)]
    with Dispatcher(dsn, *args, log=tmp_path / "b.log"):
        wait_until(lambda: len(harness.executions(dsn)) == 2, timeout=30, message="rescue")
        bound = harness.rescue_bound(LEASE, POLL) + 5.0
        rescued = harness.record_recovery("second signal, rescue", time.monotonic() - t0, bound)
        query(dsn, "INSERT INTO release VALUES (NULL)")
        wait_until(lambda: statuses(dsn) == {"succeeded": 1}, message="success")
        harness.check_invariants(dsn, deadlocks_before=baseline, listeners=1)
    assert query(dsn, "SELECT attempts FROM notifyq.jobs") == [(2,)]
    assert rescued <= bound
