"""Scenario 6: many dispatchers on one table: no double claim, no oversized claim, no deadlock.

Each execution in the ledger carries the claim it ran under (claimant and the
claim statement's `now()`), so the rows sharing both are exactly one claim's:
none may hold more than `--batch-size` jobs.  (The many-dispatchers test of
tests/test_faults.py moved here with its assertions.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import query, statuses, wait_until
from tests.faults import harness

BATCH = 5


def many_dispatchers(
    dsn: str, logs: Path, *, processes: int, jobs: int, timeout: float, concurrency: int = 8
) -> None:
    baseline = harness.deadlocks(dsn)
    # Each process holds 4 connections plus up to `concurrency` ledger connections:
    # keep the total under max_connections (100 by default).
    args = ("-c", str(concurrency), "--batch-size", str(BATCH), "--poll-interval", "1")
    with harness.dispatchers(dsn, processes, *args, logs=logs) as procs:
        wait_until(
            lambda: len(harness.listen_pids(dsn)) == processes,
            timeout=30,
            message=f"{processes} dispatchers listening",
        )
        t0 = time.monotonic()
        harness.seed(dsn, jobs, batch=50_000)
        drained = harness.wait_terminal(dsn, timeout=timeout)
        harness.record_recovery(
            f"{processes} dispatchers drain {jobs} jobs",
            time.monotonic() - t0,
            timeout,
            jobs_per_s=round(jobs / drained),
        )
        assert statuses(dsn) == {"succeeded": jobs}
        harness.check_invariants(
            dsn,
            deadlocks_before=baseline,
            listeners=processes,
            logs=[p.log for p in procs],
        )
        pids = {p.pid for p in procs}
    runs = harness.executions(dsn)
    assert len(runs) == jobs
    assert len({job_id for job_id, _, _, _ in runs}) == jobs  # no job ran twice
    assert {pid for _, _, pid, _ in runs} <= pids
    assert len({pid for _, _, pid, _ in runs}) >= 2  # the work really was shared
    assert query(dsn, "SELECT max(attempts) FROM notifyq.jobs") == [(1,)]
    # Every attempt ran under a claim we can name, and no claim returned more than BATCH.
    assert query(dsn, "SELECT count(*) FROM executions WHERE claimed_at IS NULL") == [(0,)]
    biggest = query(
        dsn,
        "SELECT claimed_by, claimed_at, count(*) FROM executions"
        " GROUP BY claimed_by, claimed_at ORDER BY count(*) DESC LIMIT 3",
    )
    assert biggest[0][2] <= BATCH, biggest
    # The dispatchers' own account agrees: one "claimed job=" line per execution.
    claimed = sum(p.log_text().count("claimed job=") for p in procs)
    assert claimed == jobs


def test_four_dispatchers_share_2000_jobs(fault_dsn: str, tmp_path: Path) -> None:
    many_dispatchers(fault_dsn, tmp_path, processes=4, jobs=2000, timeout=60)


@pytest.mark.faults
@pytest.mark.timeout(1800)
def test_eight_dispatchers_share_200000_jobs(fault_dsn: str, tmp_path: Path) -> None:
    many_dispatchers(fault_dsn, tmp_path, processes=8, jobs=200_000, timeout=1500, concurrency=5)
