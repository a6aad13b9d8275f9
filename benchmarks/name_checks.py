"""What the queue and task name rules cost per job: the schema before their checks were
rewritten without bounded repetitions (migration 13) beside the schema now, in one run.

    python -m benchmarks.name_checks --dsn postgresql://postgres@127.0.0.1:5432/postgres \
        [--jobs 200000] [--batch 200] [--rounds 150]

Builds two scratch databases, one at the version before that rewrite and one at the newest,
each with the same JOBS jobs (half queued, half succeeded, small payloads and results).
Then, ROUNDS times, alternating which database goes first, it times in each: the
dispatcher's claim of BATCH jobs (QUERIES["claim"]), their completion
(QUERIES["complete"]), an UPDATE of BATCH rows that sets no name (the completion's
shape without its triggers' work), and an INSERT of BATCH jobs.  Prints the medians and
the difference per job.  Then times the migration itself on a third database at the
older version holding JOBS jobs.  Drops every database it made.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg

from notifyq.store import QUERIES, apply_script, migration_scripts

from .server import fresh_database

LOAD = """
INSERT INTO notifyq.jobs (queue, task, payload, status, result, finished_at)
SELECT 'q' || (g %% 4), 'mail.send_welcome_email',
       jsonb_build_object('user', g, 'note', repeat('x', 100)),
       CASE WHEN g %% 2 = 0 THEN 'succeeded' ELSE 'queued' END,
       CASE WHEN g %% 2 = 0 THEN '{"sent": true}'::jsonb END,
       CASE WHEN g %% 2 = 0 THEN now() END
FROM generate_series(1, %(n)s) AS g
"""
INSERT = """
INSERT INTO notifyq.jobs (queue, task, payload)
SELECT 'q' || (g %% 4), 'mail.send_welcome_email', '{"user": 1}'
FROM generate_series(1, %(n)s) AS g
"""
TOUCH = "UPDATE notifyq.jobs SET progress_message = 'bench' WHERE id = ANY(%(ids)s)"
STEPS = ("claim", "complete", "update", "insert")


def rewrite_version() -> int:
    """The migration that rewrote the checks (found by content: numbers move at merges)."""
    return next(v for v, text in migration_scripts() if "char_length(task) <= 200" in text)


def build(dsn: str, below: int | None, jobs: int) -> None:
    """The schema up to (not including) migration `below`, or whole, with `jobs` jobs."""
    with psycopg.connect(dsn) as conn:
        for version, script in migration_scripts():
            if below is None or version < below:
                apply_script(conn, version, script)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LOAD, {"n": jobs})
        conn.execute("VACUUM ANALYZE notifyq.jobs")


def one_round(conn: psycopg.Connection[Any], batch: int) -> dict[str, float]:
    times: dict[str, float] = {}
    claim = dict(
        queues=["q0", "q1", "q2", "q3"],
        limit=batch,
        claimant="bench:1",
        lease=60.0,
        task_names=["mail.send_welcome_email"],
    )
    start = time.perf_counter()
    rows = conn.execute(QUERIES["claim"], claim, prepare=True).fetchall()
    times["claim"] = time.perf_counter() - start
    ids = [row[0] for row in rows if row[0] is not None]
    assert len(ids) == batch, len(ids)
    start = time.perf_counter()
    conn.execute(
        QUERIES["complete"],
        {
            "ids": ids,
            "attempts": [1] * len(ids),
            "claimant": "bench:1",
            **dict.fromkeys(
                ("outcomes", "errors", "results", "retry_in", "progresses", "progress_messages")
            ),
        },
        prepare=True,
    )
    times["complete"] = time.perf_counter() - start
    start = time.perf_counter()
    conn.execute(TOUCH, {"ids": ids}, prepare=True)
    times["update"] = time.perf_counter() - start
    start = time.perf_counter()
    conn.execute(INSERT, {"n": batch}, prepare=True)
    times["insert"] = time.perf_counter() - start
    return times


def time_migration(admin: str, jobs: int) -> None:
    version = rewrite_version()
    script = dict(migration_scripts())[version]
    with fresh_database(admin) as dsn:
        build(dsn, version, jobs)
        with psycopg.connect(dsn) as conn:
            start = time.perf_counter()
            apply_script(conn, version, script)
            conn.commit()
            took = time.perf_counter() - start
        print(f"migration {version} on {jobs:,} jobs: {took:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a server where this role may CREATEDB")
    parser.add_argument("--jobs", type=int, default=200_000, help="jobs loaded (default 200000)")
    parser.add_argument("--batch", type=int, default=200, help="jobs per statement (default 200)")
    parser.add_argument("--rounds", type=int, default=150, help="rounds (default 150)")
    args = parser.parse_args()
    if args.rounds * args.batch > args.jobs // 2:
        parser.error("--rounds x --batch must not exceed the queued jobs (half of --jobs)")
    version = rewrite_version()
    with fresh_database(args.dsn) as base_dsn, fresh_database(args.dsn) as new_dsn:
        build(base_dsn, version, args.jobs)
        build(new_dsn, None, args.jobs)
        timings: dict[str, dict[str, list[float]]] = {
            name: {step: [] for step in STEPS} for name in ("base", "now")
        }
        with (
            psycopg.connect(base_dsn, autocommit=True) as base,
            psycopg.connect(new_dsn, autocommit=True) as new,
        ):
            sides = [("base", base), ("now", new)]
            for n in range(args.rounds):
                for name, conn in sides if n % 2 == 0 else sides[::-1]:
                    for step, took in one_round(conn, args.batch).items():
                        timings[name][step].append(took)
        print(f"{args.rounds} rounds of {args.batch} jobs, {args.jobs:,} jobs loaded; medians:")
        print(f"{'statement':10} {'v' + str(version - 1):>10} {'now':>10} {'saved/job':>10}")
        for step in STEPS:
            base_us = statistics.median(timings["base"][step]) * 1e6
            new_us = statistics.median(timings["now"][step]) * 1e6
            saved = (base_us - new_us) / args.batch
            print(f"{step:10} {base_us:8,.0f}µs {new_us:8,.0f}µs {saved:8.2f}µs")
    time_migration(args.dsn, args.jobs)


if __name__ == "__main__":
    main()
