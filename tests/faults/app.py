"""The fault suite's test app: every execution goes into the `executions` ledger.

Serve it with `serve_process(dsn, app=APP)` (harness.Dispatcher does).  The
ledger is written from the handler's own connections (never the dispatcher's),
so it shows what ran even when the dispatcher never wrote the outcome (killed
mid-job, database restarted).  Each row also carries the claim the attempt
ran under (`claimed_by`, `claimed_at` = the job's `started_at`, which is the
claim statement's `now()`), so rows sharing both came from one claim.

Handlers (all async, so shutdown can interrupt them; an interrupted attempt
is recorded as outcome 'interrupted'):

    faults.record   record one execution, succeed              (one INSERT)
    faults.fail     record, then raise (max_attempts 3, 0.1 s backoff)
    faults.hold     record, wait until `release` holds its id (or a NULL row), succeed
    faults.hold_first
                    attempt 1 as faults.hold; later attempts record and succeed at once
    faults.sleep    record, sleep payload["ms"] milliseconds, succeed
    faults.typed    payload must be {"n": <int>} (decode=): record, succeed
    faults.noop     succeed, recording nothing (bulk load where the ledger would be the
                    bottleneck; the invariants check ledger rows of the tasks above only)
    faults.nap      sleep payload["ms"] milliseconds, recording nothing (many slots
                    without a ledger connection each)

Outcomes in the ledger: 'running' (started, never ended: killed or cut off),
'success', 'failed', 'interrupted' (cancelled at shutdown, handed back).
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import psycopg

import notifyq

app = notifyq.App()

APP = "tests.faults.app:app"

_RECORD_FOR = 60.0  # seconds a ledger write keeps retrying through a database outage

_START = """
INSERT INTO executions (job_id, attempt, pid, claimed_by, claimed_at, outcome, ended_at)
SELECT %(id)s, %(attempt)s, %(pid)s, j.claimed_by, j.started_at, %(outcome)s,
       CASE WHEN %(outcome)s = 'running' THEN NULL ELSE clock_timestamp() END
FROM (SELECT 1) AS one
LEFT JOIN notifyq.jobs j ON j.id = %(id)s AND j.status = 'running' AND j.attempts = %(attempt)s
RETURNING exec_id
"""
_END = "UPDATE executions SET outcome = %s, ended_at = clock_timestamp() WHERE exec_id = %s"

_idle: list[psycopg.AsyncConnection[Any]] = []  # this process's ledger connections


async def _execute(statement: str, params: Any) -> list[tuple[Any, ...]]:
    """Run one ledger statement, reconnecting through outages (a restart, a kill)."""
    deadline = anyio.current_time() + _RECORD_FOR
    while True:
        conn = _idle.pop() if _idle else None
        try:
            if conn is None or conn.closed:
                conn = await psycopg.AsyncConnection.connect(
                    os.environ["NOTIFYQ_DSN"],
                    autocommit=True,
                    application_name="faults:ledger",
                    connect_timeout=5,
                )
            cur = await conn.execute(statement.encode(), params)
            rows = await cur.fetchall() if cur.description else []
        except psycopg.OperationalError:
            if conn is not None:
                await conn.close()
            if anyio.current_time() > deadline:
                raise
            await anyio.sleep(0.2)
            continue
        _idle.append(conn)
        return rows


async def _start(ctx: notifyq.JobContext, outcome: str = "running") -> int:
    params = {"id": ctx.id, "attempt": ctx.attempt, "pid": os.getpid(), "outcome": outcome}
    rows = await _execute(_START, params)
    return int(rows[0][0])


async def _end(exec_id: int, outcome: str) -> None:
    await _execute(_END, (outcome, exec_id))


async def _run(ctx: notifyq.JobContext, body: Any) -> None:
    """Record the start, run `body`, record how it ended (also when interrupted)."""
    exec_id = await _start(ctx)
    try:
        await body()
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await _end(exec_id, "interrupted")
        raise
    except Exception:
        await _end(exec_id, "failed")
        raise
    await _end(exec_id, "success")


@app.task(name="faults.record")
async def record(payload: object, ctx: notifyq.JobContext) -> None:
    await _start(ctx, "success")


async def _nothing() -> None:
    return None


@app.task(name="faults.noop")
async def noop(payload: object) -> None:
    return None


@app.task(name="faults.nap")
async def nap(payload: dict[str, Any]) -> None:
    await anyio.sleep(float(payload.get("ms", 100)) / 1000)


@app.task(name="faults.fail", max_attempts=3, backoff=notifyq.Backoff(base=0.1, factor=1))
async def fail(payload: object, ctx: notifyq.JobContext) -> None:
    async def boom() -> None:
        raise RuntimeError(f"faults.fail: attempt {ctx.attempt} fails on purpose")

    await _run(ctx, boom)


@app.task(name="faults.hold")
async def hold(payload: object, ctx: notifyq.JobContext) -> None:
    async def until_released() -> None:
        # The release is a row another process inserts: there is nothing to await but a poll.
        while not await _execute(  # noqa: ASYNC110 - polling a table, not a local event
            "SELECT 1 FROM release WHERE job_id = %s OR job_id IS NULL LIMIT 1", (ctx.id,)
        ):
            await anyio.sleep(0.05)

    await _run(ctx, until_released)


@app.task(name="faults.hold_first")
async def hold_first(payload: object, ctx: notifyq.JobContext) -> None:
    if ctx.attempt == 1:
        await hold(payload, ctx)
    else:
        await _run(ctx, _nothing)


@app.task(name="faults.sleep")
async def sleep(payload: dict[str, Any], ctx: notifyq.JobContext) -> None:
    async def nap() -> None:
        await anyio.sleep(float(payload.get("ms", 100)) / 1000)

    await _run(ctx, nap)


def _decode_typed(payload: Any) -> int:
    n = payload["n"]
    if not isinstance(n, int):
        raise TypeError(f"n must be an integer, got {type(n).__name__}")
    return n


@app.task(name="faults.typed", decode=_decode_typed)
async def typed(n: int, ctx: notifyq.JobContext) -> None:
    await _run(ctx, _nothing)
