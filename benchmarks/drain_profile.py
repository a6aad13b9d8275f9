"""Where a notifyq drain spends its time: one in-process dispatcher, no harness.

    python -m benchmarks.drain_profile --dsn postgresql://postgres@127.0.0.1:5432/postgres \
        --concurrency 200

Creates a scratch database (`notifyq_drain_profile`), loads `--jobs` no-op jobs, runs one
`Worker` in this process until all are finished, and prints jobs/s, the dispatcher's CPU
time per job (this process: dispatcher and handlers; PostgreSQL's own CPU is not in it),
and the count, total and median time of each claim and completion statement.  Drops the
database at the end.  `--profile FILE` runs it under cProfile; `py-spy record` gives a
sampling profile.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections import defaultdict
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import make_conninfo

import notifyq
from notifyq import Settings, migrate, store

NAME = "notifyq_drain_profile"
TIMED = ("claim", "complete")


def timed_store() -> dict[str, list[float]]:
    """Wrap Store's claim and completion methods to record how long each statement took."""
    spent: dict[str, list[float]] = defaultdict(list)
    for name in TIMED:
        real = getattr(store.Store, name)

        def timed(
            self: store.Store, *args: Any, _real: Any = real, _name: str = name, **kwargs: Any
        ) -> Any:
            async def run() -> Any:
                start = time.perf_counter()
                try:
                    return await _real(self, *args, **kwargs)
                finally:
                    spent[_name].append(time.perf_counter() - start)

            return run()

        setattr(store.Store, name, timed)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a server where this role may CREATEDB")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument(
        "--history",
        choices=["on", "off"],
        default="on",
        help="the status history triggers (notifyq.set_history), to measure what they cost",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run the drain under cProfile, save the stats to FILE and print the top functions",
    )
    args = parser.parse_args()
    dsn = make_conninfo(args.dsn, dbname=NAME)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {NAME}")
        conn.execute(f"CREATE DATABASE {NAME}")
    try:
        migrate.migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT notifyq.set_history(%s)", [args.history == "on"])
            conn.execute(
                "INSERT INTO notifyq.jobs (task) SELECT 'bench.noop' FROM generate_series(1, %s)",
                [args.jobs],
            )
            conn.execute("VACUUM ANALYZE notifyq.jobs")
        app = notifyq.App(dsn=dsn)

        @app.task(name="bench.noop")
        async def noop(payload: Any) -> None:
            pass

        spent = timed_store()
        worker = app.worker(Settings(concurrency=args.concurrency))

        async def drain() -> tuple[float, float]:
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                start, cpu = time.perf_counter(), time.process_time()
                # A counter, not an event: checking it every 10 ms costs the drain nothing.
                while worker.completer.written < args.jobs:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                worker.stop()
            return elapsed, cpu

        if args.profile:
            # Deterministic profiling slows the drain about twofold: read its shares, not
            # its jobs/s.
            profiler = cProfile.Profile()
            elapsed, cpu = profiler.runcall(anyio.run, drain)
            profiler.dump_stats(args.profile)
            pstats.Stats(args.profile).sort_stats("tottime").print_stats(20)
        else:
            elapsed, cpu = anyio.run(drain)
        print(
            f"c={args.concurrency} history {args.history}: {args.jobs / elapsed:,.0f} jobs/s, "
            f"{cpu / args.jobs * 1e6:.0f} µs CPU per job in this process"
        )
        for name in TIMED:
            times = spent[name]
            print(
                f"  {name:8} {len(times):5} statements, {sum(times):6.2f} s in all, "
                f"median {statistics.median(times) * 1e3:.1f} ms"
            )
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")


if __name__ == "__main__":
    main()
