"""A claimed job and the context its handler receives.

The states of a job (column `status`) and who moves it between them:

    INSERT ──> queued ──claim──> running ──success──> succeeded
                 ^                 │ │ └──no attempts left / DoNotRetry──> dead
                 │                 │ └────handed back at shutdown (attempt not counted)──┐
                 └──retry (backoff)┴──dispatcher dead, rescued (attempt counted)────────┤
                 └───────────────────────────────────────────────────────────────────────┘
    queued/running ──UPDATE by an operator──> cancelled
    dead ──UPDATE by an operator──> queued          (the dead-letter queue is re-queueable)

    INSERT with depends_on ──> waiting ──every dependency succeeded──> queued
                                  └──a dependency ended dead or cancelled──> cancelled
                                     (or queued once all finished, with on_dependency_failure 'run')
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol

import anyio


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"
    WAITING = "waiting"


FINISHED = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})


class JobId(int):
    """A job's id, as `App.enqueue` returns it: an int, carrying the job's token.

    The token (a random UUID the enqueue gave the job) lets whoever holds it read
    that job, and no other, through `notifyq.job_status` (`App.status`,
    `App.wait`), without any right on the table.  Keep it as you would a
    session id; `str()` and `repr()` show the id only.  `token` is None for a job
    the call did not insert (one found by its dedupe_key).
    """

    token: uuid.UUID | None

    def __new__(cls, value: int, token: uuid.UUID | None = None) -> JobId:
        self = super().__new__(cls, value)
        self.token = token
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (JobId, (int(self), self.token))


@dataclass(frozen=True, slots=True)
class JobStatus:
    """Where a job stands (`App.status`): the columns `notifyq.job_status` returns."""

    id: int
    queue: str
    task: str
    status: JobState
    attempts: int
    max_attempts: int | None
    progress: float | None
    progress_message: str | None
    result: Any
    last_error: str | None
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        """Succeeded, dead or cancelled: the status will not change on its own."""
        return self.status in FINISHED


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed attempt of a job, as the claim returned it."""

    id: int
    queue: str
    task: str
    payload: Any
    attempt: int
    max_attempts: int
    checkpoint: Any = None  # what an earlier attempt saved, decoded
    # The producer's trace context (notifyq.jobs.trace_context): what the attempt's span
    # links to (tracing.py).  Set by whoever inserted the job, in any language: untrusted.
    trace_context: Any = None


class Reporter(Protocol):
    """Where a JobContext sends progress and checkpoints (progress.py's Reports)."""

    def progress(self, job_id: int, attempt: int, percent: float, message: str | None) -> None: ...

    async def save_checkpoint(self, job_id: int, attempt: int, checkpoint: Any) -> None: ...

    async def dependency_results(self, job_id: int) -> dict[int, Any]: ...


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler may know about the attempt it runs.

    `stopping` is set when the dispatcher shuts down: an attempt that does not
    finish within the shutdown timeout is handed back, so a long synchronous
    handler (which cannot be cancelled) can check it and stop early.

    `cancelled` is set when an operator cancels the job while a synchronous
    handler runs it: the handler should return soon (the job stays cancelled
    whatever it returns).  An async handler is cancelled instead (it sees
    CancelledError), and its `cancelled` is never set.

    `checkpoint` is what an earlier attempt of this job saved with
    `save_checkpoint` (None if nothing): a long job resumes from it.

    `dependency_results()` is what the jobs in its depends_on returned, read
    when first asked for (a claim reads nothing for it).
    """

    id: int
    queue: str
    task: str
    attempt: int
    max_attempts: int
    stopping: threading.Event = field(default_factory=threading.Event, compare=False)
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)
    checkpoint: Any = None
    reporter: Reporter | None = field(default=None, repr=False, compare=False)
    # dependency_results, once read: one read per attempt, however often asked.
    _dependency_results: dict[int, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _dependencies_read: threading.Event = field(
        default_factory=threading.Event, init=False, repr=False, compare=False
    )

    def progress(self, percent: float, message: str | None = None) -> None:
        """Report progress (0-100, and a short message): never blocks, never fails the job.

        Reports are coalesced per job (the latest wins) and written a few times a
        second at most, each announced on the notifyq_progress channel.  Call it
        from the handler itself (its own thread, for a plain `def` handler).
        """
        if not (isinstance(percent, int | float) and 0 <= percent <= 100):  # NaN fails too
            raise ValueError(f"progress must be a number from 0 to 100, got {percent!r}")
        if message is not None and not isinstance(message, str):
            raise ValueError(f"a progress message must be a string, got {type(message).__name__}")
        if self.reporter is not None:
            text = None if message is None else message[:MAX_PROGRESS_MESSAGE]
            self.reporter.progress(self.id, self.attempt, float(percent), text)

    async def save_checkpoint(self, checkpoint: Any) -> None:
        """Store `checkpoint` (JSON, at most 1 MiB) for the job's next attempts: it is
        their `ctx.checkpoint`.  Returns once it is committed; raises OperationRefused
        if this attempt no longer holds the job (its lease was lost, or it was cancelled)."""
        if self.reporter is not None:
            await self.reporter.save_checkpoint(self.id, self.attempt, checkpoint)

    def save_checkpoint_sync(self, checkpoint: Any) -> None:
        """`save_checkpoint` for a plain `def` handler, called from its own thread."""
        if self.reporter is not None:
            anyio.from_thread.run(self.save_checkpoint, checkpoint)

    async def dependency_results(self) -> Mapping[int, Any]:
        """What the jobs this job depends on (its depends_on) returned, by job id: those
        that succeeded (a handler that returned None: None).  A dependency that ended dead
        or cancelled (with on_dependency_failure="run") or was deleted since is left out;
        a job without dependencies gets an empty mapping.  Read from the database at the
        first call of the attempt (one query by primary key), then kept."""
        if self.reporter is not None and not self._dependencies_read.is_set():
            self._dependency_results.update(await self.reporter.dependency_results(self.id))
            self._dependencies_read.set()
        return MappingProxyType(self._dependency_results)

    def dependency_results_sync(self) -> Mapping[int, Any]:
        """`dependency_results` for a plain `def` handler, called from its own thread."""
        if self.reporter is None or self._dependencies_read.is_set():
            return MappingProxyType(self._dependency_results)
        return anyio.from_thread.run(self.dependency_results)


MAX_PROGRESS_MESSAGE = 200  # characters, as the schema's jobs_progress_message_length says
