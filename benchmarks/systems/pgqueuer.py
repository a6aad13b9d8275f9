"""PgQueuer with its asyncpg driver and with its psycopg driver.

Configured as its Performance Tuning guide says for short jobs: a larger
`batch_size` (jobs fetched per dequeue round trip) and `max_concurrent_tasks`
as the global cap, which must be at least twice the batch size.  For a
concurrency setting c: max_concurrent_tasks = c, batch_size = c // 2 (the
largest it allows).  Schema installed with its own `Queries.install()` (what
`pgq install` runs), durable (logged) tables.  One connection per worker,
as in its documentation's examples.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from .base import QUEUE_SCENARIOS, Stamper, WorkerOptions


class PgQueuer:
    requires = "pgqueuer"
    scenarios = QUEUE_SCENARIOS
    table = "pgqueuer"
    notify_triggers = ("tg_pgqueuer_changed",)
    insert_notify_triggers = notify_triggers
    insert_one = (
        "INSERT INTO pgqueuer (priority, entrypoint, payload, status)"
        " VALUES (0, 'bench', NULL, 'queued') RETURNING id"
    )
    insert_bulk = (
        "INSERT INTO pgqueuer (priority, entrypoint, payload, status)"
        " SELECT 0, 'bench', NULL, 'queued' FROM generate_series(1, %(n)s)"
    )
    pending = "SELECT EXISTS (SELECT 1 FROM pgqueuer)"  # finished jobs move to pgqueuer_log

    def __init__(self, driver: str) -> None:
        self.driver = driver
        self.name = f"pgqueuer-{driver}"

    async def _connect(self, dsn: str) -> tuple[Any, Any]:
        from pgqueuer import Queries

        if self.driver == "asyncpg":
            import asyncpg

            conn = await asyncpg.connect(dsn)
            return conn, Queries.from_asyncpg_connection(conn)
        import psycopg

        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        return conn, Queries.from_psycopg_connection(conn)

    def install(self, dsn: str) -> None:
        async def run() -> None:
            conn, queries = await self._connect(dsn)
            await queries.install()
            await conn.close()

        asyncio.run(run())

    async def serve(self, options: WorkerOptions) -> None:
        from pgqueuer import Job, PgQueuer

        stamp = Stamper(options)
        conn, _ = await self._connect(options.dsn)
        if self.driver == "asyncpg":
            pgq = PgQueuer.from_asyncpg_connection(conn)
        else:
            pgq = PgQueuer.from_psycopg_connection(conn)

        @pgq.entrypoint("bench")
        async def bench(job: Job) -> None:
            await stamp(int(job.id))

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, pgq.shutdown.set)
        c = options.concurrency
        await pgq.run(batch_size=max(1, c // 2), max_concurrent_tasks=max(2, c))
        await conn.close()
