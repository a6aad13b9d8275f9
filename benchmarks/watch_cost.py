"""What one `notifyq watch` costs the database, in statements per second.

    python -m benchmarks.watch_cost --dsn postgresql://postgres@127.0.0.1:5432/postgres

Creates a scratch database (`notifyq_watch_cost`) on that server, runs `notifyq watch
--json` against it, and counts the database's transactions
(`pg_stat_database.xact_commit + xact_rollback`; every autocommit statement is one) over
20 s idle, then over 20 s of a stream of `notifyq_status` notifications, less the stream's
own statements.  Drops the database at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psycopg
from psycopg.conninfo import make_conninfo

from notifyq import channels

NAME = "notifyq_watch_cost"
WINDOW = 20.0


def transactions(admin: str) -> int:
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", [NAME]
        ).fetchone()
    assert row is not None
    return int(row[0])


def settle() -> None:
    # Backends report their statistics at most about once a second when idle.
    time.sleep(1.5)


def window(admin: str, dsn: str, rate: float) -> tuple[float, int, int]:
    """(seconds, watch's statements, the stream's statements) of one window."""
    settle()
    before = transactions(admin)
    sent = 0
    start = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as stream:
        while (elapsed := time.monotonic() - start) < WINDOW:
            if rate:
                stream.execute("SELECT pg_notify(%s, 'benchmark')", (channels.STATUS,))
                sent += 1
                time.sleep(max(0.0, sent / rate - elapsed))
            else:
                time.sleep(0.1)
    elapsed = time.monotonic() - start
    settle()
    return elapsed, transactions(admin) - before - sent, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a server where this role may CREATEDB")
    parser.add_argument("--rate", type=float, default=60.0, help="notifications/s (60)")
    args = parser.parse_args()
    admin = args.dsn
    dsn = make_conninfo(admin, dbname=NAME)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {NAME}")
        conn.execute(f"CREATE DATABASE {NAME}")
    cmd = [sys.executable, "-m", "notifyq"]
    try:
        subprocess.run([*cmd, "migrate", "--dsn", dsn], check=True, capture_output=True)
        watch = subprocess.Popen(
            [*cmd, "watch", "--json", "--dsn", dsn],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(3)  # start-up: connect, LISTEN, first refresh
            for label, rate in (("idle", 0.0), ("notification stream", args.rate)):
                seconds, statements, sent = window(admin, dsn, rate)
                print(
                    f"{label:20} {statements / seconds:6.2f} statements/s over {seconds:.1f} s"
                    f"  ({sent / seconds:.1f} notifications/s)"
                )
        finally:
            watch.terminate()
            watch.wait(timeout=15)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")


if __name__ == "__main__":
    main()
