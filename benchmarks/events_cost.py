"""What per-job events (notifyq_events) cost a drain and an enqueue, on and off.

    python -m benchmarks.events_cost --dsn postgresql://postgres@127.0.0.1:5432/postgres

Creates a scratch database (`notifyq_events_cost`) on that server and measures, in
rounds that alternate the three states so drift on a shared machine hits them alike:

- `none`: the events triggers disabled (`ALTER TABLE ... DISABLE TRIGGER`), as if the
  feature did not exist: the baseline;
- `off`: the default, no queue has events on (each statement pays one probe of
  notifyq.queue_events);
- `on`: events on for the queue (`notifyq.set_events('default', true)`).

Each round measures, per state: one producer's autocommit single-row INSERTs
(`--singles` of them, jobs/s); five times as many single-row INSERTs, then as many
single-row UPDATEs of `progress`, in a loop inside the server (a DO block timed by
clock_timestamp: the statements' own cost, triggers included, without round trips
or commits; microseconds each); bulk `INSERT ... SELECT generate_series` of `--bulk`
rows (`--bulk-rounds` statements, rows/s); and a drain of `--jobs` no-op jobs by one
in-process dispatcher at `--concurrency` (jobs/s, from its start until all are
written).  A connection LISTENs on notifyq_events throughout and consumes what
arrives, as a follower would.  Prints the median (min-max) of the rounds per state
and the ratios.  Drops the database at the end.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import defaultdict
from typing import Any

import anyio
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import notifyq
from notifyq import Settings, channels, migrate

NAME = "notifyq_events_cost"
STATES = ("none", "off", "on")
TRIGGERS = ("jobs_events_inserted", "jobs_events_changed")


def set_state(dsn: str, state: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        action = "DISABLE" if state == "none" else "ENABLE"
        for trigger in TRIGGERS:
            conn.execute(f"ALTER TABLE notifyq.jobs {action} TRIGGER {trigger}".encode())
        conn.execute("SELECT notifyq.set_events('default', %s)", [state == "on"])


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE notifyq.jobs, notifyq.job_history RESTART IDENTITY")
        conn.execute("VACUUM ANALYZE notifyq.jobs")


def singles(dsn: str, count: int) -> float:
    """Single-row INSERTs, each committed: a producer's usual path."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO notifyq.jobs (task) VALUES ('bench.noop')")  # warm up
        start = time.perf_counter()
        for _ in range(count):
            conn.execute("INSERT INTO notifyq.jobs (task) VALUES ('bench.noop')")
        return count / (time.perf_counter() - start)


SERVER_LOOP = """
DO $$
DECLARE
    started timestamptz;
BEGIN
    FOR i IN 1..{count} LOOP
        INSERT INTO notifyq.jobs (task) VALUES ('bench.noop');
    END LOOP;
    started := clock_timestamp();
    FOR i IN 1..{count} LOOP
        {statement};
    END LOOP;
    RAISE NOTICE '%', extract(epoch FROM clock_timestamp() - started);
END
$$"""
STATEMENTS = {
    "INSERT": "INSERT INTO notifyq.jobs (task) VALUES ('bench.noop')",
    # A progress report's write, one job per statement (as notifyq.progress does).
    "UPDATE": "UPDATE notifyq.jobs SET progress = i % 100 WHERE id = i",
}


def server_loop(dsn: str, count: int, kind: str) -> float:
    """Microseconds per single-row statement, run in a loop inside the server: the
    statement's own cost, triggers included, without round trips or commits."""
    notices: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(float(diag.message_primary or 0)))
        loop = SERVER_LOOP.format(count=count, statement=STATEMENTS[kind])
        conn.execute(loop.encode())
    return notices[-1] / count * 1e6


def bulk(dsn: str, rows: int, statements: int) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        spent = 0.0
        for _ in range(statements):
            start = time.perf_counter()
            conn.execute(
                "INSERT INTO notifyq.jobs (task) SELECT 'bench.noop' FROM generate_series(1, %s)",
                [rows],
            )
            spent += time.perf_counter() - start
        return rows * statements / spent


