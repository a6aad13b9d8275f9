"""What the dashboard (`notifyq web`) costs the database, with 1 and 100 open tabs,
idle and under a steady load.

    python -m benchmarks.web_cost --dsn postgresql://postgres@127.0.0.1:5432/postgres

Creates a scratch database (`notifyq_web_cost`), runs the dashboard's app in this
process with its lifespan (the hub: one LISTEN connection, one Store), opens `tabs`
live streams on it (raw ASGI calls, as a browser's EventSource would hold them) and
counts, over `--seconds`, the statements the dashboard ran (its Store's counter:
page loads and refreshes; the LISTEN connection adds one `SELECT 1` per quiet
interval, not counted) and the SSE messages each tab received.  Under load, a
producer inserts `--rate` jobs/s (batches every 0.1 s) and an in-process dispatcher
runs them (no-op), so notifyq_jobs and notifyq_status fire continuously.  Drops the
database at the end.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import notifyq
from notifyq import Settings, migrate
from notifyq.web import create_app

NAME = "notifyq_web_cost"


async def tab(app: Any, received: list[int], index: int) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/events",
        "raw_path": b"/events",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
    }
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and b"event: overview" in message["body"]:
            received[index] += 1

    await app(scope, receive, send)


async def produce(dsn: str, rate: int) -> None:
    batch = max(1, rate // 10)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        next_at = time.monotonic()
        while True:
            await conn.execute(
                "INSERT INTO notifyq.jobs (task) SELECT 'noop' FROM generate_series(1, %s)",
                [batch],
            )
            next_at += 0.1
            await anyio.sleep(max(0.0, next_at - time.monotonic()))


async def measure(dsn: str, tabs: int, load: int, seconds: float) -> dict[str, float]:
    app = create_app(dsn)
    hub = app.state.hub
    received = [0] * tabs
    worker_app = notifyq.App(dsn)

    @worker_app.task(name="noop")
    async def noop(payload: Any) -> None:
        return None

    async with app.router.lifespan_context(app), anyio.create_task_group() as tg:
        for i in range(tabs):
            tg.start_soon(tab, app, received, i)
        if load:
            worker = worker_app.worker(Settings(concurrency=50), dsn=dsn)
            tg.start_soon(worker.run)
            tg.start_soon(produce, dsn, load)
        await anyio.sleep(3)  # settle: first refreshes, the dispatcher's start
        before, got = hub.statements, sum(received)
        start = time.monotonic()
        await anyio.sleep(seconds)
        elapsed = time.monotonic() - start
        statements, messages = hub.statements - before, sum(received) - got
        if load:
            worker.stop()
            await anyio.sleep(1)
        tg.cancel_scope.cancel()
    return {
        "statements_per_s": statements / elapsed,
        "messages_per_tab_per_s": messages / elapsed / tabs if tabs else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=500, help="jobs/s under load")
    args = parser.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(NAME))
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(NAME)))
    dsn = make_conninfo(args.dsn, dbname=NAME)
    try:
        migrate.migrate(dsn)
        print(f"{'tabs':>5} {'load':>9} {'statements/s':>13} {'SSE msgs/tab/s':>15}")
        for load in (0, args.rate):
            for tabs in (0, 1, 100):
                found = anyio.run(measure, dsn, tabs, load, args.seconds)
                print(
                    f"{tabs:>5} {f'{load}/s' if load else 'idle':>9} "
                    f"{found['statements_per_s']:>13.2f} {found['messages_per_tab_per_s']:>15.2f}"
                )
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(NAME))
            )


if __name__ == "__main__":
    main()
