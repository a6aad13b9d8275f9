"""Handlers that misbehave in every way the fault suite covers (scenario 5).

Each records its executions in the `ledger` table (tests.apps.ledger's DDL)
from its own connection, so the test sees what ran even when the process died.
"""

from __future__ import annotations

import os
import signal
import time

import anyio
import psycopg

import notifyq
from tests.apps.ledger import wait_for_release

app = notifyq.App()


def record(ctx: notifyq.JobContext, event: str) -> None:
    with psycopg.connect(os.environ["NOTIFYQ_DSN"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ledger (job_id, attempt, pid, event) VALUES (%s, %s, %s, %s)",
            (ctx.id, ctx.attempt, os.getpid(), event),
        )


@app.task(name="bad.raise", max_attempts=2)
def raises(payload: object, ctx: notifyq.JobContext) -> None:
    record(ctx, "ran")
    raise RuntimeError("the handler failed on purpose")


@app.task(name="bad.hang", max_attempts=2, timeout=0.5)
async def hang(payload: object, ctx: notifyq.JobContext) -> None:
    record(ctx, "ran")
    await anyio.sleep(3600)


@app.task(name="bad.block_loop")
async def block_loop(payload: dict[str, float], ctx: notifyq.JobContext) -> None:
    """An async handler that blocks the event loop: the mistake scenario 5 is about."""
    record(ctx, "started")
    time.sleep(payload["seconds"])  # noqa: ASYNC251 - blocking the loop is the point
    record(ctx, "finished")


@app.task(name="bad.hold")
def hold(payload: object, ctx: notifyq.JobContext) -> None:
    """Runs (in a thread) until the test inserts this job's id into `release`."""
    record(ctx, "started")
    wait_for_release(ctx.id)
    record(ctx, "finished")


@app.task(name="bad.unserializable")
def unserializable(payload: object, ctx: notifyq.JobContext) -> object:
    record(ctx, "ran")
    return {object(), lambda: None}  # nothing JSON (or anything else) could hold


@app.task(name="bad.suicide", max_attempts=3)
def suicide(payload: object, ctx: notifyq.JobContext) -> None:
    """A poison job: it kills the process that runs it, every time."""
    record(ctx, "ran")
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="ok.record")
def ok(payload: object, ctx: notifyq.JobContext) -> None:
    record(ctx, "ran")
