"""Scenario 4: one transaction inserts a huge batch.

Exactly one notification arrives on notifyq_jobs for it (the trigger is per
statement) and the dispatcher drains it all with bounded memory.  The bulk
rows are `faults.noop` (no ledger row each: the ledger would be the
bottleneck); the job on the second queue is recorded.

A job on a second served queue, inserted right after the big one, starts
promptly: the claim takes the served queues round-robin, so one queue's
backlog never starves another.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from notifyq import channels
from tests.conftest import statuses, wait_until
from tests.faults import harness
from tests.faults.harness import Dispatcher, RssSampler
from tests.helpers import listen_on

RSS_BOUND_KIB = 400 * 1024  # generous: the dispatcher holds at most --concurrency jobs
PROMPT = 2.0  # seconds from the second queue's insert to its start


def big_insert(dsn: str, logs: Path, *, rows: int, timeout: float) -> None:
    baseline = harness.deadlocks(dsn)
    args = ("--queues", "a,b", "-c", "20", "--poll-interval", "1", "--lease", "10")
    with (
        psycopg.connect(dsn, autocommit=True) as listener,
        Dispatcher(dsn, *args, log=logs / "serve.log") as proc,
        RssSampler(proc.pid) as rss,
    ):
        notes: list[str] = []

        def on_note(note: Any) -> None:
            notes.append(note.payload)

        listener.add_notify_handler(on_note)
        listen_on(listener, channels.JOBS)
        wait_until(lambda: len(harness.listen_pids(dsn)) == 1, message="the dispatcher")
        idle_kib = rss.peak_kib
        t0 = time.monotonic()
        harness.seed(dsn, rows, task="faults.noop", queue="a", batch=rows)  # one transaction
        (other,) = harness.seed(dsn, 1, queue="b")
        wait_until(
            lambda: harness.executions(dsn, f"job_id = {other}"),
            timeout=timeout,
            message="the second queue's job to start",
        )
        latency = harness.start_latency(dsn, other)
        harness.wait_terminal(dsn, timeout=timeout)
        drained = time.monotonic() - t0
        listener.execute("SELECT 1")  # read whatever notifications are pending
        harness.check_invariants(dsn, deadlocks_before=baseline, listeners=1, logs=[proc.log])
    assert statuses(dsn) == {"succeeded": rows + 1}
    harness.record_recovery(
        f"{rows} inserts in one transaction: drained",
        drained,
        timeout,
        rss_idle_mib=round(idle_kib / 1024, 1),
        rss_peak_mib=round(rss.peak_kib / 1024, 1),
        second_queue_start_s=round(latency, 3),
    )
    assert notes.count("a") == 1, notes[:10]
    # The dispatcher drains a's backlog: while it does, its queues' inserts skip their
    # wake-up (schema 16, notifyq.queue_appetite), b's included, and b's job still starts
    # promptly (the round-robin claim above).
    assert notes.count("b") <= 1
    assert rss.samples > 0 and rss.peak_kib <= RSS_BOUND_KIB


def test_20000_inserts_in_one_transaction(fault_dsn: str, tmp_path: Path) -> None:
    big_insert(fault_dsn, tmp_path, rows=20_000, timeout=60)


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_100000_inserts_in_one_transaction(fault_dsn: str, tmp_path: Path) -> None:
    big_insert(fault_dsn, tmp_path, rows=100_000, timeout=400)


def test_second_queue_starts_promptly_behind_a_backlog(fault_dsn: str, tmp_path: Path) -> None:
    dsn = fault_dsn
    args = ("--queues", "a,b", "-c", "4", "--poll-interval", "1")
    with Dispatcher(dsn, *args, log=tmp_path / "serve.log"):
        wait_until(lambda: len(harness.listen_pids(dsn)) == 1, message="the dispatcher")
        harness.seed(dsn, 20_000, task="faults.noop", queue="a", batch=20_000)
        (other,) = harness.seed(dsn, 1, queue="b")
        wait_until(
            lambda: harness.executions(dsn, f"job_id = {other}"),
            timeout=PROMPT + 1,
            message=f"the queue-b job to start within {PROMPT}s",
        )
    assert harness.start_latency(dsn, other) <= PROMPT
