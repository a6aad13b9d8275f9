"""What the insert trigger's appetite check costs 32 contended producers.

    python -m benchmarks.appetite_cost [--dsn DSN] [--rounds 5] [--seconds 1]

No worker runs: a draining row for the queue is written by hand, so every insert takes
the skipping path, and variants of notifyq.notify_inserted are swapped in between
slices (rounds alternate the variants, medians of the rounds):

    off       the trigger disabled: the rate without any notification work
    skip      the trigger as shipped, skipping (shared advisory lock, two probes, nextval)
    no-lock   the same without the shared advisory lock (unsafe: the barrier's half)
    no-count  the same without counting the decision (nextval)
    invoker   the same run as the inserting role (no SECURITY DEFINER, no SET search_path)
    empty     a trigger function that returns at once: the cost of calling a statement
              trigger at all
    notify    the trigger as shipped with a hungry row as well: it notifies every insert

Starts a private PostgreSQL (as `python -m benchmarks` does) unless --dsn is given.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from notifyq import migrate

from . import server

PRODUCERS = 32
INSERT = "INSERT INTO notifyq.jobs (task) VALUES ('bench.job') RETURNING id"


def variant(definition: str, drop: str) -> str:
    """The shipped trigger function with one line taken out."""
    kept = [line for line in definition.splitlines() if drop not in line]
    assert len(kept) == len(definition.splitlines()) - 1, drop
    return "\n".join(kept)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.appetite_cost")
    parser.add_argument("--dsn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    pg = server.start(args.dsn)
    try:
        with server.fresh_database(pg.dsn) as dsn:
            migrate.migrate(dsn)
            rates = measure(dsn, args.rounds, args.seconds)
    finally:
        pg.close()
    off = statistics.median(rates["off"])
    print(
        f"{PRODUCERS} producers, {args.rounds} rounds of {args.seconds:g} s;"
        f" PostgreSQL {pg.version}"
    )
    for name, values in rates.items():
        m = statistics.median(values)
        print(f"  {name:9} {m:8,.0f}/s  {100 * m / off:5.1f}% of off  {[round(v) for v in values]}")


def measure(dsn: str, rounds: int, seconds: float) -> dict[str, list[float]]:
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT pg_get_functiondef('notifyq.notify_inserted()'::regprocedure)"
        ).fetchone()
        assert row is not None
        shipped = str(row[0])
    bodies: dict[str, str | None] = {
        "off": None,
        "skip": shipped,
        "no-lock": variant(shipped, "pg_advisory_xact_lock_shared"),
        "no-count": variant(shipped, "nextval('notifyq.wakeups_skipped')"),
        "invoker": variant(variant(shipped, "SECURITY DEFINER"), "SET search_path"),
        "empty": shipped[: shipped.index("DECLARE")] + "BEGIN RETURN NULL; END $function$",
        "notify": shipped,
    }
    rates: dict[str, list[float]] = {name: [] for name in bodies}
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(PRODUCERS)]

    def produce(conn: psycopg.Connection[Any], until: float) -> int:
        n = 0
        while time.monotonic() < until:
            conn.execute(INSERT)
            n += 1
        return n

    try:
        with psycopg.connect(dsn, autocommit=True) as admin, ThreadPoolExecutor(PRODUCERS) as pool:
            for _ in range(rounds):
                for name, body in bodies.items():
                    verb = "DISABLE" if body is None else "ENABLE"
                    admin.execute(f"ALTER TABLE notifyq.jobs {verb} TRIGGER jobs_notify_inserted")
                    if body is not None:
                        admin.execute(body.encode())
                    # Written again each slice: a row a minute old with no dispatcher
                    # behind it is dropped by the next write (notifyq.set_appetite).
                    admin.execute(
                        "SELECT notifyq.set_appetite('bench', ARRAY['default'], 'draining',"
                        " '1 day')"
                    )
                    hungry = "hungry" if name == "notify" else None
                    admin.execute(
                        "SELECT notifyq.set_appetite('bench-hungry', ARRAY['default'], %s)",
                        (hungry,),
                    )
                    t0 = time.monotonic()
                    total = sum(pool.map(produce, conns, [t0 + seconds] * PRODUCERS))
                    rates[name].append(total / (time.monotonic() - t0))
            admin.execute(shipped.encode())
            admin.execute("ALTER TABLE notifyq.jobs ENABLE TRIGGER jobs_notify_inserted")
    finally:
        for c in conns:
            c.close()
    return rates


if __name__ == "__main__":
    main()
