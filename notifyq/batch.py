"""Batch handlers: one call for up to `batch_size` claimed jobs of a task.

    @app.task(batch_size=100)
    async def send(batch: list[notifyq.BatchItem[Email]]) -> None:
        sent = await mailer.send_many([item.payload for item in batch])
        for item, ok in zip(batch, sent):
            if not ok:
                item.retry("mailer refused it", after=60)

Each item is one job's attempt, with its payload (decoded as for a plain handler)
and its `JobContext` (`item.ctx`: attempt, progress, checkpoint, cancelled).  The
handler settles each item at most once:

    item.succeed(result=None)     succeeded, with this result
    item.retry(error, after=None) failed: run again per the task's retry policy (no
                                  earlier than `after` seconds); dead with no attempts left
    item.dead(error)              dead now, whatever attempts remain

The defaults follow a plain handler's.  An item the handler did not settle
succeeds (with no result) when the handler returns, and fails with the
exception when it raises, as a plain handler's job would: `Retry` and
`DoNotRetry` steer it alike.  Items settled before the exception keep their
outcome: what was done for them was done (a mail sent is not sent again).
Past the task's timeout, the call ends (an async one) or is abandoned (a plain
`def`, whose thread Python cannot stop) and its unsettled items fail with
TimeoutError; settling one afterwards raises OutcomeAlreadySet.  A batch handler
returns None; anything else fails its unsettled items with a ResultError (a
result belongs to an item: `item.succeed(result)`).

Everything else stays per job, as the rows are: each job's attempt is counted,
its retry backed off, its dead letter kept, its lease renewed, its progress
reported.  A job cancelled while its batch runs has its item's `ctx.cancelled`
set (async handlers too: the call goes on for the other items) and whatever the
handler settles it to is dropped: the row says cancelled.  A payload that cannot
be decoded makes its job dead with a PayloadError before the call, and its item
is left out of the list.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from .errors import DoNotRetry, JobFailure, OutcomeAlreadySet, ResultError, Retry
from .job import JobContext

P = TypeVar("P")

# How one item ended: the error (None: succeeded), its traceback, its result as JSON text.
Ended = tuple[BaseException | None, str | None, str | None]


class BatchItem(Generic[P]):
    """One job of a batch handler's call: its payload, its context, and its outcome to set."""

    __slots__ = ("_ended", "_lock", "_outcome", "ctx", "payload")

    def __init__(self, payload: P, ctx: JobContext, lock: threading.Lock) -> None:
        self.payload = payload
        self.ctx = ctx
        self._lock = lock  # the batch's: the outcomes are read once, under it, at the end
        self._outcome: tuple[BaseException | None, Any] | None = None
        self._ended = False

    @property
    def id(self) -> int:
        """The job's id."""
        return self.ctx.id

    @property
    def settled(self) -> bool:
        """An outcome was set for this item."""
        return self._outcome is not None

    def succeed(self, result: Any = None) -> None:
        """The job succeeded; `result` (JSON, at most 1 MiB) is stored as its result."""
        self._set(None, result)

    def retry(self, error: str | BaseException = "", *, after: float | None = None) -> None:
        """This attempt failed: the job runs again per its task's retry policy, no earlier
        than `after` seconds when given; with no attempts left it is dead."""
        if after is not None:
            error = Retry(_text(error), after=after)
        elif isinstance(error, str | DoNotRetry):
            # A plain failure: the task's backoff decides when (DoNotRetry would end it).
            error = JobFailure(_text(error) or "retry requested")
        self._set(error, None)

    def dead(self, error: str | BaseException) -> None:
        """The job is dead now (a dead letter), whatever attempts remain."""
        if not isinstance(error, DoNotRetry):
            error = DoNotRetry(_text(error))
        self._set(error, None)

    def _set(self, error: BaseException | None, result: Any) -> None:
        with self._lock:
            if self._ended:
                raise OutcomeAlreadySet(
                    f"job {self.id}: its batch has ended (the handler returned, raised or ran "
                    "past its timeout); settle items before the handler returns"
                )
            if self._outcome is not None:
                raise OutcomeAlreadySet(f"job {self.id} is already settled: settle an item once")
            self._outcome = (error, result)

    def __repr__(self) -> str:
        return f"BatchItem(id={self.id}, attempt={self.ctx.attempt}, settled={self.settled})"


def _text(error: str | BaseException) -> str:
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}".rstrip(": ")


def conclude(
    items: Sequence[BatchItem[Any]],
    returned: Any,
    error: BaseException | None,
    trace: str | None,
    encode: Callable[[Any], str | None],
) -> list[Ended]:
    """How each item ended, once the call did (`error`: what it raised, if anything):
    what the handler set, else the defaults (module docstring).  No item changes after."""
    if error is None and returned is not None:
        error = ResultError(
            f"a batch handler returned {type(returned).__name__}, not None: give each item "
            "its result with item.succeed(result)"
        )
    ended: list[Ended] = []
    for item in items:
        with item._lock:
            item._ended = True
            outcome = item._outcome
        if outcome is None:
            ended.append((error, trace, None))
            continue
        failure, result = outcome
        if failure is not None:
            ended.append((failure, _trace_of(failure), None))
            continue
        try:
            ended.append((None, None, encode(result)))
        except ResultError as exc:
            ended.append((exc, None, None))
    return ended


def _trace_of(error: BaseException) -> str | None:
    if error.__traceback__ is None:
        return None
    return "".join(traceback.format_exception(error))
