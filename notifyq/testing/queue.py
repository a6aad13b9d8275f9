"""The real queue on a test database: `drain()` runs what is due, retries made due at
once; `Clock` moves the database's time (see the package's docstring)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import anyio
import psycopg

from .. import store
from ..app import App, resolve_dsn
from ..completion import Subscriber
from ..job import Job
from ..settings import Settings
from ..store.rows import JobRecord
from ..worker import Worker
from ..worker_pool import Finished
from .jobs import Assertions, EnqueuedJob, run_sync

T = TypeVar("T")

MAX_ROUNDS = 100
"""Times a drain makes the retries due at most: each gives every retrying job one more
attempt (a task's max_attempts is 5 unless it says otherwise)."""
GIVE_UP_AFTER = 30.0
"""Seconds a drain waits for jobs that stay due or running before it fails."""
_POLL = 0.01  # seconds between two looks of a drain at the jobs still due or running


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where a job that `drain()` ran ended: `status` is succeeded, dead or cancelled
    (or queued, for a job a drain limited to some queues left retrying).  `error` is the
    job's last_error; `exception` the last attempt's exception, as the handler raised it."""

    id: int
    task: str
    queue: str
    status: str
    attempts: int
    result: Any = None
    error: str | None = None
    exception: BaseException | None = None


class TestQueue(Assertions):
    """The app's jobs on a test database (`dsn`, else the app's): drain, assert, read."""

    __test__: ClassVar[bool] = False

    def __init__(self, app: App, dsn: str | None = None) -> None:
        self.app = app
        self.dsn = dsn or resolve_dsn(app.dsn)

    def jobs(self) -> list[EnqueuedJob]:
        return [_enqueued(row) for row in self._read(store.testing.jobs)]

    async def drain(
        self,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 1,
        max_rounds: int = MAX_ROUNDS,
        give_up_after: float = GIVE_UP_AFTER,
    ) -> list[Outcome]:
        """Run every job that is due now, and those its handlers enqueue due now, until
        none is left; a job that fails is run again at once (its backoff made due) until
        it succeeds or goes dead.  The outcomes, one per job run, in the order they first
        started.  `queues`: only these (default: the app's); `concurrency` 1 runs the jobs
        one at a time, in claim order (priority, then run_at, then id).  `max_rounds`:
        how many times retries are made due at most; `give_up_after`: seconds before giving up
        on jobs that stay due or running (a queue at its cap of 0, a handler that never
        returns).  Either way AssertionError, naming the jobs.  Jobs of a paused queue or
        task (`App.pause`) are left queued, as `serve --until-empty` leaves them."""
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, got {max_rounds}")
        heard = _Heard()
        settings = Settings(
            queues=tuple(queues) if queues is not None else None,
            concurrency=concurrency,
            # Claims follow outcomes; nothing to listen for, a short poll for the rest.
            listen=False,
            poll_interval=0.05,
            # Finished jobs stay for the test to read.
            retain_succeeded=None,
            retain_cancelled=None,
            retain_dead=None,
        )
        worker = self.app.worker(settings, dsn=self.dsn)
        worker.completer.subscribe(heard)
        served = {"queues": worker.queues, "tasks": [task.name for task in worker.registry]}
        conn = await anyio.to_thread.run_sync(store.connect_sync, self.dsn)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await worker.ready.wait()
                # Raised outside the task group, which would wrap it in an ExceptionGroup.
                failure = await self._settle(worker, conn, served, max_rounds, give_up_after)
                worker.stop()
            if failure is not None:
                raise AssertionError(failure)
            rows = await anyio.to_thread.run_sync(
                functools.partial(store.testing.jobs, conn, list(heard.errors))
            )
        finally:
            conn.close()
        by_id = {row.id: row for row in rows}
        return [
            Outcome(
                id=row.id,
                task=row.task,
                queue=row.queue,
                status=row.status,
                attempts=row.attempts,
                result=row.result,
                error=row.last_error,
                exception=heard.errors[row.id],
            )
            for row in (by_id[job_id] for job_id in heard.errors if job_id in by_id)
        ]

    async def _settle(
        self,
        worker: Worker,
        conn: psycopg.Connection[Any],
        served: dict[str, Any],
        max_rounds: int,
        give_up_after: float,
    ) -> str | None:
        """Wait until nothing served is due or running; None, or why the drain failed."""
        rounds = 0
        # Not `until_empty`: that waits for a rate limit's slots, a drain does not.
        with anyio.move_on_after(give_up_after):
            while True:
                if await anyio.to_thread.run_sync(
                    functools.partial(store.testing.busy, conn, **served)
                ):
                    await anyio.sleep(_POLL)
                    continue
                due = await anyio.to_thread.run_sync(
                    functools.partial(store.testing.retries_due, conn, **served)
                )
                if not due:
                    return None
                rounds += 1
                if rounds > max_rounds:
                    return (
                        f"drain() gave up after {max_rounds} rounds of retries: "
                        f"jobs {due} still fail"
                    )
                worker.dispatcher.wake()
        left = await anyio.to_thread.run_sync(functools.partial(store.testing.jobs, conn, None))
        stuck = [
            f"{row.id} ({row.task}, queue {row.queue}, {row.status})"
            for row in left
            if row.status in ("queued", "running")
        ]
        return (
            f"drain() gave up after {give_up_after} s with jobs still due or running: "
            f"{', '.join(stuck) or 'none left now'} (a queue capped at 0, a rate limit, or a "
            "handler that does not return?)"
        )

    def drain_sync(
        self,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 1,
        max_rounds: int = MAX_ROUNDS,
        give_up_after: float = GIVE_UP_AFTER,
    ) -> list[Outcome]:
        """`drain` for synchronous tests."""

        async def drain() -> list[Outcome]:
            return await self.drain(
                queues=queues,
                concurrency=concurrency,
                max_rounds=max_rounds,
                give_up_after=give_up_after,
            )

        return run_sync(drain)

    def _read(self, call: Callable[[psycopg.Connection[Any]], T]) -> T:
        # A connection per call: nothing for a test to close, and a few ms each.
        with store.connect_sync(self.dsn) as conn:
            return call(conn)


class _Heard(Subscriber):
    """The jobs a drain ran, in the order they first started, with the exception of
    each one's last attempt (None when it succeeded)."""

    def __init__(self) -> None:
        self.errors: dict[int, BaseException | None] = {}

    def decided(self, finished: Finished, status: str) -> None:
        if not finished.interrupted:
            self.errors[finished.job.id] = finished.error

    def settled(self, job: Job, status: str) -> None:
        pass


def _enqueued(row: JobRecord) -> EnqueuedJob:
    return EnqueuedJob(
        id=row.id,
        task=row.task,
        queue=row.queue,
        payload=row.payload,
        status=row.status,
        attempts=row.attempts,
        priority=row.priority,
        run_at=row.run_at,
        max_attempts=row.max_attempts,
        dedupe_key=row.dedupe_key,
        result=row.result,
        error=row.last_error,
        progress=row.progress,
        checkpoint=row.checkpoint,
    )


class Clock:
    """Time for a test database: `advance(seconds)` moves everything the database keeps
    time of into the past by that much, so that it is as if the time had passed
    (the database's clock, now(), is what every schedule reads).

    Moved: every timestamp of the jobs that are not running (run_at: delayed jobs and
    backoffs come due; created_at, started_at, finished_at: retention and purge see them
    older), the rate limits' slots, the job history.  Not moved: running jobs' leases,
    dispatchers' heartbeats, periodic schedules (they follow the real clock: test a
    periodic task by enqueueing it), and anything in Python (`time`, `datetime`)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.advanced = 0.0  # seconds, in total

    def advance(self, seconds: float) -> int:
        """Let `seconds` pass; returns how many jobs moved."""
        if not seconds >= 0:
            raise ValueError(f"time only moves forward: advance({seconds!r})")
        with store.connect_sync(self.dsn) as conn:
            moved = store.testing.advance(conn, seconds)
        self.advanced += seconds
        return moved
