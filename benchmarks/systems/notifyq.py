"""notifyq itself: `notifyq serve` defaults except --concurrency (and --no-listen)."""

from __future__ import annotations

import logging
from typing import Any

import notifyq
from notifyq import migrate

from .base import QUEUE_SCENARIOS, Stamper, WorkerOptions


class Notifyq:
    name = "notifyq"
    requires = None
    scenarios = QUEUE_SCENARIOS | {"idle", "scale", "crowd", "contended-draining"}
    table = "notifyq.jobs"
    notify_triggers = ("USER",)  # both of notifyq's triggers are notify triggers
    insert_notify_triggers = ("jobs_notify_inserted",)  # the one an INSERT fires
    insert_one = "INSERT INTO notifyq.jobs (task) VALUES ('bench.job') RETURNING id"
    insert_bulk = (
        "INSERT INTO notifyq.jobs (task) SELECT 'bench.job' FROM generate_series(1, %(n)s)"
    )
    # EXISTS on the partial indexes: cheap enough to poll every 20 ms.
    pending = (
        "SELECT EXISTS (SELECT 1 FROM notifyq.jobs WHERE status = 'running')"
        " OR EXISTS (SELECT 1 FROM notifyq.jobs WHERE status = 'queued' AND run_at <= now())"
    )

    def install(self, dsn: str) -> None:
        migrate.migrate(dsn)

    async def serve(self, options: WorkerOptions) -> None:
        logging.basicConfig(level=logging.WARNING)
        stamp = Stamper(options)
        app = notifyq.App(dsn=options.dsn)

        @app.task(name="bench.job")
        async def job(payload: Any, ctx: notifyq.JobContext) -> None:
            await stamp(ctx.id)

        settings = notifyq.Settings(concurrency=options.concurrency, listen=options.listen)
        await app.worker(settings, dsn=options.dsn).run(handle_signals=True)
