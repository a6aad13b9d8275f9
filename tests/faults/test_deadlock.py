"""A dispatcher must never deadlock with itself: lease renewal against completion.

Found by the heavy many-dispatchers scenario (8 processes, 200,000 jobs: one
"deadlock detected" in `lease upkeep failed`).  One dispatcher's leases
connection renewed (UPDATE ... WHERE id = ANY(held ids)) while its completions
connection completed (UPDATE ... FROM unnest(finished ids)) an overlapping set
of its jobs, each locking rows in its own order: PostgreSQL aborted one after
deadlock_timeout, stalling completions and heartbeats for a second.  Renewal
now takes its rows with FOR UPDATE SKIP LOCKED, so it never waits and cannot
be part of a deadlock (a skipped row is renewed by the next heartbeat).

Many slots of jobs with random short durations, and a 1 s lease (a heartbeat
every 0.33 s), showed the deadlock within seconds; the test churns for a minute.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.faults import harness
from tests.faults.harness import Dispatcher

WINDOW = 60.0  # seconds of churn; a deadlock shows after ~5 s on average here


@pytest.mark.faults  # a minute of churn: heavy
def test_one_dispatcher_never_deadlocks_with_itself(fault_dsn: str, tmp_path: Path) -> None:
    dsn = fault_dsn
    baseline = harness.deadlocks(dsn)
    rows = [("faults.nap", f'{{"ms": {random.randint(1, 200)}}}') for _ in range(100_000)]
    harness.seed_rows(dsn, rows)
    args = ("-c", "300", "--lease", "1", "--poll-interval", "1")
    with Dispatcher(dsn, *args, log=tmp_path / "serve.log") as proc:
        try:
            wait_until(
                lambda: harness.deadlocks(dsn) > baseline or "deadlock detected" in proc.log_text(),
                timeout=WINDOW,
                interval=0.5,
                message="a deadlock",
            )
        except AssertionError:
            return  # none within the window
        lines = [line for line in proc.log_text().splitlines() if "deadlock detected" in line]
    assert harness.deadlocks(dsn) == baseline and not lines, lines[:3]
