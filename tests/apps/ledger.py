"""A test app whose handlers record every execution in the database they serve.

The ledger is written from the handler's own connection, so it shows what
ran even when the dispatcher never wrote the outcome (killed mid-job).
"""

from __future__ import annotations

import os
import time

import psycopg

import notifyq

app = notifyq.App()

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS ledger (
    job_id  bigint NOT NULL,
    attempt integer NOT NULL,
    pid     integer NOT NULL,
    event   text NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS release (job_id bigint);
"""


def _record(ctx: notifyq.JobContext, event: str) -> None:
    with psycopg.connect(os.environ["NOTIFYQ_DSN"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ledger (job_id, attempt, pid, event) VALUES (%s, %s, %s, %s)",
            (ctx.id, ctx.attempt, os.getpid(), event),
        )


@app.task(name="ledger.record")
def record(payload: object, ctx: notifyq.JobContext) -> None:
    _record(ctx, "ran")


@app.task(name="ledger.hold", max_attempts=3)
def hold(payload: object, ctx: notifyq.JobContext) -> None:
    """Record the start, then wait until the test inserts this job into `release`."""
    _record(ctx, "started")
    wait_for_release(ctx.id)
    _record(ctx, "finished")


def wait_for_release(job_id: int, timeout: float = 120.0) -> None:
    """Block (in the handler's thread) until the test inserts `job_id` into `release`."""
    with psycopg.connect(os.environ["NOTIFYQ_DSN"], autocommit=True) as conn:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if conn.execute("SELECT 1 FROM release WHERE job_id = %s", (job_id,)).fetchone():
                return
            time.sleep(0.05)
