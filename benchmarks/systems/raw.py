"""The ceiling: the least any PostgreSQL queue must do per batch, on notifyq's table.

One statement claims up to `concurrency` ready jobs (the notifyq claim's
shape: a MATERIALIZED CTE with FOR UPDATE SKIP LOCKED LIMIT n, marking them
running under a lease), the handlers run, and one statement marks the whole
batch succeeded.  No retries, fencing, leases kept, fairness or bookkeeping.
It LISTENs on notifyq_jobs and polls every 5 s, like notifyq.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import psycopg
from psycopg import sql

from notifyq import channels

from .base import QUEUE_SCENARIOS, Stamper, WorkerOptions
from .notifyq import Notifyq

CLAIM = """
WITH candidates AS MATERIALIZED (
    SELECT id FROM notifyq.jobs
    WHERE status = 'queued' AND queue = 'default' AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE notifyq.jobs j
SET status = 'running', attempts = j.attempts + 1, started_at = now(),
    claimed_by = 'raw', lease_expires_at = now() + interval '30 seconds'
FROM candidates c
WHERE j.id = c.id
RETURNING j.id, j.payload
"""

COMPLETE = """
UPDATE notifyq.jobs
SET status = 'succeeded', finished_at = now(), claimed_by = NULL, lease_expires_at = NULL
WHERE id = ANY(%(ids)s::bigint[])
"""


class Raw(Notifyq):
    name = "raw"
    scenarios = QUEUE_SCENARIOS - {"enqueue", "contended"}  # notifyq's table: same inserts

    async def serve(self, options: WorkerOptions) -> None:
        stamp = Stamper(options)
        stop = asyncio.Event()
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        conn = await psycopg.AsyncConnection.connect(options.dsn, autocommit=True)
        listener = await psycopg.AsyncConnection.connect(options.dsn, autocommit=True)
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channels.JOBS)))

        async def listen() -> None:
            async for _ in listener.notifies():
                wake.set()

        limit = options.concurrency
        async with asyncio.TaskGroup() as tg:
            listening = tg.create_task(listen())
            while not stop.is_set():
                wake.clear()
                cur = await conn.execute(CLAIM, {"limit": limit})
                rows = await cur.fetchall()
                if rows:
                    await asyncio.gather(*(stamp(row[0]) for row in rows))
                    await conn.execute(COMPLETE, {"ids": [row[0] for row in rows]})
                    if len(rows) == limit:
                        continue
                waiters = [asyncio.ensure_future(e.wait()) for e in (wake, stop)]
                await asyncio.wait(waiters, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
            listening.cancel()
        with contextlib.suppress(psycopg.Error):
            await listener.close()
            await conn.close()
