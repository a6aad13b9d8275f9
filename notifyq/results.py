"""Await a job's outcome: its result, or the error it ended with.

Driven by notifications, never by polling the row.  Every status change is
announced on notifyq_status as {"queue", "status"} (one per statement per
pair, so a batch of 1,000 completions is one notification, and no payload
ever names a job).  `Waiters` keeps one LISTEN connection per event loop for
every `App.wait` on it: a notification that some job of a watched queue
finished makes it read the rows of all the jobs awaited there, in one
statement, on a second connection (a connection that is waiting for
notifications cannot run a query meanwhile).

Each wait reads its job once after the LISTEN is in place, so a job that
finished before the wait began, or between the wait's start and the LISTEN,
is seen by that read; anything later sends a notification.  After a
reconnect every awaited job is read again.

A job awaited with its token (the JobId enqueue returned carries it) is read
through notifyq.job_status, which a producer role may call; one without, from
the table, which takes the worker's right to read jobs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from . import channels, codec
from .errors import DatabaseUnavailable, JobFailed, OperationRefused
from .job import FINISHED, JobState
from .retry import reconnect_delay
from .store import JobOutcome, Listener, Note

log = logging.getLogger("notifyq.results")

FINAL = FINISHED
QUIET_PING = 30.0  # seconds between pings of an otherwise silent listener

Row = JobOutcome  # where an awaited job stands, by column name
Read = Callable[[dict[int, uuid.UUID | None]], Awaitable[list[Row]]]  # job id -> its token


def outcome(job_id: int, row: Row | None, token: uuid.UUID | None = None) -> Any:
    """The result of a finished job, or the error its end means."""
    if row is None:
        raise OperationRefused(
            f"no job with id {job_id} (never enqueued, or purged since it finished"
            + (", or the token is not this job's)" if token is not None else ")")
        )
    if row.status == JobState.SUCCEEDED:
        return row.result
    raise JobFailed(job_id, row.status, row.last_error)


def finished_queues(notes: list[Note]) -> set[str]:
    """Queues named by status notifications that announce a final status."""
    queues = set()
    for note in notes:
        try:
            change = codec.loads(note.payload)
        except ValueError:
            continue  # someone else's message on the channel (any role may NOTIFY)
        if isinstance(change, dict) and change.get("status") in FINAL:
            queues.add(str(change.get("queue")))
    return queues


class Waiters:
    """Every `App.wait` of one event loop, served by one LISTEN connection."""

    def __init__(self, dsn: str, read: Read) -> None:
        self._listener = Listener(dsn, channels.STATUS)
        self._read = read
        self._futures: dict[int, list[asyncio.Future[Row | None]]] = {}
        self._queues: dict[int, str] = {}  # awaited job -> its queue, once read
        self._tokens: dict[int, uuid.UUID] = {}  # awaited job -> its token, when known
        self._listening = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def wait(
        self,
        job_id: int,
        timeout: float | None,  # noqa: ASYNC109 - App.wait's documented argument
        token: uuid.UUID | None = None,
    ) -> Any:
        future: asyncio.Future[Row | None] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(job_id, []).append(future)
        if token is not None:
            self._tokens[job_id] = token
        try:
            async with asyncio.timeout(timeout):
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.create_task(self._run())
                await self._listening.wait()
                await self._settle([job_id])
                row = await future
        except TimeoutError:
            raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from None
        finally:
            self._forget(job_id, future)
        return outcome(job_id, row, token)

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(reader, return_exceptions=True)

    def _forget(self, job_id: int, future: asyncio.Future[Row | None]) -> None:
        if future.done() and not future.cancelled():
            future.exception()  # seen: the wait raised its own error (or timed out) first
        futures = self._futures.get(job_id, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            self._futures.pop(job_id, None)
            self._queues.pop(job_id, None)
            self._tokens.pop(job_id, None)

    async def _run(self) -> None:
        """Listen until `close`, also between waits (the next one then costs no
        connect); reconnect with backoff, reading every awaited job again after
        each (re)connect (notifications meanwhile went to nobody)."""
        failures = 0
        try:
            while True:
                try:
                    await self._listener.open()
                    self._listening.set()
                    failures = 0
                    await self._settle(list(self._futures))
                    while True:
                        notes = await self._listener.wait(QUIET_PING)
                        queues = finished_queues(notes)
                        if queues & set(self._queues.values()) or any(
                            job_id not in self._queues for job_id in self._futures
                        ):
                            await self._settle(list(self._futures))
                except DatabaseUnavailable as exc:
                    self._listening.clear()
                    failures += 1
                    delay = reconnect_delay(failures, first=0.2, cap=10.0)
                    log.warning("wait lost the database (%s); reconnecting in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
        except Exception as exc:
            # Not the database: a bug.  Fail the waits now rather than at their timeouts.
            for futures in self._futures.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            raise
        finally:
            self._listening.clear()
            await self._listener.close()

    async def _settle(self, job_ids: list[int]) -> None:
        """Read these jobs; resolve the waits of those that finished or do not exist."""
        if not job_ids:
            return
        jobs = {job_id: self._tokens.get(job_id) for job_id in job_ids}
        rows = {row.id: row for row in await self._read(jobs)}
        for job_id in job_ids:
            row = rows.get(job_id)
            if row is not None and row.status not in FINAL:
                self._queues[job_id] = row.queue
                continue
            for future in self._futures.get(job_id, []):
                if not future.done():
                    future.set_result(row)
