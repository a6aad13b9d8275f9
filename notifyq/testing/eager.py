"""Eager mode: an app's enqueues run their handlers inline, their exceptions raised in
the test; nothing is written (see the package's docstring)."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, cast

import anyio

from .. import codec, enqueue, logs, store
from ..app import App
from ..batch import BatchItem, conclude
from ..enqueue import EnqueueOptions
from ..errors import PayloadError
from ..job import JobContext, JobId, JobState
from ..registry import Task
from ..worker_pool import encode_result
from .jobs import Assertions, EnqueuedJob, run_sync


class EagerQueue(Assertions):
    """An app whose enqueues run their handlers inline (see the module docstring);
    what they enqueued and how it went, for assertions.  Use it as a context manager:
    the app's enqueue methods are its own again on exit."""

    _PATCHED = ("enqueue", "enqueue_sync", "enqueue_many", "enqueue_many_sync")

    def __init__(self, app: App) -> None:
        self.app = app
        self._records: dict[int, EnqueuedJob] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # enqueue_sync may be called from many threads
        self._depends_on: dict[int, list[int]] = {}

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
        return run_sync(self._run, job)

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

        return run_sync(run_all)

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
            self._depends_on[job_id] = list(new.depends_on or ())
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
        logged_as = logs.enter_attempt(job_id, new.task, new.queue, 1)  # as the pool does
        try:
            # A payload of its own: what the handler does to it is not the record's.
            value = await _call(task, codec.loads(new.payload_json), context)
            result = encode_result(task.name, value)
        except Exception as exc:
            self._update(job_id, status=JobState.DEAD, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            logs.leave_attempt(logged_as)
        self._update(
            job_id,
            status=JobState.SUCCEEDED,
            result=None if result is None else codec.loads(result),
        )
        return JobId(job_id, new.token)

    def _dependency_results(self, job_id: int) -> dict[int, Any]:
        """What the eager jobs this one depends on returned (each ran at its enqueue)."""
        with self._lock:
            done = [self._records.get(i) for i in self._depends_on.get(job_id, ())]
        return {r.id: r.result for r in done if r and r.status == JobState.SUCCEEDED}

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

    async def dependency_results(self, job_id: int) -> dict[int, Any]:
        return self._queue._dependency_results(job_id)


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
    args: tuple[Any, ...] = (payload, context) if task.wants_context else (payload,)
    item = None
    if task.batch is not None:  # a batch of one: the item's outcome is the job's
        item = BatchItem(payload, context, threading.Lock())
        args = ([item],)

    async def invoke() -> Any:
        if task.is_async:
            return await task.handler(*args)
        result = await anyio.to_thread.run_sync(task.handler, *args)
        return await result if inspect.isawaitable(result) else result

    value: Any = None
    error: Exception | None = None
    try:
        if task.timeout is None:
            value = await invoke()
        else:
            with anyio.fail_after(task.timeout):
                value = await invoke()
    except Exception as exc:
        if item is None:
            raise
        error = exc  # the item's outcome if it has none yet: one set before it stands
    if item is None:
        return value
    ((failure, _, text),) = conclude(
        [item], value, error, None, lambda result: encode_result(task.name, result)
    )
    if failure is not None:
        raise failure
    return None if text is None else codec.loads(text)
