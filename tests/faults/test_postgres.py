"""Scenario 3: the database goes away under the dispatcher.

PostgreSQL restarts (`fast` and `immediate`) under load with a producer
committing throughout; the LISTEN backend is terminated while inserts commit
with nobody listening; the claim backend is terminated while claiming under
load.  (The restart and listener tests of tests/test_faults.py moved here
with their assertions.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import EmbeddedServer, query, statuses, wait_until
from tests.faults import harness
from tests.faults.harness import Dispatcher, Producer

LEASE, POLL = 3.0, 1.0
ARGS = ("--lease", str(LEASE), "--poll-interval", str(POLL))
RECONNECT = 5.0  # the claim connection's reconnect backoff is capped at 5 s


def started_after(dsn: str, at: object) -> bool:
    rows = query(dsn, "SELECT 1 FROM executions WHERE claimed_at > %s LIMIT 1", at)
    return bool(rows)


def restart_under_load(server: EmbeddedServer, logs: Path, mode: str, *, seeded: int) -> None:
    dsn = harness.prepare(server.dsn)
    concurrency = 4
    with Dispatcher(dsn, "-c", str(concurrency), *ARGS, log=logs / "serve.log") as proc:
        wait_until(lambda: len(harness.listen_pids(dsn)) == 1, message="the dispatcher")
        harness.seed(dsn, seeded, task="faults.sleep", payload='{"ms": 20}')
        with Producer(dsn, task="faults.sleep", payload='{"ms": 20}', every=0.02) as producer:
            wait_until(lambda: len(harness.executions(dsn)) >= 20, message="work under way")
            fault_id = harness.fault(dsn, f"restart {mode}")
            server.restart(mode)
            up = time.monotonic()
            harness.fault_end(dsn, fault_id)
            back_at = query(dsn, "SELECT until FROM faults WHERE fault_id = %s", fault_id)[0][0]
            wait_until(
                lambda: started_after(dsn, back_at),
                timeout=30,
                message="a job claimed after the restart",
            )
            restored = time.monotonic() - up
            producer.wait_acked(len(producer.acked) + 20)
        # Jobs running during the crash come back through their leases at worst.
        drained = harness.wait_terminal(dsn, timeout=90)
        harness.record_recovery(
            f"postgres restart {mode}: claiming again",
            restored,
            RECONNECT + POLL + 2,
            acked=len(producer.acked),
            ambiguous=len(producer.ambiguous),
            drain_after_s=round(drained, 2),
        )
        # Immediate shutdown is a crash: it resets the statistics, deadlock count included.
        harness.check_invariants(dsn, listeners=1, logs=[proc.log])
    runs = harness.executions(dsn)
    # (Ids, not 1..n: a crash makes the identity sequence skip values.)
    inserted = {r[0] for r in query(dsn, "SELECT id FROM notifyq.jobs")}
    assert {job_id for job_id, _, _, _ in runs} == inserted
    assert statuses(dsn) == {"succeeded": len(inserted)}
    # A re-run happens only where the crash cut an attempt off before its outcome was written.
    reruns = len(runs) - len(inserted)
    assert reruns <= concurrency + concurrency  # the jobs running plus those awaiting their write
    assert restored <= RECONNECT + POLL + 2


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_under_load_loses_no_job(
    private_server: EmbeddedServer, tmp_path: Path, mode: str
) -> None:
    restart_under_load(private_server, tmp_path, mode, seeded=200)


@pytest.mark.faults
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarts_repeatedly_under_load(
    private_server: EmbeddedServer, tmp_path: Path, mode: str
) -> None:
    for i in range(3):
        (tmp_path / str(i)).mkdir()
        restart_under_load(private_server, tmp_path / str(i), mode, seeded=2000)


def listen_terminated(dsn: str, logs: Path, *, rounds: int, inserts: int = 3) -> None:
    baseline = harness.deadlocks(dsn)
    worst = 0.0
    with Dispatcher(dsn, *ARGS, log=logs / "serve.log") as proc:
        wait_until(lambda: len(harness.listen_pids(dsn)) == 1, message="the dispatcher")
        for _ in range(rounds):
            old = harness.terminate_backend(dsn, "listen")
            # Committed while nobody listens: their notifications are lost for good, and
            # nothing else is inserted after them: only the catch-up or the poll finds them.
            jobs = [job for _ in range(inserts) for job in harness.seed(dsn, 1)]
            wait_until(lambda: harness.unfinished(dsn) == 0, message="the jobs committed unheard")
            worst = max([worst, *(harness.start_latency(dsn, job) for job in jobs)])
            new = wait_until(lambda: harness.listen_pids(dsn), message="a new listener")
            assert new != [old]
        harness.seed(dsn, 1)
        wait_until(lambda: harness.unfinished(dsn) == 0, message="a job after reconnect")
        harness.record_recovery(
            f"LISTEN backend terminated x{rounds}: insert to start", worst, POLL + 1.5
        )
        harness.check_invariants(dsn, deadlocks_before=baseline, listeners=1, logs=[proc.log])
    assert statuses(dsn) == {"succeeded": rounds * inserts + 1}
    assert "listener lost the database" in proc.log_text()
    assert worst <= POLL + 1.5


def test_listen_backend_terminated_jobs_start_within_the_poll(
    fault_dsn: str, tmp_path: Path
) -> None:
    listen_terminated(fault_dsn, tmp_path, rounds=1)


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_listen_backend_terminated_repeatedly(fault_dsn: str, tmp_path: Path) -> None:
    listen_terminated(fault_dsn, tmp_path, rounds=20)


def claim_backend_terminated(dsn: str, logs: Path, *, kills: int) -> None:
    baseline = harness.deadlocks(dsn)
    worst = 0.0
    with (
        Dispatcher(dsn, "-c", "8", *ARGS, log=logs / "serve.log") as proc,
        Producer(dsn, task="faults.sleep", payload='{"ms": 20}', batch=5, every=0.01) as producer,
    ):
        for _ in range(kills):
            wait_until(lambda: harness.listen_pids(dsn, "claim"), message="a claim connection")
            wait_until(lambda: len(harness.executions(dsn)) >= 20, message="work under way")
            t0 = time.monotonic()
            harness.terminate_backend(dsn, "claim")
            at = query(dsn, "SELECT max(at) FROM faults")[0][0]
            wait_until(
                lambda a=at: started_after(dsn, a),  # type: ignore[misc]
                timeout=30,
                message="a claim after the backend was terminated",
            )
            worst = max(worst, time.monotonic() - t0)
        producer.stop()
        harness.wait_terminal(dsn, timeout=60)
        harness.record_recovery(
            f"claim backend terminated x{kills}: claiming again",
            worst,
            POLL + 2,
            acked=len(producer.acked),
        )
        harness.check_invariants(dsn, deadlocks_before=baseline, listeners=1, logs=[proc.log])
    assert "claim failed" in proc.log_text()
    assert worst <= POLL + 2


def test_claim_backend_terminated_while_claiming(fault_dsn: str, tmp_path: Path) -> None:
    claim_backend_terminated(fault_dsn, tmp_path, kills=3)


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_claim_backend_terminated_many_times(fault_dsn: str, tmp_path: Path) -> None:
    claim_backend_terminated(fault_dsn, tmp_path, kills=30)
