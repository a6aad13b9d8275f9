"""A producer's open transaction against a real `notifyq serve` (issue 13, defect 2).

A login that may only INSERT jobs (the producer role of `notifyq roles`) inserts a job
depending on a running one and keeps its transaction open.  Before schema version 8
the INSERT locked the dependency FOR SHARE until the transaction ended, and the
dispatcher's completion of that job waited for the lock without limit: no outcome
was written, claims stopped, nothing was logged.  Three scenarios:

* a plain open transaction: it holds nothing a dispatcher needs; the dependency's
  outcome lands at once, other jobs keep completing, the dependent runs after the
  COMMIT (its deferred check sees the dependency finished), and no lock wait happens;
* SET CONSTRAINTS ALL IMMEDIATE, so the check runs at the INSERT and its share lock on
  the running dependency lasts until the transaction ends: that one outcome is
  skipped and tried again (logged, counted) while the others are written, and lands
  once the producer commits;
* the same, on a dependency that is itself waiting: writing the outcome of the job it
  waits for must release it, and that lock wait gives up after lock_timeout (lease /
  6: 1 s here), is logged and counted, and the outcome that waits is singled out and
  tried again while the others are written.

Every scenario streams other jobs meanwhile and checks that some of them complete
while the producer's transaction is open.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from tests import test_security
from tests.conftest import query, wait_until
from tests.faults import harness
from tests.faults.harness import Dispatcher, Producer
from tests.test_metrics import free_port, get, sample
from tests.test_security import Roles, as_user

roles = test_security.roles  # the fixture: a producer and a worker login of their own

LEASE = 6.0  # lock_timeout min(5, lease / 6) = 1 s
ARGS = ("-c", "4", "--lease", str(LEASE), "--poll-interval", "0.5")
DEPENDENT = (
    b"INSERT INTO notifyq.jobs (task, depends_on) VALUES ('faults.record', ARRAY[%s]) RETURNING id"
)


def status(dsn: str, job_id: int) -> str:
    return str(query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job_id)[0][0])


def succeeded_after(dsn: str, job_id: int) -> int:
    """Streamed jobs inserted after `job_id` that succeeded."""
    rows = query(
        dsn,
        "SELECT count(*) FROM notifyq.jobs WHERE id > %s AND task = 'faults.record'"
        " AND status = 'succeeded' AND depends_on IS NULL",
        job_id,
    )
    return int(rows[0][0])


def keep_completing(dsn: str, stream: Producer, n: int = 20) -> None:
    """n jobs the stream inserts from now on complete (the producer's transaction is open)."""
    stream.wait_acked(len(stream.acked) + 1)
    mark = stream.acked[-1]
    wait_until(
        lambda: succeeded_after(dsn, mark) >= n,
        timeout=20,
        message=f"{n} other jobs to complete while the producer's transaction is open",
    )


def lock_waits(port: int) -> float | None:
    return sample(get(port, "/metrics")[1], "notifyq_lock_waits_total")


@contextmanager
def scenario(dsn: str, logs: Path) -> Iterator[tuple[Dispatcher, Producer, int, int]]:
    """A dispatcher with metrics, a stream of other jobs, and one faults.hold job running
    (the dependency): yields (dispatcher, stream, metrics port, the running job's id)."""
    port = free_port()
    (held,) = harness.seed(dsn, 1, task="faults.hold")
    with (
        Dispatcher(dsn, *ARGS, "--metrics-port", str(port), log=logs / "serve.log") as proc,
        Producer(dsn, task="faults.record", every=0.02) as stream,
    ):
        wait_until(
            lambda: harness.executions(dsn, f"job_id = {held}"), message="the dependency to start"
        )
        yield proc, stream, port, held
        stream.stop()
        harness.wait_terminal(dsn, timeout=60)
        harness.check_invariants(dsn, listeners=1, logs=[proc.log])
        # The dependency ran once: its outcome was never lost to a rescue.
        assert [e[1:] for e in harness.executions(dsn, f"job_id = {held}")] == [
            (1, proc.pid, "success")
        ]
        proc.term()
        assert proc.wait(30) == 0


def stopped_with(proc: Dispatcher) -> dict[str, int]:
    """The totals of the graceful stop's log line."""
    line = next(x for x in proc.log_text().splitlines() if "stopped; since start:" in x)
    pairs = line.split("since start:", 1)[1].split()
    return {k: int(v) for k, v in (pair.split("=") for pair in pairs)}


@contextmanager
def producer(dsn: str, roles: Roles, *, immediate: bool) -> Iterator[psycopg.Connection[Any]]:
    """The producer role's login, in a transaction the scenario commits."""
    with psycopg.connect(
        as_user(dsn, roles.producer_login), application_name="faults:producer"
    ) as conn:
        if immediate:
            conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        yield conn


def insert_dependent(conn: psycopg.Connection[Any], on: int) -> int:
    row = conn.execute(DEPENDENT, (on,)).fetchone()
    assert row is not None
    # Acked only once committed: the invariants hold every job to the ledger.
    return int(row[0])


def test_an_open_producer_transaction_holds_up_no_completion(
    fault_dsn: str, roles: Roles, tmp_path: Path
) -> None:
    dsn = fault_dsn
    with scenario(dsn, tmp_path) as (proc, stream, port, held):
        with producer(dsn, roles, immediate=False) as conn:
            dependent = insert_dependent(conn, held)
            fault = harness.fault(dsn, "producer transaction open", detail=str(dependent))
            query(dsn, "INSERT INTO release (job_id) VALUES (%s)", held)
            wait_until(
                lambda: status(dsn, held) == "succeeded",
                timeout=15,
                message="the dependency's outcome to land while the producer's transaction is open",
            )
            keep_completing(dsn, stream)
            conn.commit()
            harness.fault_end(dsn, fault)
        query(dsn, "INSERT INTO acked (job_id) VALUES (%s)", dependent)
        wait_until(lambda: status(dsn, dependent) == "succeeded", message="the dependent to run")
        assert lock_waits(port) == 0  # nothing was held, nothing waited
    assert stopped_with(proc)["lock_waits"] == 0
    assert "locked by another transaction" not in proc.log_text()


def test_a_producer_holding_its_dependency_check_delays_only_that_outcome(
    fault_dsn: str, roles: Roles, tmp_path: Path
) -> None:
    dsn = fault_dsn
    with scenario(dsn, tmp_path) as (proc, stream, port, held):
        with producer(dsn, roles, immediate=True) as conn:
            dependent = insert_dependent(conn, held)
            fault = harness.fault(dsn, "producer holds its dependency check", detail=str(held))
            query(dsn, "INSERT INTO release (job_id) VALUES (%s)", held)
            busy = f"outcomes of jobs {held}#1 wait: their rows are locked by another transaction"
            wait_until(lambda: busy in proc.log_text(), message="the skipped outcome logged")
            assert "application 'faults:producer'" in proc.log_text()
            keep_completing(dsn, stream)
            assert status(dsn, held) == "running"  # its outcome waits for the lock alone
            assert (lock_waits(port) or 0) >= 1
            conn.commit()
            harness.fault_end(dsn, fault)
        query(dsn, "INSERT INTO acked (job_id) VALUES (%s)", dependent)
        wait_until(lambda: status(dsn, dependent) == "succeeded", message="the dependent to run")
    assert f"completion of job={held} attempt=1 done after waiting" in proc.log_text()
    assert stopped_with(proc)["lock_waits"] >= 1


def test_a_lock_wait_that_gives_up_is_logged_counted_and_singled_out(
    fault_dsn: str, roles: Roles, tmp_path: Path
) -> None:
    dsn = fault_dsn
    with scenario(dsn, tmp_path) as (proc, stream, port, held):
        (waiting,) = query(dsn, DEPENDENT.decode(), held)[0]
        query(dsn, "INSERT INTO acked (job_id) VALUES (%s)", waiting)
        assert status(dsn, waiting) == "waiting"
        with producer(dsn, roles, immediate=True) as conn:
            # Its check holds a share lock on `waiting`, which the completion of `held`
            # must release: that statement waits, until lock_timeout.
            dependent = insert_dependent(conn, waiting)
            fault = harness.fault(dsn, "producer holds a waiting job", detail=str(waiting))
            query(dsn, "INSERT INTO release (job_id) VALUES (%s)", held)
            singled_out = f"outcome of job={held} attempt=1 waits for a lock"
            wait_until(lambda: singled_out in proc.log_text(), message="the lock wait logged")
            assert "canceling statement due to lock timeout" in proc.log_text()
            keep_completing(dsn, stream)
            assert status(dsn, held) == "running"
            assert (lock_waits(port) or 0) >= 1
            conn.commit()
            harness.fault_end(dsn, fault)
        query(dsn, "INSERT INTO acked (job_id) VALUES (%s)", dependent)
        wait_until(
            lambda: status(dsn, waiting) == status(dsn, dependent) == "succeeded",
            message="the waiting job, then its new dependent, to run",
        )
    assert f"completion of job={held} attempt=1 done after waiting" in proc.log_text()
    assert stopped_with(proc)["lock_waits"] >= 1
