"""Crash rescue in seconds: a dispatcher's liveness is its database session.

Every listening dispatcher holds a session-level advisory lock on its LISTEN
connection (notifyq.rescue_jobs).  These scenarios run with the default lease
(30 s) and poll interval (5 s), so anything rescued within seconds was rescued
through the session, never the lease:

- kill -9 with jobs in flight: another live dispatcher runs them again within
  BOUND seconds (README, "Delivery guarantees");
- SIGSTOP past the lease: the session stays open, so only the lease tells; the
  jobs run again elsewhere, and the paused process, resumed, serves on with its
  late outcomes fenced;
- the victim's listening connection is terminated: it takes its lock back
  within a reconnect and keeps its jobs (they finish as attempt 1).
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from notifyq.leases import RESTART_GRACE
from tests.conftest import query, wait_until
from tests.faults import harness
from tests.faults.harness import Dispatcher

BOUND = 5.0  # seconds from kill -9 until every job in flight runs again elsewhere
IN_FLIGHT = 20


def claimant_of(dsn: str, pid: int) -> str:
    rows = query(dsn, "SELECT claimant FROM notifyq.dispatchers WHERE pid = %s", pid)
    return str(rows[0][0]) if rows else ""


def liveness_holder(dsn: str, claimant: str) -> int | None:
    """The backend pid holding `claimant`'s liveness lock, if any."""
    rows = query(
        dsn,
        "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.classid = 28274 AND l.objid = hashtext(%s)::oid AND l.objsubid = 2",
        claimant,
    )
    return int(rows[0][0]) if rows else None


def running_again(dsn: str, jobs: list[int], pid: int) -> bool:
    """Every one of `jobs` claimed again by the dispatcher with this pid (its handler then
    starts at once; the ledger row it writes is not timed: its new connection is slow)."""
    rows = query(
        dsn,
        "SELECT count(*) FROM notifyq.jobs j JOIN notifyq.dispatchers d"
        " ON d.claimant = j.claimed_by WHERE j.id = ANY(%s) AND j.status = 'running'"
        " AND d.pid = %s",
        jobs,
        pid,
    )
    return rows[0][0] == len(jobs)


def server_settled(dsn: str) -> None:
    """Until the server has been up for RESTART_GRACE: no session counts as lost before."""
    wait_until(
        lambda: query(
            dsn,
            "SELECT now() - pg_postmaster_start_time() > make_interval(secs => %s)",
            RESTART_GRACE,
        )[0][0],
        timeout=RESTART_GRACE + 5,
        message="the server to have been up for the restart grace",
    )


def start_victim(dsn: str, log: Path, *args: str) -> tuple[Dispatcher, list[int]]:
    """A dispatcher running IN_FLIGHT held jobs (and holding its liveness lock)."""
    jobs = harness.seed(dsn, IN_FLIGHT, task="faults.hold")
    victim = Dispatcher(dsn, "-c", str(IN_FLIGHT), *args, log=log)
    wait_until(
        lambda: len(harness.executions(dsn, f"pid = {victim.pid}")) == IN_FLIGHT,
        timeout=30,
        message="the victim to run every job",
    )
    wait_until(
        lambda: liveness_holder(dsn, claimant_of(dsn, victim.pid)),
        message="the victim to hold its liveness lock",
    )
    return victim, jobs


def kill_rounds(dsn: str, logs: Path, rounds: int, name: str) -> list[float]:
    seconds: list[float] = []
    procs: list[Dispatcher] = []
    try:
        for i in range(rounds):
            victim, jobs = start_victim(dsn, logs / f"victim{i}.log")
            procs.append(victim)
            survivor = Dispatcher(dsn, "-c", str(IN_FLIGHT), log=logs / f"survivor{i}.log")
            procs.append(survivor)
            wait_until(
                lambda s=survivor: claimant_of(dsn, s.pid),  # type: ignore[misc]
                message="the survivor to register",
            )
            server_settled(dsn)
            victim_claimant = claimant_of(dsn, victim.pid)
            killed_at = harness.kill9(dsn, victim)
            wait_until(
                lambda j=jobs, s=survivor: running_again(dsn, j, s.pid),  # type: ignore[misc]
                timeout=60,
                message="every job of the killed dispatcher to run again on the survivor",
            )
            seconds.append(time.monotonic() - killed_at)
            # Rescued through the session, the attempt counted, the cause named.
            assert query(
                dsn,
                "SELECT count(*) FROM notifyq.jobs WHERE id = ANY(%s) AND attempts = 2"
                " AND last_error = format('attempt 1 lost: the database session of dispatcher"
                " %%s ended (process killed, or cut off from the database)', %s::text)",
                jobs,
                victim_claimant,
            ) == [(IN_FLIGHT,)]
            query(dsn, "INSERT INTO release (job_id) SELECT unnest(%s::bigint[])", jobs)
            harness.wait_terminal(dsn, timeout=60)
            survivor.term()
            assert survivor.wait(30) == 0
    finally:
        for p in procs:
            p.__exit__()
    harness.record_recovery(
        name,
        max(seconds),
        BOUND,
        median_s=round(statistics.median(seconds), 3),
        rounds=rounds,
        in_flight=IN_FLIGHT,
    )
    harness.check_invariants(dsn, listeners=0, logs=[p.log for p in procs])
    return seconds


