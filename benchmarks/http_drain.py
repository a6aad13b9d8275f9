"""HTTP tasks against in-process Python handlers: the same drain, side by side, in one run.

    python -m benchmarks.http_drain --dsn postgresql://postgres@127.0.0.1:5432/postgres

Starts a no-op endpoint (a bare ASGI app under uvicorn, in its own process so it does not
share the dispatcher's interpreter), then for each concurrency (`--concurrency`, default
1, 50 and 200) drains `--jobs` no-op jobs twice with one in-process `Worker`: once with an
`async def` handler that does nothing, once as an HTTP task POSTing to the endpoint.  It
prints jobs/s for each, and at concurrency 1 the time per job of each: their difference is
the latency an HTTP delivery adds per job (a request over a kept-alive local connection,
and the endpoint's own time).  Uses a scratch database (`notifyq_http_drain`), dropped at
the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from typing import Any

import anyio
import httpx
import psycopg
from psycopg.conninfo import make_conninfo

import notifyq
from notifyq import Settings, migrate

NAME = "notifyq_http_drain"


async def noop(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The endpoint: read the request, answer 200 with an empty body."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_endpoint() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.http_drain:noop",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.post(url, content=b"{}")
            return proc, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def drain(dsn: str, kind: str, url: str, concurrency: int, jobs: int) -> float:
    """Seconds to run `jobs` no-op jobs of `kind` (python | http) at `concurrency`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE notifyq.jobs")
        conn.execute(
            "INSERT INTO notifyq.jobs (task) SELECT %s FROM generate_series(1, %s)",
            [f"bench.{kind}", jobs],
        )
        conn.execute("VACUUM ANALYZE notifyq.jobs")
    app = notifyq.App(dsn=dsn)
    if kind == "http":
        app.http_task("bench.http", url=url)
    else:

        @app.task(name="bench.python")
        async def nothing(payload: Any) -> None:
            pass

    worker = app.worker(Settings(concurrency=concurrency))

    async def run() -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await worker.ready.wait()
            start = time.perf_counter()
            # A counter, not an event: checking it every 5 ms costs the drain nothing.
            while worker.completer.written < jobs:  # noqa: ASYNC110
                await anyio.sleep(0.005)
            elapsed = time.perf_counter() - start
            worker.stop()
        return elapsed

    return anyio.run(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a server where this role may CREATEDB")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50, 200])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--serial-jobs", type=int, default=1_000, help="jobs at concurrency 1")
    args = parser.parse_args()
    dsn = make_conninfo(args.dsn, dbname=NAME)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {NAME}")
    endpoint, url = start_endpoint()
    try:
        migrate.migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT notifyq.set_history(false)")  # the drain, not the history
        print(f"{'concurrency':>11} {'python jobs/s':>14} {'http jobs/s':>12} {'added/job':>10}")
        for concurrency in args.concurrency:
            jobs = args.serial_jobs if concurrency == 1 else args.jobs
            seconds = {
                kind: drain(dsn, kind, url, concurrency, jobs) for kind in ("python", "http")
            }
            added = (seconds["http"] - seconds["python"]) / jobs * concurrency
            print(
                f"{concurrency:>11} {jobs / seconds['python']:>14,.0f} "
                f"{jobs / seconds['http']:>12,.0f} {added * 1e3:>8.2f}ms"
            )
    finally:
        endpoint.kill()
        endpoint.wait()
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")


if __name__ == "__main__":
    main()
