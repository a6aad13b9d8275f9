"""How long one single-job claim statement takes, planning included.

    python -m benchmarks.claim_timing --dsn postgresql://postgres@127.0.0.1:5432/postgres \
        [--generic] [--queued 1000000]

Creates a scratch database, then 1,500 times: inserts one job, times the dispatcher's
claim statement (prepared, as the dispatcher runs it) and completes the job.  Prints the
median claim and completion times of the last 1,300.  The connection has jit = off, and
`--generic` sets plan_cache_mode = force_generic_plan, as the dispatcher's claim
connection does.  `--queued N` first loads N queued jobs, due now, that the claim must
pass over: half in a queue it does not serve, half in its own queue at a lower priority
than each round's job (the claim asks for one job).  `--history off` turns the status
history off (notifyq.set_history) to show what its trigger costs a claim.  `--versus-minimal`
also times, in every round, a bare claim of the same job shape (one SKIP LOCKED probe and
an UPDATE by primary key: no caps, rate limits, round-robin or "next scheduled" row), so
what the real claim adds over that floor is measured side by side.  Drops the database
at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg

from notifyq import migrate
from notifyq.store import QUERIES

from .server import fresh_database

ROUNDS, WARMUP = 1500, 200

FILLER = """
INSERT INTO notifyq.jobs (queue, task, priority)
SELECT CASE WHEN g %% 2 = 0 THEN 'elsewhere' ELSE 'default' END, 't', -1
FROM generate_series(1, %(n)s) AS g
"""


# The floor: what any claim on this table must do (same triggers, same columns written).
MINIMAL = """
WITH c AS MATERIALIZED (
    SELECT id FROM notifyq.jobs
    WHERE status = 'queued' AND queue = 'default' AND task = 't' AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED)
UPDATE notifyq.jobs j
SET status = 'running', attempts = j.attempts + 1, started_at = now(), claimed_by = 'bench:1',
    lease_expires_at = now() + interval '30 s', max_attempts = coalesce(j.max_attempts, 5)
WHERE j.id = ANY(ARRAY(SELECT id FROM c))
RETURNING j.id, j.queue, j.task, j.payload, j.attempts, j.max_attempts, j.checkpoint
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a server where this role may CREATEDB")
    parser.add_argument("--generic", action="store_true", help="force generic plans")
    parser.add_argument(
        "--queued",
        type=int,
        default=0,
        metavar="N",
        help="queued jobs to load first, which the claim must pass over (default 0)",
    )
    parser.add_argument("--history", choices=["on", "off"], default="on")
    parser.add_argument(
        "--versus-minimal", action="store_true", help="also time a bare claim, alternating"
    )
    args = parser.parse_args()
    with fresh_database(args.dsn) as dsn:
        migrate.migrate(dsn)
        claims: list[float] = []
        completions: list[float] = []
        minimal: list[float] = []
        claim = dict(
            queues=["default"],
            limit=1,
            claimant="bench:1",
            lease=30.0,
            task_names=["t"],
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            if args.queued:
                t0 = time.monotonic()
                conn.execute(FILLER, {"n": args.queued})
                conn.execute("VACUUM ANALYZE notifyq.jobs")
                print(f"loaded {args.queued:,} queued jobs in {time.monotonic() - t0:.0f} s")
            conn.execute("SELECT notifyq.set_history(%s)", [args.history == "on"])
            conn.execute("SET jit = off")
            if args.generic:
                conn.execute("SET plan_cache_mode = force_generic_plan")
            for _ in range(ROUNDS):
                conn.execute("INSERT INTO notifyq.jobs (task) VALUES ('t')")
                start = time.perf_counter()
                rows = conn.execute(QUERIES["claim"], claim, prepare=True).fetchall()
                claims.append(time.perf_counter() - start)
                ids = [row[0] for row in rows if row[0] is not None]
                assert len(ids) == 1, ids
                start = time.perf_counter()
                conn.execute(
                    QUERIES["complete"],
                    {
                        "ids": ids,
                        "attempts": [1] * len(ids),
                        "claimant": "bench:1",
                        **dict.fromkeys(
                            (
                                "outcomes",
                                "errors",
                                "results",
                                "retry_in",
                                "progresses",
                                "progress_messages",
                            )
                        ),
                    },
                    prepare=True,
                )
                completions.append(time.perf_counter() - start)
                if args.versus_minimal:
                    conn.execute("INSERT INTO notifyq.jobs (task) VALUES ('t')")
                    start = time.perf_counter()
                    rows = conn.execute(MINIMAL, prepare=True).fetchall()
                    minimal.append(time.perf_counter() - start)
                    assert len(rows) == 1, rows
                    conn.execute(
                        "UPDATE notifyq.jobs SET status = 'succeeded', finished_at = now() "
                        "WHERE id = %s",
                        [rows[0][0]],
                    )
        print(
            f"{'generic' if args.generic else 'custom'} plans: claim median "
            f"{statistics.median(claims[WARMUP:]) * 1e6:,.0f} µs, completion median "
            f"{statistics.median(completions[WARMUP:]) * 1e6:,.0f} µs"
            + (
                f", bare claim median {statistics.median(minimal[WARMUP:]) * 1e6:,.0f} µs"
                if minimal
                else ""
            )
            + f" (history {args.history})"
        )


if __name__ == "__main__":
    main()