def test_kill_9_jobs_run_again_elsewhere_within_seconds_with_default_lease(
    fault_dsn: str, tmp_path: Path
) -> None:
    seconds = kill_rounds(fault_dsn, tmp_path, 1, "kill -9, default lease (20 jobs)")
    assert max(seconds) <= BOUND


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_kill_9_ten_times_default_lease(fault_dsn: str, tmp_path: Path) -> None:
    seconds = kill_rounds(fault_dsn, tmp_path, 10, "kill -9 x10, default lease (20 jobs)")
    assert max(seconds) <= BOUND


def test_sigstop_past_the_lease_is_rescued_by_lease_and_the_resumed_process_serves_on(
    fault_dsn: str, tmp_path: Path
) -> None:
    lease = 3.0
    victim, jobs = start_victim(fault_dsn, tmp_path / "victim.log", "--lease", str(lease))
    with victim, Dispatcher(fault_dsn, "-c", str(IN_FLIGHT), log=tmp_path / "survivor.log") as s:
        wait_until(lambda: claimant_of(fault_dsn, s.pid), message="the survivor to register")
        stop = harness.fault(fault_dsn, "SIGSTOP", pid=victim.pid)
        os.kill(victim.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            wait_until(
                lambda: running_again(fault_dsn, jobs, s.pid),
                timeout=60,
                message="the paused dispatcher's jobs to run again elsewhere",
            )
            seconds = time.monotonic() - stopped_at
            # The session stayed open: only the lease could tell.
            assert query(
                fault_dsn,
                "SELECT count(*) FROM notifyq.jobs WHERE id = ANY(%s)"
                " AND last_error LIKE 'attempt 1 lost: the lease of dispatcher%%'",
                jobs,
            ) == [(IN_FLIGHT,)]
        finally:
            os.kill(victim.pid, signal.SIGCONT)
            harness.fault_end(fault_dsn, stop)
        # The lease of a lease of 3 s is renewed every second: a rescue after one lease,
        # one sweep and a claim; far below the default lease's 30 s.
        bound = harness.rescue_bound(lease, 5.0)
        harness.record_recovery("SIGSTOP past a 3 s lease (20 jobs)", seconds, bound)
        query(fault_dsn, "INSERT INTO release (job_id) VALUES (NULL)")
        harness.wait_terminal(fault_dsn, timeout=60)
        # The resumed victim's late outcomes were fenced; it serves on.
        wait_until(
            lambda: victim.log_text().count("not written: it is no longer running") >= 1,
            message="the resumed dispatcher to drop its late outcomes",
        )
        (later,) = harness.seed(fault_dsn, 1, task="faults.record")
        s.term()
        assert s.wait(30) == 0
        wait_until(
            lambda: (
                query(fault_dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", later)
                == [("succeeded",)]
            ),
            message="the resumed dispatcher to run a new job",
        )
        assert victim.alive()
        harness.check_invariants(fault_dsn, logs=[victim.log, s.log])
    assert seconds <= bound


def test_a_dispatcher_whose_listening_session_drops_keeps_its_jobs(
    fault_dsn: str, tmp_path: Path
) -> None:
    victim, jobs = start_victim(fault_dsn, tmp_path / "victim.log")
    with victim, Dispatcher(fault_dsn, "-c", str(IN_FLIGHT), log=tmp_path / "other.log") as other:
        wait_until(lambda: claimant_of(fault_dsn, other.pid), message="the other to register")
        claimant = claimant_of(fault_dsn, victim.pid)
        old = liveness_holder(fault_dsn, claimant)
        assert old is not None

        def alive_at() -> Any:
            sql = "SELECT alive_at FROM notifyq.dispatchers WHERE claimant = %s"
            return query(fault_dsn, sql, claimant)[0][0]

        # While it holds jobs its keeper beats, from another connection than the lock's.
        first = wait_until(alive_at, message="the victim's first beat")
        wait_until(lambda: alive_at() > first, message="the victim to beat again")
        harness.fault(fault_dsn, "pg_terminate_backend notifyq:listen", pid=old)
        query(fault_dsn, "SELECT pg_terminate_backend(%s)", old)
        dropped_at = time.monotonic()
        wait_until(
            lambda: liveness_holder(fault_dsn, claimant) not in (None, old),
            message="the victim to take its liveness lock back on a new session",
        )
        seconds = time.monotonic() - dropped_at
        harness.record_recovery("listening session terminated: lock taken back", seconds, 2.0)
        # Still the victim's, and never lost: they finish as attempt 1 where they run.
        query(fault_dsn, "INSERT INTO release (job_id) VALUES (NULL)")
        harness.wait_terminal(fault_dsn, timeout=60)
        assert query(
            fault_dsn,
            "SELECT status, attempts, last_error FROM notifyq.jobs WHERE id = ANY(%s)"
            " GROUP BY 1, 2, 3",
            jobs,
        ) == [("succeeded", 1, None)]
        assert not harness.executions(fault_dsn, f"pid = {other.pid}")
        harness.check_invariants(fault_dsn, listeners=2, logs=[victim.log, other.log])
    assert seconds <= 2.0
