"""Scenario 9: a long transaction held elsewhere while jobs churn.

A connection runs `BEGIN; SELECT txid_current();` and sits idle in that
transaction.  Every finished job leaves dead row versions in notifyq.jobs,
and while the transaction is open VACUUM cannot remove them.  The scenario
measures claim latency (enqueue to start, from the execution ledger) and the
dead tuples left after a VACUUM, before, during and after the transaction;
`notifyq health` must warn about the transaction while it is open.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import REPO, query, wait_until
from tests.faults import harness
from tests.faults.harness import Dispatcher, Producer

POLL = 1.0


def vacuum_and_count_dead(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM notifyq.jobs")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'notifyq.jobs'::regclass"
        ).fetchone()
    return int(row[0]) if row else 0


def latencies(dsn: str, since: Any, until: Any) -> dict[str, float]:
    """Enqueue-to-start seconds of the jobs created in [since, until)."""
    rows = query(
        dsn,
        "SELECT extract(epoch FROM e.started_at - j.created_at)::float8"
        " FROM executions e JOIN notifyq.jobs j ON j.id = e.job_id"
        " WHERE j.created_at >= %s AND j.created_at < %s ORDER BY 1",
        since,
        until,
    )
    values = [r[0] for r in rows]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 3),
        "p95": round(values[int(0.95 * (len(values) - 1))], 3),
        "max": round(values[-1], 3),
    }


def now(dsn: str) -> Any:
    return query(dsn, "SELECT clock_timestamp()")[0][0]


def long_transaction(dsn: str, logs: Path, *, hold: float, phase: float) -> None:
    baseline = harness.deadlocks(dsn)
    measured: dict[str, dict[str, Any]] = {}
    with (
        Dispatcher(dsn, "-c", "4", "--poll-interval", str(POLL), log=logs / "serve.log") as proc,
        Producer(dsn, task="faults.record", every=0.01, batch=2) as producer,
    ):
        producer.wait_acked(20)
        t = now(dsn)
        time.sleep(phase)  # the churn itself is what is measured: real time is the behaviour
        measured["before"] = {"dead": vacuum_and_count_dead(dsn), **latencies(dsn, t, now(dsn))}
        with psycopg.connect(dsn, application_name="faults:long-transaction") as holder:
            holder.execute("SELECT txid_current()")
            harness.fault(dsn, "long transaction", pid=holder.info.backend_pid)
            t = now(dsn)
            time.sleep(hold)  # the transaction's age is the fault
            limit = str(hold / 2)
            checked = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "notifyq",
                    "health",
                    "--dsn",
                    dsn,
                    "--max-transaction-age",
                    limit,
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            measured["during"] = {
                "dead": vacuum_and_count_dead(dsn),
                **latencies(dsn, t, now(dsn)),
            }
            holder.commit()
        ended = time.monotonic()
        # Once it ends, VACUUM can remove what piled up.
        dead_limit = measured["before"]["dead"] + 50
        wait_until(
            lambda: vacuum_and_count_dead(dsn) <= dead_limit,
            timeout=30,
            interval=0.5,
            message="VACUUM to remove the dead rows",
        )
        recovered = time.monotonic() - ended
        t = now(dsn)
        time.sleep(phase)
        measured["after"] = {"dead": vacuum_and_count_dead(dsn), **latencies(dsn, t, now(dsn))}
        query(dsn, "UPDATE faults SET until = clock_timestamp() WHERE kind = 'long transaction'")
        producer.stop()
        harness.wait_terminal(dsn, timeout=60)
        harness.check_invariants(dsn, deadlocks_before=baseline, listeners=1, logs=[proc.log])
    extra = {
        f"{phase_name}_{k}": v
        for phase_name, m in measured.items()
        for k, v in m.items()
        if k != "n"
    }
    harness.record_recovery(
        f"long transaction {hold:.0f}s: dead rows vacuumed", recovered, 10, **extra
    )
    print(f"\nlong transaction {hold:.0f}s:", measured)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "holds back vacuum of notifyq.jobs" in checked.stdout
    assert "application_name 'faults:long-transaction'" in checked.stdout
    # The transaction held back vacuum, and nothing else: claims kept their pace.
    assert measured["during"]["dead"] > measured["before"]["dead"] + 50
    assert measured["during"]["n"] > 0 and measured["during"]["p95"] <= POLL + 1.0
    assert recovered <= 10


def test_long_transaction_while_jobs_churn(fault_dsn: str, tmp_path: Path) -> None:
    long_transaction(fault_dsn, tmp_path, hold=10, phase=1)


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_long_transaction_of_minutes(fault_dsn: str, tmp_path: Path) -> None:
    long_transaction(fault_dsn, tmp_path, hold=180, phase=20)
