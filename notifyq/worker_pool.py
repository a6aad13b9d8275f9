"""N worker slots that run handlers; no SQL.

Each claimed job becomes one attempt: its task is looked up, its payload
decoded, its handler called (in a worker thread when it is a plain `def`,
so it cannot block the event loop) under the task's timeout, inside a
cancel scope of its own so shutdown can interrupt it.  `cancel(ids)`
interrupts the attempts of jobs an operator cancelled: an async handler's
scope is cancelled; a sync handler's thread cannot be, so its context's
`cancelled` event is set and the attempt ends when the handler returns.  What happened is
reported as a `Finished` through the `on_finished` callback; turning that
into a state write is completion.py's job.

The pool keeps no count of its own: `submit` enters the attempt in the
ledger as running, and its report moves it to pending (ledger.py) before
`on_finished` is called, so whoever that callback wakes (the dispatcher,
counting free slots) already sees the slot free.  A job claimed again under
an attempt still in a slot here (cancelled, retried, claimed back) waits
outside the ledger until that attempt is reported, then takes its slot.

A batch (the jobs of a batch handler's task, claimed together: batch.py) is
handed over as a tuple of jobs and runs in one slot, as one call; the ledger
counts its attempts running and its slot taken once, until all are reported
together.  A job of a batch task handed over alone (its turn came, see above)
runs as a batch of one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
from anyio.abc import TaskStatus

from . import codec, failpoints, logs, tracing
from .batch import BatchItem, conclude
from .errors import PayloadError, ResultError
from .job import Job, JobContext, Reporter
from .ledger import Attempt, Ledger
from .registry import Registry, Task

log = logging.getLogger("notifyq.worker")


class UnknownTask(Exception):
    """No handler is registered under the job's task name."""


@dataclass(frozen=True, slots=True)
class Finished:
    """How one attempt ended: error None is success; interrupted means handed back;
    cancelled means the job was cancelled while it ran (nothing is left to write)."""

    job: Job
    task: Task | None
    error: BaseException | None = None
    trace: str | None = None
    interrupted: bool = False
    cancelled: bool = False
    result: str | None = None  # what the handler returned, as JSON text (None: nothing)
    runtime: float | None = None  # seconds the handler ran (None: it never started)


_NEVER = threading.Event()  # the `cancelled` of async handlers: they get CancelledError

Work = Job | tuple[Job, ...]
"""What a slot takes: one job, or a batch of jobs of one batch task."""


