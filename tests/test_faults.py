"""Real faults against real processes: kill -9, PostgreSQL restarts, terminated backends.

Each test ends by checking that no job was lost: every job inserted reached
`succeeded`, and the ledger (written by the handler on its own connection)
explains every execution.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.apps.ledger import LEDGER_DDL
from tests.conftest import EmbeddedServer, query, serve_process, statuses, wait_until


@pytest.fixture
def ledger_dsn(dsn: str) -> str:
    query(dsn, LEDGER_DDL)
    return dsn


def listen_pids(dsn: str) -> list[int]:
    return [
        r[0]
        for r in query(
            dsn,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'notifyq:listen' ORDER BY pid",
        )
    ]


def ledger(dsn: str, event: str) -> list[tuple[int, int, int]]:
    return query(
        dsn,
        "SELECT job_id, attempt, pid FROM ledger WHERE event = %s ORDER BY job_id, attempt",
        event,
    )


def test_many_dispatchers_run_every_job_exactly_once(ledger_dsn: str) -> None:
    dsn = ledger_dsn
    jobs = 600
    with (
        serve_process(dsn, "-c", "8") as a,
        serve_process(dsn, "-c", "8") as b,
        serve_process(dsn, "-c", "8") as c,
    ):
        wait_until(lambda: len(listen_pids(dsn)) == 3, message="three dispatchers listening")
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task) SELECT 'ledger.record' FROM generate_series(1, %s)",
            jobs,
        )
        wait_until(
            lambda: statuses(dsn) == {"succeeded": jobs}, timeout=60, message="every job to succeed"
        )
        pids = {a.pid, b.pid, c.pid}
    runs = ledger(dsn, "ran")
    assert len(runs) == jobs
    assert len({job_id for job_id, _, _ in runs}) == jobs  # no job ran twice
    assert {pid for _, _, pid in runs} <= pids
    assert len({pid for _, _, pid in runs}) >= 2  # the work really was shared
    assert query(dsn, "SELECT max(attempts) FROM notifyq.jobs") == [(1,)]


def test_kill_9_mid_job_is_rescued_by_a_live_dispatcher(ledger_dsn: str, tmp_path: Path) -> None:
    dsn = ledger_dsn
    lease = 4.0  # short for the test, long enough that a loaded machine keeps its heartbeats
    with serve_process(dsn, "--lease", str(lease), log=tmp_path / "a.log") as victim:
        wait_until(lambda: len(listen_pids(dsn)) == 1, message="the first dispatcher")
        query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.hold')")
        wait_until(lambda: ledger(dsn, "started"), message="the job to start")
        with serve_process(
            dsn, "--lease", str(lease), "--poll-interval", "0.5", log=tmp_path / "b.log"
        ) as rescuer:
            wait_until(lambda: len(listen_pids(dsn)) == 2, message="the second dispatcher")
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            killed_at = time.monotonic()
            # The rescuer re-runs it (attempt 2); let that attempt finish.
            wait_until(
                lambda: len(ledger(dsn, "started")) == 2,
                timeout=30,
                message="the rescued job to start again",
            )
            recovered = time.monotonic() - killed_at
            job_id = ledger(dsn, "started")[0][0]
            query(dsn, "INSERT INTO release VALUES (%s)", job_id)
            wait_until(lambda: statuses(dsn) == {"succeeded": 1}, message="success")
    started = ledger(dsn, "started")
    assert [(a, p) for _, a, p in started] == [(1, victim.pid), (2, rescuer.pid)]
    assert ledger(dsn, "finished") == [(job_id, 2, rescuer.pid)]
    assert query(
        dsn, "SELECT attempts, last_error LIKE 'attempt 1 lost: the lease%%' FROM notifyq.jobs"
    ) == [(2, True)]
    # Rescue bound: lease + rescue interval (<= poll) + poll, plus process start-up slack.
    assert recovered < lease + 0.5 + 0.5 + 5


def test_listen_backend_terminated_reconnects_and_catches_up(
    ledger_dsn: str, tmp_path: Path
) -> None:
    dsn = ledger_dsn
    # An hour-long poll: only LISTEN and the reconnect catch-up can start jobs here.
    with serve_process(dsn, "--poll-interval", "3600", log=tmp_path / "serve.log"):
        wait_until(lambda: len(listen_pids(dsn)) == 1, message="the dispatcher")
        old = listen_pids(dsn)[0]
        query(dsn, "SELECT pg_terminate_backend(%s)", old)
        # Committed while nobody listens: its notification is lost for good.
        query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.record')")
        wait_until(lambda: statuses(dsn) == {"succeeded": 1}, message="the catch-up claim")
        new = wait_until(lambda: listen_pids(dsn), message="a new listener")
        assert new != [old]
        query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.record')")
        wait_until(lambda: statuses(dsn) == {"succeeded": 2}, message="a job after reconnect")
    assert "listener lost the database" in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_under_load_loses_no_job(
    private_server: EmbeddedServer, tmp_path: Path, mode: str
) -> None:
    dsn = private_server.dsn
    query(dsn, LEDGER_DDL)
    with serve_process(dsn, "-c", "4", "--poll-interval", "1", log=tmp_path / "serve.log"):
        wait_until(lambda: len(listen_pids(dsn)) == 1, message="the dispatcher")
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task) SELECT 'ledger.record' FROM generate_series(1, 200)",
        )
        wait_until(lambda: statuses(dsn).get("succeeded", 0) >= 20, message="work under way")
        private_server.restart(mode)
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task) SELECT 'ledger.record' FROM generate_series(1, 100)",
        )
        # Jobs running during the crash come back through their leases (30 s by default)
        # at worst; most finish right after the reconnect.
        wait_until(
            lambda: statuses(dsn) == {"succeeded": 300},
            timeout=90,
            message="every job to succeed after the restart",
        )
        wait_until(lambda: len(listen_pids(dsn)) == 1, message="the listener to be back")
    runs = ledger(dsn, "ran")
    # (Ids, not 1..300: a crash makes the identity sequence skip values.)
    inserted = {r[0] for r in query(dsn, "SELECT id FROM notifyq.jobs")}
    assert {job_id for job_id, _, _ in runs} == inserted
    # A re-run happens only where the crash cut an attempt off before its outcome was written.
    reruns = len(runs) - 300
    assert reruns <= 4 + 4  # at most the jobs running plus those awaiting their write


def test_graceful_shutdown_hands_back_unfinished_jobs_without_charging(
    ledger_dsn: str, tmp_path: Path
) -> None:
    dsn = ledger_dsn
    with serve_process(
        dsn, "-c", "2", "--shutdown-timeout", "1", log=tmp_path / "serve.log"
    ) as proc:
        wait_until(lambda: len(listen_pids(dsn)) == 1, message="the dispatcher")
        query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.hold'), ('ledger.hold')")
        wait_until(lambda: len(ledger(dsn, "started")) == 2, message="both jobs to start")
        first = ledger(dsn, "started")[0][0]
        query(dsn, "INSERT INTO release VALUES (%s)", first)  # one finishes within grace
        wait_until(lambda: statuses(dsn).get("succeeded") == 1, message="the released job")
        proc.send_signal(signal.SIGTERM)
        log = tmp_path / "serve.log"
        wait_until(lambda: "claiming no more" in log.read_text(), message="the shutdown")
        query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.record')")
        assert proc.wait(timeout=30) == 0
    rows = query(dsn, "SELECT task, status, attempts, claimed_by FROM notifyq.jobs ORDER BY id")
    assert sorted(rows) == sorted(
        [
            ("ledger.hold", "succeeded", 1, None),
            ("ledger.hold", "queued", 0, None),  # interrupted, handed back, attempt not charged
            ("ledger.record", "queued", 0, None),  # inserted after SIGTERM: never claimed
        ]
    )
    assert "handed back 1 unfinished jobs" in log.read_text()


def test_second_signal_exits_at_once_and_leases_protect_the_job(ledger_dsn: str) -> None:
    dsn = ledger_dsn
    with serve_process(dsn, "--shutdown-timeout", "60", "--lease", "4") as proc:
        wait_until(lambda: len(listen_pids(dsn)) == 1, message="the dispatcher")
        query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.hold')")
        wait_until(lambda: ledger(dsn, "started"), message="the job to start")
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 128 + signal.SIGINT
    # Still running in the table, under a lease that will expire and be rescued.
    assert query(dsn, "SELECT status, attempts FROM notifyq.jobs") == [("running", 1)]
    with serve_process(dsn, "--lease", "4", "--poll-interval", "0.5"):
        wait_until(lambda: len(ledger(dsn, "started")) == 2, timeout=30, message="rescue")
        query(dsn, "INSERT INTO release SELECT job_id FROM ledger")
        wait_until(lambda: statuses(dsn) == {"succeeded": 1}, message="success")
    assert query(dsn, "SELECT attempts FROM notifyq.jobs") == [(2,)]
