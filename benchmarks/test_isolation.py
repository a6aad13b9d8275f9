"""What a clean state per test costs, three ways, alternating in one run (notifyq.testing).

    python -m benchmarks.test_isolation --dsn postgresql://postgres@127.0.0.1:5432/postgres \
        [--rounds 30] [--jobs 20]

Builds a migrated template database.  Each round, with JOBS jobs (and their history) left
as a test would leave them: the plugin's reset (store.testing.reset: DELETE from every
notifyq table, identities from 1), TRUNCATE of the same tables RESTART IDENTITY, and a
new database from the template (CREATE DATABASE ... TEMPLATE, then its DROP), in an order
that turns every round.  Prints the medians.  Drops every database it made.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from notifyq import migrate, store

FILL = "INSERT INTO notifyq.jobs (task) SELECT 't' FROM generate_series(1, %(n)s)"
TABLES = """
SELECT c.oid::regclass::text FROM pg_class c
WHERE c.relnamespace = 'notifyq'::regnamespace AND c.relkind = 'r'
  AND c.relname <> 'schema_version'
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    template = f"bench_iso_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.dsn, autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
    tpl_dsn = make_conninfo(args.dsn, dbname=template)
    migrate.migrate(tpl_dsn)
    work = f"{template}_w"
    admin.execute(
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(work), sql.Identifier(template)
        )
    )
    conn = psycopg.connect(make_conninfo(args.dsn, dbname=work), autocommit=True)
    tables = [row[0] for row in conn.execute(TABLES)]
    truncate = "TRUNCATE " + ", ".join(tables) + " RESTART IDENTITY"

    def reset() -> None:
        store.testing.reset(conn)

    def truncated() -> None:
        conn.execute(truncate.encode())

    def database() -> None:
        name = sql.Identifier(f"{template}_{uuid.uuid4().hex[:6]}")
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(name, sql.Identifier(template))
        )
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))

    ways: dict[str, Callable[[], None]] = {
        "reset (DELETE)": reset,
        "TRUNCATE": truncated,
        "CREATE DATABASE TEMPLATE + DROP": database,
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for r in range(args.rounds):
            order = list(ways)
            order = order[r % 3 :] + order[: r % 3]
            for name in order:
                conn.execute(FILL, {"n": args.jobs})
                began = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - began)
        for name, spent in times.items():
            print(f"{name:34} median {statistics.median(spent) * 1000:7.1f} ms")
    finally:
        conn.close()
        for name in (work, template):
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()


if __name__ == "__main__":
    main()
