"""Scenario 2: a dispatcher fails at each failpoint, by SIGKILL or by a raised error.

Every case serves the same 30 jobs.  The first dispatcher has the failpoint
armed (NOTIFYQ_FAILPOINT) and its log must show it fired; if it died, a
second, clean dispatcher takes over.  Afterwards every job has succeeded,
and each re-execution and each charged attempt is one the fault explains:
a failure before any COMMIT charges nothing, a failure after the claim's
COMMIT costs the jobs in flight one attempt (rescued when the dead process's
session ends or its lease runs out), a lost outcome runs its job again.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.apps.ledger import LEDGER_DDL
from tests.conftest import query, serve_process, statuses, wait_until
from tests.faults.harness import record_recovery

JOBS = 30
LEASE = 2.0
POLL = 0.5
RESCUE_BOUND = LEASE + POLL + POLL  # R: lease + rescue interval (<= poll) + poll


@dataclass(frozen=True)
class Case:
    failpoint: str
    action: str
    dies: bool  # the armed process does not survive the fault
    charged: bool  # jobs in flight lose an attempt (their dispatcher had to be found dead)
    reruns: bool  # a job may run twice: its first run's outcome was lost

    @property
    def id(self) -> str:
        return f"{self.failpoint}:{self.action}"


CASES = [
    # Before the claim's COMMIT: the transaction dies with the connection, nothing charged.
    Case("claim-before-commit", "kill", dies=True, charged=False, reruns=False),
    Case("claim-before-commit", "raise", dies=False, charged=False, reruns=False),
    # After it: a crash leaves the jobs running under a dead lease; a lost reply is
    # noticed and the orphans go back uncharged.
    Case("claim-after-commit", "kill", dies=True, charged=True, reruns=False),
    Case("claim-after-commit", "raise", dies=False, charged=False, reruns=False),
    # The handler ran, its outcome was never written: it runs again after the rescue.
    Case("handler-after", "kill", dies=True, charged=True, reruns=True),
    Case("handler-after", "raise", dies=True, charged=True, reruns=True),
    # The outcome's transaction dies (kill: runs again) or fails and is retried (raise).
    Case("completion-commit", "kill", dies=True, charged=True, reruns=True),
    Case("completion-commit", "raise", dies=False, charged=False, reruns=False),
    # Between LISTEN and the catch-up claim: nothing was claimed yet.
    Case("listen-before-poll", "kill", dies=True, charged=False, reruns=False),
    Case("listen-before-poll", "raise", dies=False, charged=False, reruns=False),
]


@pytest.fixture
def ledger_dsn(dsn: str) -> str:
    query(dsn, LEDGER_DDL)
    return dsn


def runs(dsn: str) -> list[tuple[int, int, int]]:
    return query(dsn, "SELECT job_id, attempt, pid FROM ledger WHERE event = 'ran' ORDER BY 1, 2")


def all_ids(dsn: str) -> list[int]:
    return [r[0] for r in query(dsn, "SELECT id FROM notifyq.jobs")]


def reruns(ran: list[tuple[int, int, int]]) -> set[int]:
    counts = Counter(job_id for job_id, _, _ in ran)
    return {job_id for job_id, n in counts.items() if n > 1}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_failpoint(ledger_dsn: str, tmp_path: Path, case: Case) -> None:
    dsn = ledger_dsn
    # Queued before the dispatcher starts, so its first claim (the catch-up) has work.
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task) SELECT 'ledger.record' FROM generate_series(1, %s)",
        JOBS,
    )
    options = ("--lease", str(LEASE), "--poll-interval", str(POLL), "-c", "10")
    began = time.monotonic()
    armed_log = tmp_path / "armed.log"
    with serve_process(dsn, *options, log=armed_log, env={"NOTIFYQ_FAILPOINT": case.id}) as armed:
        if case.dies:
            armed.wait(timeout=30)
            failed_at = time.monotonic()
            assert armed.returncode != 0
            with serve_process(dsn, *options, log=tmp_path / "clean.log"):
                wait_until(
                    lambda: statuses(dsn) == {"succeeded": JOBS},
                    timeout=30,
                    message="the clean dispatcher to finish every job",
                )
                recovered = time.monotonic() - failed_at
        else:
            wait_until(
                lambda: statuses(dsn) == {"succeeded": JOBS},
                timeout=30,
                message="the armed dispatcher to recover and finish every job",
            )
            assert armed.poll() is None, "a raised failpoint must not stop the dispatcher"
            recovered = time.monotonic() - began  # the fault and the recovery, in one process
    assert f"failpoint {case.failpoint}: {case.action}" in armed_log.read_text()

    ran = runs(dsn)
    assert {job_id for job_id, _, _ in ran} == set(all_ids(dsn))  # every job ran
    twice = reruns(ran)
    if case.reruns:
        # Each second run is explained: the first was the armed process's, now dead.
        for job_id in twice:
            pids = [pid for j, _, pid in ran if j == job_id]
            assert len(pids) == 2 and pids[0] == armed.pid and pids[1] != armed.pid
    else:
        assert not twice, f"jobs {sorted(twice)} ran twice though no outcome was lost"
    charged = query(dsn, "SELECT id, attempts, last_error FROM notifyq.jobs WHERE attempts > 1")
    record_recovery(
        f"failpoint {case.id}",
        recovered,
        RESCUE_BOUND + 10,
        charged=len(charged),
        reruns=len(twice),
    )
    if case.charged:
        # Only jobs whose lease died with the armed process paid an attempt.
        for _, attempts, error in charged:
            # Killed: its session ended, or (the lease being short here) its lease ran out
            # first; whichever the rescuer saw first is named.
            assert attempts == 2 and error.startswith(
                ("attempt 1 lost: the database session", "attempt 1 lost: the lease")
            )
        # Waiting for the dead lease is the slow part: R, plus start-up and the jobs.
        assert recovered < RESCUE_BOUND + 10
    else:
        assert not charged, "an attempt was charged for a fault before any work"