def drain(dsn: str, jobs: int, concurrency: int) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO notifyq.jobs (task) SELECT 'bench.noop' FROM generate_series(1, %s)",
            [jobs],
        )
        conn.execute("VACUUM ANALYZE notifyq.jobs")
    app = notifyq.App(dsn=dsn)

    @app.task(name="bench.noop")
    async def noop(payload: Any) -> None:
        pass

    worker = app.worker(Settings(concurrency=concurrency))

    async def run() -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            start = time.perf_counter()
            # A counter, not an event: checking it every 10 ms costs the drain nothing.
            while worker.completer.written < jobs:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            elapsed = time.perf_counter() - start
            worker.stop()
        return jobs / elapsed

    return anyio.run(run)


class Follower:
    """A connection that LISTENs on notifyq_events and consumes everything, in a thread."""

    def __init__(self, dsn: str) -> None:
        self.events = 0
        self._stop = threading.Event()
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channels.EVENTS)))
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        while not self._stop.is_set():
            for _ in self._conn.notifies(timeout=0.2):
                self.events += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


def describe(values: list[float]) -> str:
    digits = 1 if statistics.median(values) < 1000 else 0
    low, high = min(values), max(values)
    return f"{statistics.median(values):>9,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a server where this role may CREATEDB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--singles", type=int, default=3000)
    parser.add_argument("--bulk", type=int, default=10_000)
    parser.add_argument("--bulk-rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    dsn = make_conninfo(args.dsn, dbname=NAME)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)".encode())
        conn.execute(f"CREATE DATABASE {NAME}".encode())
    figures: dict[tuple[str, str], list[float]] = defaultdict(list)
    follower = None
    try:
        migrate.migrate(dsn)
        follower = Follower(dsn)
        for round_ in range(1, args.rounds + 1):
            single = "enqueue, single-row INSERTs, each committed (jobs/s)"
            looped = {
                kind: f"server-side loop of {args.singles * 5:,} single-row {kind}s (µs each)"
                for kind in STATEMENTS
            }
            many = f"enqueue, {args.bulk:,}-row INSERTs (rows/s)"
            drained = f"drain, {args.jobs:,} jobs at c={args.concurrency} (jobs/s)"
            for state in STATES if round_ % 2 else reversed(STATES):
                set_state(dsn, state)
                reset(dsn)
                figures[single, state].append(singles(dsn, args.singles))
                for kind, measure in looped.items():
                    reset(dsn)
                    figures[measure, state].append(server_loop(dsn, args.singles * 5, kind))
                reset(dsn)
                figures[many, state].append(bulk(dsn, args.bulk, args.bulk_rounds))
                reset(dsn)
                figures[drained, state].append(drain(dsn, args.jobs, args.concurrency))
                print(f"round {round_} {state}: done", flush=True)
        print(f"\n# python -m benchmarks.events_cost, {args.rounds} rounds, median (min-max)")
        print(f"# notifications the follower received on notifyq_events: {follower.events:,}")
        for measure in dict.fromkeys(m for m, _ in figures):
            print(f"\n{measure}")
            for state in STATES:
                print(f"  {state:5} {describe(figures[measure, state])}")
            med = {state: statistics.median(figures[measure, state]) for state in STATES}
            if "µs" in measure:  # a cost: the difference says what each state adds
                print(
                    f"  off-none {med['off'] - med['none']:+.1f} µs   on-off "
                    f"{med['on'] - med['off']:+.1f} µs"
                )
            else:  # a rate: the ratio says what each state keeps
                print(
                    f"  off/none {med['off'] / med['none']:.3f}   on/off "
                    f"{med['on'] / med['off']:.3f}"
                )
    finally:
        if follower is not None:
            follower.close()
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)".encode())


if __name__ == "__main__":
    main()