class WorkerPool:
    def __init__(
        self,
        registry: Registry,
        concurrency: int,
        ledger: Ledger,
        on_finished: Callable[[Finished], None],
        reporter: Reporter | None = None,
    ) -> None:
        # `concurrency` comes from Settings, which checked it (settings.py).
        self._registry = registry
        self._concurrency = concurrency
        self._ledger = ledger  # submitted attempts run there until their report
        self._on_finished = on_finished
        self._reporter = reporter
        self._handoff = _Handoff()
        self._scopes: set[anyio.CancelScope] = set()  # each slot's current session
        self._threads = anyio.CapacityLimiter(concurrency)
        self._interrupting = False
        self._stopping = threading.Event()  # shared by every JobContext of this pool
        self.abandoned = 0  # sync handlers interrupted at shutdown: their threads live on
        # Attempts in a slot now, by (job id, attempt): a job rescued from under a stalled
        # attempt can be claimed again by this pool while that attempt still runs.
        # Each maps to its session's scope, and a sync handler's event: what `cancel`
        # needs to reach them (the ledger is what counts them).
        self._running: dict[Attempt, tuple[anyio.CancelScope, threading.Event | None]] = {}
        self._cancelled: set[Attempt] = set()  # attempts of jobs cancelled while they ran
        # Jobs claimed again under an attempt that is still in a slot here: each starts
        # once the one before it is reported (see submit).
        self._next_turn: dict[Attempt, deque[Job]] = {}
        self._closed = False
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        """Attempts submitted and not reported yet (the ledger's count): in a slot, or for
        a moment waiting for one, as the dispatcher claims no more than the free slots.
        Jobs waiting for their attempt's turn (see submit) are not counted."""
        return self._ledger.running

    def submit(self, work: Work) -> None:
        """Queue a claimed job, or a batch; the dispatcher never claims more than there are
        free slots.  Each attempt is running in the ledger from now until it is reported."""
        if isinstance(work, tuple):
            entered = set(self._ledger.claimed_batch([(j.id, j.attempt) for j in work]))
            batch = tuple(j for j in work if (j.id, j.attempt) in entered)
            for job in work:
                if (job.id, job.attempt) not in entered:
                    self._wait_turn(job)
            if batch:
                if self._idle.is_set():
                    self._idle = anyio.Event()
                self._handoff.put(batch)
            return
        job = work
        attempt = (job.id, job.attempt)
        if not self._ledger.claimed(attempt):
            self._wait_turn(job)
            return
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._handoff.put(job)

    def _wait_turn(self, job: Job) -> None:
        # The same (job id, attempt) is still in a slot: its job was cancelled while
        # it ran (a sync handler that never looks at `cancelled`), then retried, which
        # starts the attempts over, and this pool claimed it again.  Nothing tells the
        # two apart (the ledger, `cancel`, the database's fence), so this one waits,
        # in no slot, until that one is reported; the ledger's entry is that one's.
        self._next_turn.setdefault((job.id, job.attempt), deque()).append(job)
        log.warning(
            "job=%s attempt=%s claimed again while that attempt still runs here (a sync "
            "handler that does not check ctx.cancelled?): it starts once that one returns",
            job.id,
            job.attempt,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the slots until `close()` and every submitted job has finished."""
        async with anyio.create_task_group() as tg:
            for _ in range(self._concurrency):
                tg.start_soon(self._slot)
            task_status.started()

    def close(self) -> None:
        """Accept no more jobs; slots exit once they have run what was submitted."""
        self._closed = True
        self._handoff.close()

    def interrupt_all(self) -> None:
        """Cancel every running attempt (shutdown grace is over): they are handed back."""
        self._interrupting = True
        self._stopping.set()
        for scope in self._scopes:
            scope.cancel()

    def cancel(self, job_ids: set[int]) -> set[int]:
        """Interrupt the running attempts of these jobs; returns the ids that were running."""
        found = [attempt for attempt in self._running if attempt[0] in job_ids]
        for attempt in found:
            self._cancelled.add(attempt)
            scope, event = self._running[attempt]
            if event is None:
                scope.cancel()  # the session reports the attempt and starts a new scope
            else:
                event.set()
        return {job_id for job_id, _ in found}

    def signal_stopping(self) -> None:
        """Tell running handlers (JobContext.stopping) that shutdown has begun."""
        self._stopping.set()

    async def wait_idle(self) -> None:
        """Until no attempt is running and none is waiting for a slot."""
        await self._idle.wait()

    async def _slot(self) -> None:
        while not await self._session():
            pass  # interrupted: a new session reports what is still queued as handed back

    async def _session(self) -> bool:
        """Run jobs under one cancel scope until the hand-off is closed and empty (True) or
        `interrupt_all` cancels the scope (False).  One scope per slot, not per attempt:
        creating a scope costs more than a no-op job, and only shutdown ever cancels it."""
        current: Work | None = None
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                while (work := await self._handoff.get()) is not None:
                    current = work
                    if isinstance(work, tuple):
                        self._report_all(await self._batch(work, scope), batch=True)
                    elif self._is_batch_task(work):
                        self._report_all(await self._batch((work,), scope), batch=False)
                    else:
                        self._report_all([await self._attempt(work, scope)], batch=False)
                    current = None
                return True
            finally:
                self._scopes.discard(scope)
        if current is not None:  # shutdown or a cancellation interrupted this attempt
            jobs = current if isinstance(current, tuple) else (current,)
            task = self._registry.get(jobs[0].task)
            if task is not None and not task.is_async:
                self.abandoned += 1
            interrupted = [Finished(job, task, interrupted=True) for job in jobs]
            self._report_all(interrupted, batch=isinstance(current, tuple))
        return False

    def _is_batch_task(self, job: Job) -> bool:
        task = self._registry.get(job.task)
        return task is not None and task.batch is not None

    def _report(self, finished: Finished) -> None:
        self._report_all([finished], batch=False)

    def _report_all(self, ended: list[Finished], *, batch: bool) -> None:
        """Report attempts that ended together: one job's, or a batch's (whose attempts
        leave their shared slot at once)."""
        attempts = [(f.job.id, f.job.attempt) for f in ended]
        if self._cancelled:
            for i, attempt in enumerate(attempts):
                if attempt in self._cancelled:
                    self._cancelled.discard(attempt)
                    ended[i] = replace(ended[i], cancelled=True)
        if batch:
            still_running = self._ledger.finished_batch(attempts)
        else:
            still_running = self._ledger.finished(attempts[0])
        followers: list[Job] = []
        for attempt in attempts if self._next_turn else ():
            follower = self._turn_of(attempt)
            if follower is not None:
                # Its turn came: in the ledger before the report below wakes anyone, so
                # the slot it takes is never counted free.
                self._ledger.claimed(attempt)
                still_running += 1
                followers.append(follower)
                if not self._closed:
                    self._handoff.put(follower)
        if not still_running:
            self._idle.set()
        if failpoints.ACTIVE and not ended[0].interrupted:
            failpoints.hit("handler-after")
        for finished in ended:
            self._on_finished(finished)
        for follower in followers if self._closed else ():  # shutdown: they never start
            self._report(Finished(follower, self._registry.get(follower.task), interrupted=True))

    def _turn_of(self, attempt: Attempt) -> Job | None:
        """The job claimed again under `attempt` that waited for it, if any (see submit)."""
        waiting = self._next_turn.get(attempt)
        if not waiting:
            return None
        follower = waiting.popleft()
        if not waiting:
            del self._next_turn[attempt]
        return follower

    async def _attempt(self, job: Job, scope: anyio.CancelScope) -> Finished:
        task = self._registry.get(job.task)
        if self._interrupting:  # claimed just before shutdown and never started
            return Finished(job, task, interrupted=True)
        cancelled = threading.Event() if task is not None and not task.is_async else None
        context = self._context(job, cancelled or _NEVER)
        attempt = (job.id, job.attempt)
        self._running[attempt] = (scope, cancelled)
        tracer = tracing.tracer()  # None unless an OpenTelemetry provider is configured
        # The handler's own log lines name the job (logs.py); a sync handler's thread gets
        # a copy of this context from anyio.
        logged_as = logs.enter_attempt(job.id, job.task, job.queue, job.attempt)
        began = time.monotonic()
        try:
            if tracer is None:
                result = await self._handle(task, job, context)
            else:
                result = await tracing.processing(tracer, job, self._handle(task, job, context))
            return Finished(job, task, result=result, runtime=time.monotonic() - began)
        except Exception as exc:
            return Finished(
                job, task, exc, traceback.format_exc(), runtime=time.monotonic() - began
            )
        except anyio.get_cancelled_exc_class():
            if scope.cancel_called or anyio.current_effective_deadline() == -math.inf:
                raise  # a real cancellation: ours (shutdown) or an enclosing one
            # The handler leaked a cancellation of its own (awaited a cancelled future).
            return Finished(
                job,
                task,
                RuntimeError("the handler raised CancelledError"),
                traceback.format_exc(),
                runtime=time.monotonic() - began,
            )
        except BaseException as exc:  # SystemExit, KeyboardInterrupt from a handler
            # A handler cannot stop the dispatcher: it only fails its own attempt.
            return Finished(
                job, task, exc, traceback.format_exc(), runtime=time.monotonic() - began
            )
        finally:
            logs.leave_attempt(logged_as)
            del self._running[attempt]

    def _context(self, job: Job, cancelled: threading.Event) -> JobContext:
        return JobContext(
            job.id,
            job.queue,
            job.task,
            job.attempt,
            job.max_attempts,
            self._stopping,
            cancelled,
            job.checkpoint,
            self._reporter,
        )

    async def _batch(self, jobs: tuple[Job, ...], scope: anyio.CancelScope) -> list[Finished]:
        """Run a batch handler once for these jobs of its task; how each attempt ended."""
        task = self._registry.get(jobs[0].task)
        if self._interrupting:  # claimed just before shutdown and never started
            return [Finished(job, task, interrupted=True) for job in jobs]
        if task is None:
            return [Finished(job, task, self._unknown(job)) for job in jobs]
        ended: dict[Attempt, Finished] = {}
        items: list[BatchItem[Any]] = []
        lock = threading.Lock()
        for job in jobs:
            try:
                payload = self._decode(task, job)
            except PayloadError as exc:  # dead alone, before the call: the others go on
                ended[(job.id, job.attempt)] = Finished(job, task, exc, runtime=0.0)
                continue
            # Each item's own event, async handlers' too: a cancelled job must not cancel
            # the call the other items are in (see cancel).
            cancelled = threading.Event()
            items.append(BatchItem(payload, self._context(job, cancelled), lock))
            self._running[(job.id, job.attempt)] = (scope, cancelled)
        began = time.monotonic()
        returned: Any = None
        error: BaseException | None = None
        trace: str | None = None
        try:
            if items:
                # A list of its own: a handler that consumes or filters it in place must
                # not hide items from the outcomes read below, nor from _running's cleanup.
                returned = await self._timed(task, (list(items),))
        except Exception as exc:
            error, trace = exc, traceback.format_exc()
        except anyio.get_cancelled_exc_class():
            if scope.cancel_called or anyio.current_effective_deadline() == -math.inf:
                raise  # a real cancellation: ours (shutdown) or an enclosing one
            error = RuntimeError("the handler raised CancelledError")
            trace = traceback.format_exc()
        except BaseException as exc:  # SystemExit, KeyboardInterrupt: only these jobs fail
            error, trace = exc, traceback.format_exc()
        finally:
            for item in items:
                del self._running[(item.ctx.id, item.ctx.attempt)]
        runtime = time.monotonic() - began
        outcomes = conclude(items, returned, error, trace, lambda r: encode_result(task.name, r))
        by_id = {job.id: job for job in jobs}
        for item, (failure, text, result) in zip(items, outcomes, strict=True):
            job = by_id[item.ctx.id]
            ended[(job.id, job.attempt)] = Finished(
                job, task, failure, text, result=result, runtime=runtime
            )
        return [ended[(job.id, job.attempt)] for job in jobs]

    @staticmethod
    def _unknown(job: Job) -> UnknownTask:
        return UnknownTask(
            f"unknown task {job.task!r}: no handler is registered under this name "
            f"in the app serving queue {job.queue!r}"
        )

    async def _handle(self, task: Task | None, job: Job, context: JobContext) -> str | None:
        """Run the handler; what it returned, as JSON text."""
        if task is None:
            raise self._unknown(job)
        return encode_result(task.name, await self._call(task, job, context))

    @staticmethod
    def _decode(task: Task, job: Job) -> Any:
        if task.decode is None:
            return job.payload
        try:
            return task.decode(job.payload)
        except Exception as exc:
            raise PayloadError(
                f"payload of job {job.id} cannot be decoded for task {task.name!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    async def _call(self, task: Task, job: Job, context: JobContext) -> Any:
        payload = self._decode(task, job)
        args = (payload, context) if task.wants_context else (payload,)
        return await self._timed(task, args)

    async def _timed(self, task: Task, args: tuple[Any, ...]) -> Any:
        """The handler's call under the task's timeout."""
        if task.timeout is None:  # no second cancel scope on the hot path
            return await self._invoke(task, args)
        try:
            with anyio.fail_after(task.timeout):
                return await self._invoke(task, args)
        except TimeoutError:
            if not task.is_async:
                # Python cannot stop a thread: the handler runs on, unsupervised, while
                # the attempt counts as failed (and a retry may overlap it).
                self.abandoned += 1
            raise TimeoutError(f"task {task.name!r} ran past its {task.timeout}s timeout") from None

    async def _invoke(self, task: Task, args: tuple[Any, ...]) -> Any:
        if task.is_async:
            return await task.handler(*args)
        result = await anyio.to_thread.run_sync(
            task.handler, *args, limiter=self._threads, abandon_on_cancel=True
        )
        if inspect.isawaitable(result):
            # A plain `def` wrapper around a coroutine function: run what it returned.
            return await result
        return result


class _Handoff:
    """Claimed jobs waiting for a slot, and idle slots waiting for a job.

    An anyio memory stream did this before; with a no-op handler its send and receive
    (a checkpoint, a wait object and a wake-up per item on each side) were the largest
    cost in the pool: about 20 µs of the dispatcher's CPU per job at 200 slots
    (benchmarks/drain_profile.py).  Here a job goes straight into the future of a waiting
    slot, or into a deque that a slot takes from without waiting.  The futures are the
    event loop's own (notifyq runs on asyncio); anyio cancel scopes still reach a slot
    waiting on one, as they cancel the task awaiting it.
    """

    __slots__ = ("_closed", "_jobs", "_waiting")

    def __init__(self) -> None:
        self._jobs: deque[Work] = deque()
        self._waiting: deque[asyncio.Future[Work | None]] = deque()
        self._closed = False

    def put(self, job: Work) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():  # a slot cancelled while it waited is gone
                slot.set_result(job)
                return
        self._jobs.append(job)

    def close(self) -> None:
        """Slots take what is queued, then get None."""
        self._closed = True
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)

    async def get(self) -> Work | None:
        # A checkpoint between two jobs, as the stream had: a slot that finds work queued
        # every time must still let the other tasks of the loop run, and see cancellation.
        await anyio.lowlevel.checkpoint()
        if self._jobs:
            return self._jobs.popleft()
        if self._closed:
            return None
        slot: asyncio.Future[Work | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            return await slot
        except BaseException:
            # Cancelled after `put` chose this slot but before it woke: the job goes back
            # to the front, for another slot (or for this one's next session to hand back).
            if slot.done() and not slot.cancelled() and (job := slot.result()) is not None:
                self._jobs.appendleft(job)
            slot.cancel()
            raise


MAX_RESULT = 1024 * 1024
"""Bytes of JSON a handler may return (the column has no CHECK: see schema.sql)."""
# \u0000 in JSON text, not preceded by an escaped backslash (a literal "\\u0000").
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode_result(task: str, value: Any) -> str | None:
    """A handler's return value as JSON text; None stays None (no result stored)."""
    if value is None:
        return None
    try:
        text = codec.dumps(value)
    except TypeError as exc:
        raise ResultError(
            f"task {task!r} returned a value that cannot be stored as JSON: {exc.__cause__ or exc}"
        ) from None
    if _JSON_NUL.search(text):
        # jsonb refuses it: the completion's write would fail, and the rescuer would run
        # the job again and again (an HTTP endpoint answering "\u0000" included).
        raise ResultError(
            f"task {task!r} returned a string with a NUL character (\\u0000), which "
            "PostgreSQL cannot store: remove it or encode the value (base64)"
        )
    if len(text.encode()) > MAX_RESULT:
        raise ResultError(
            f"task {task!r} returned {len(text.encode())} bytes of JSON; results are limited "
            f"to {MAX_RESULT} bytes: store large results elsewhere and return a reference"
        )
    return text
