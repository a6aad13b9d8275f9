"""The floor: a hand-written batched SKIP LOCKED loop that deletes each job it takes.

What PostgreSQL allows a queue on this machine, not a queue anyone should
run: its own minimal table (`minimal_jobs`: an identity key, a task name and
a payload, no other index), and one autocommit statement per batch that
claims and deletes at once, so a worker that dies loses its batch (at most
once).  No state, retries, leases, history or fairness; every at-least-once
queue must write more than this.

Three connections (asyncpg, which reads notifications while a connection is
idle, so the first one also LISTENs), each a claim loop sharing the
`concurrency` handler slots.  A statement-level INSERT trigger notifies
`minimal_jobs`; each notification wakes one idle loop, a claim that comes
back full claims again at once, and without notifications for 5 s one loop
polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from .base import QUEUE_SCENARIOS, Stamper, WorkerOptions

SCHEMA = """
CREATE TABLE minimal_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task text NOT NULL,
    payload jsonb
);
CREATE FUNCTION minimal_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('minimal_jobs', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER minimal_jobs_notify AFTER INSERT ON minimal_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION minimal_notify();
"""

# The MATERIALIZED CTE keeps the LIMIT: `WHERE id IN (SELECT ... LIMIT n)` may be
# re-run per row under a nested loop and take more than n.
CLAIM = """
WITH next AS MATERIALIZED (
    SELECT id FROM minimal_jobs ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
)
DELETE FROM minimal_jobs j USING next WHERE j.id = next.id RETURNING j.id, j.payload
"""

CONNECTIONS = 3
POLL = 5.0


class Minimal:
    name = "minimal"
    requires = "asyncpg"
    scenarios = QUEUE_SCENARIOS | {"idle"}
    table = "minimal_jobs"
    notify_triggers = ("minimal_jobs_notify",)
    insert_one = "INSERT INTO minimal_jobs (task) VALUES ('bench.job') RETURNING id"
    insert_bulk = (
        "INSERT INTO minimal_jobs (task) SELECT 'bench.job' FROM generate_series(1, %(n)s)"
    )
    pending = "SELECT EXISTS (SELECT 1 FROM minimal_jobs)"

    def install(self, dsn: str) -> None:
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)

    async def serve(self, options: WorkerOptions) -> None:
        import asyncpg

        stamp = Stamper(options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # A token per notification, at most one per loop: a loop that wakes to an
        # empty table costs one statement, a loop left asleep costs latency.
        wake: asyncio.Queue[None] = asyncio.Queue(maxsize=CONNECTIONS)
        notified = asyncio.Event()

        def nudge(*_: Any) -> None:
            notified.set()
            with contextlib.suppress(asyncio.QueueFull):
                wake.put_nowait(None)

        conns = [await asyncpg.connect(options.dsn) for _ in range(CONNECTIONS)]
        await conns[0].add_listener("minimal_jobs", nudge)
        free = options.concurrency
        freed = asyncio.Event()
        batch = max(1, -(-options.concurrency // CONNECTIONS))

        async def run(job_id: int) -> None:
            nonlocal free
            await stamp(job_id)
            free += 1
            freed.set()

        async def claimer(conn: Any, tg: asyncio.TaskGroup) -> None:
            nonlocal free
            full = True  # every loop claims once at start
            while not stop.is_set():
                if not full:
                    await wake.get()
                if free == 0:
                    freed.clear()
                    await freed.wait()
                    continue
                n = min(batch, free)
                free -= n  # held while the claim runs, so two loops cannot both take them
                rows = await conn.fetch(CLAIM, n)
                free += n - len(rows)
                if len(rows) < n:
                    freed.set()
                for row in rows:
                    tg.create_task(run(row[0]))
                full = len(rows) == n

        async def poller() -> None:
            while not stop.is_set():
                notified.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(notified.wait(), POLL)
                    continue
                nudge()

        async def stopper(tasks: list[asyncio.Task[None]]) -> None:
            await stop.wait()
            for t in tasks:
                t.cancel()

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(claimer(c, tg)) for c in conns]
            tasks.append(tg.create_task(poller()))
            tg.create_task(stopper(tasks))
        for c in conns:
            with contextlib.suppress(Exception):
                await c.close()
