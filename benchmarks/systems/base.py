"""What every benchmarked system provides, and the handler they all run.

A system is a job queue installed in a fresh database: its own schema (made
by its own tooling), the plain SQL that enqueues into its table, the names of
its notify triggers, a query for the jobs not yet finished, and a worker that
runs in a process of its own (`python -m benchmarks.worker SYSTEM ...`).

Every worker runs the same handler: it appends "job_id unix_time" to the
stamps file (one write, no database round trip) and then either returns at
once ("noop") or sleeps 5 ms ("sleep").  The harness measures latency from
the producer's commit to that stamp.  The first call also writes the
process's CPU time to a file beside the stamps, where the drain's CPU per
job starts counting.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import LiteralString, Protocol

# Scenarios in which a system takes part; the others print "n/a".
QUEUE_SCENARIOS = frozenset({"drain", "enqueue", "contended", "latency", "steady"})


@dataclass(frozen=True)
class WorkerOptions:
    dsn: str
    concurrency: int
    handler: str  # "noop" or "sleep"
    stamps: str  # file the handler appends "job_id unix_time" to
    listen: bool = True


def cpu_file(stamps: str) -> str:
    """Where a worker writes its process CPU seconds when its first handler starts."""
    return f"{stamps}.cpu"


class Stamper:
    """The handler body every system runs."""

    def __init__(self, options: WorkerOptions) -> None:
        self._fd = os.open(options.stamps, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self._sleep = options.handler == "sleep"
        self._cpu: str | None = cpu_file(options.stamps)

    async def __call__(self, job_id: int) -> None:
        os.write(self._fd, f"{job_id} {time.time()}\n".encode())
        if self._cpu is not None:
            # CPU used before the first job (start-up, imports, connecting) is left out
            # of the per-job figure, as the first start begins the rate's clock.
            fd = os.open(self._cpu, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.write(fd, f"{time.process_time()}\n".encode())
            os.close(fd)
            self._cpu = None
        if self._sleep:
            await asyncio.sleep(0.005)


class System(Protocol):
    name: str
    requires: str | None  # module that must import, or None
    scenarios: frozenset[str]
    table: str  # qualified name of the jobs table
    notify_triggers: tuple[str, ...]  # disabled for the "off" half of enqueue
    # The one trigger that notifies on INSERT (contended-draining's "off" half).
    insert_notify_triggers: tuple[str, ...]
    insert_one: LiteralString  # one job, RETURNING id
    insert_bulk: LiteralString  # %(n)s jobs in one statement
    pending: LiteralString  # jobs not finished yet (one integer)

    def install(self, dsn: str) -> None:
        """Create the system's schema in a fresh database, with its own tooling."""
        ...

    async def serve(self, options: WorkerOptions) -> None:
        """Run a worker until SIGTERM/SIGINT (called in the worker process)."""
        ...
