"""Drain no-op jobs with the Node.js worker (examples/node-worker) and with `notifyq serve`.

    python -m benchmarks.node_drain [--dsn DSN] [--jobs 20000] [--runs 3] \
        [--node-concurrency 100] [--node-batch 100] [--serve-concurrency 200]

Without --dsn it starts its own embedded PostgreSQL (benchmarks/server.py).  Each run of
each system gets a fresh database: `--jobs` example.noop jobs inserted by one
`INSERT ... SELECT generate_series`, `VACUUM ANALYZE`, then one worker process starts
(`node tasks.js`, or `notifyq serve` with this module's app, which has the same task) and
runs until no job is queued or running.  Rate = jobs / (last finished_at - first
started_at), both by the database clock, so process start-up does not count.  The systems
alternate (node, serve, node, serve, ...), so drift on a shared machine hits both alike;
prints every run, then the medians.  Needs node and npm; runs `npm ci` in
examples/node-worker when its node_modules is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

import notifyq
from notifyq import migrate

from .server import fresh_database, start

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "examples" / "node-worker"

app = notifyq.App()


@app.task(name="example.noop")
async def noop(payload: object) -> None:
    return None


def drain(system: str, dsn: str, jobs: int, args: argparse.Namespace, log: Path) -> float:
    """One run: jobs/s of one worker process draining `jobs` no-op jobs."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO notifyq.jobs (task) SELECT 'example.noop' FROM generate_series(1, %s)",
            (jobs,),
        )
        conn.execute("VACUUM ANALYZE notifyq.jobs")
    if system == "node":
        cmd = ["node", "tasks.js"]
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "NOTIFYQ_CONCURRENCY": str(args.node_concurrency),
            "NOTIFYQ_BATCH": str(args.node_batch),
        }
        cwd = NODE_DIR
    else:
        cmd = [sys.executable, "-m", "notifyq", "serve", "--app", "benchmarks.node_drain:app"]
        cmd += ["-c", str(args.serve_concurrency)]
        env = {**os.environ, "NOTIFYQ_DSN": dsn, "PYTHONPATH": str(REPO)}
        cwd = REPO
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            with psycopg.connect(dsn, autocommit=True) as conn:
                while conn.execute(
                    "SELECT EXISTS (SELECT FROM notifyq.jobs WHERE status IN ('queued', 'running'))"
                ).fetchone() != (False,):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"{system} did not drain: {log.read_text()[-2000:]}")
                    time.sleep(0.05)
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
                    " extract(epoch FROM max(finished_at) - min(started_at))::float8"
                    " FROM notifyq.jobs"
                ).fetchone()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert row is not None and row[0] == jobs, row
    return float(jobs / row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a server where this role may CREATEDB (default: embedded)")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--node-concurrency", type=int, default=100)
    parser.add_argument("--node-batch", type=int, default=100)
    parser.add_argument("--serve-concurrency", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise SystemExit("needs node and npm on PATH (Debian: nodejs, npm)")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)
    server = start(args.dsn)
    rates: dict[str, list[float]] = {"node": [], "serve": []}
    try:
        print(f"PostgreSQL {server.version}; {args.jobs:,} no-op jobs per drain", flush=True)
        with tempfile.TemporaryDirectory(prefix="notifyq-node-drain-") as tmp:
            for run in range(1, args.runs + 1):
                for system in rates:
                    with fresh_database(server.dsn) as dsn:
                        migrate.migrate(dsn)
                        rate = drain(system, dsn, args.jobs, args, Path(tmp) / f"{system}.log")
                    rates[system].append(rate)
                    print(f"run {run}: {system:<5} {rate:>8,.0f} jobs/s", flush=True)
    finally:
        server.close()
    node = f"node worker (concurrency {args.node_concurrency}, batch {args.node_batch})"
    serve = f"notifyq serve (concurrency {args.serve_concurrency})"
    for label, system in ((node, "node"), (serve, "serve")):
        values = rates[system]
        spread = f"{min(values):,.0f}-{max(values):,.0f}"
        print(f"{label:<45} median {statistics.median(values):>8,.0f} jobs/s ({spread})")


if __name__ == "__main__":
    main()
