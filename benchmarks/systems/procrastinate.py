"""Procrastinate with its psycopg 3 connector.

Configured as its worker documentation says for asynchronous tasks: an
`async def` task and the worker's `concurrency` set to the concurrency
setting (its default, 1, runs one job at a time).  The connector's pool is
sized so that no job waits for a connection (concurrency + 1 for the
LISTEN connection, at most 17: a 2-core machine gains nothing past that).
Schema applied with its own SchemaManager (what `procrastinate schema
--apply` runs).  Finished jobs are kept (its default, like notifyq).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .base import QUEUE_SCENARIOS, Stamper, WorkerOptions


class Procrastinate:
    name = "procrastinate"
    requires = "procrastinate"
    scenarios = QUEUE_SCENARIOS
    table = "procrastinate_jobs"
    notify_triggers = ("procrastinate_jobs_notify_queue_job_inserted_v1",)
    insert_notify_triggers = notify_triggers
    insert_one = (
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
        " VALUES ('default', 'bench', '{}') RETURNING id"
    )
    insert_bulk = (
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
        " SELECT 'default', 'bench', '{}' FROM generate_series(1, %(n)s)"
    )
    pending = "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))"

    @staticmethod
    def _app(dsn: str, pool: int = 2) -> Any:
        import procrastinate

        connector = procrastinate.PsycopgConnector(conninfo=dsn, min_size=pool, max_size=pool)
        return procrastinate.App(connector=connector)

    def install(self, dsn: str) -> None:
        async def run() -> None:
            app = self._app(dsn)
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        asyncio.run(run())

    async def serve(self, options: WorkerOptions) -> None:
        logging.basicConfig(level=logging.WARNING)
        stamp = Stamper(options)
        app = self._app(options.dsn, pool=min(options.concurrency, 16) + 1)

        @app.task(name="bench", pass_context=True)
        async def bench(context: Any, **kwargs: Any) -> None:
            await stamp(int(context.job.id))

        async with app.open_async():
            await app.run_worker_async(
                concurrency=options.concurrency, listen_notify=options.listen
            )
