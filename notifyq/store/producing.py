"""What producers run (App.enqueue, wait, status): on whatever connection the
caller gives, inside its transaction when it has one open."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row, kwargs_row

from ..errors import OperationRefused
from ..job import JobId, JobState, JobStatus
from .connection import QUERIES, translated
from .rows import Deduped, Inserted, JobOutcome


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated job, as enqueue.build makes it: every column the INSERT names."""

    task: str
    payload_json: str
    queue: str
    priority: int
    delay: float
    run_at: datetime | None
    max_attempts: int | None
    dedupe_key: str | None = None
    rate_key: str | None = None
    depends_on: list[int] | None = None
    on_dependency_failure: str = "cancel"
    # The enqueuing span's propagation fields, JSON text (tracing.py); None: not traced.
    trace_context: str | None = None
    # The job's token (see JobId): random, from the operating system's CSPRNG.
    token: uuid.UUID = field(default_factory=uuid.uuid4)
    unique_for: float | None = None  # seconds; with dedupe_key only
    on_duplicate: str | None = None  # "refuse" | "replace"; with dedupe_key only
    tags: list[str] | None = None
    # POSTed to when the job ends; the database checks it against its allow-list.
    callback_url: str | None = None

    def params(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "dedupe_key": self.dedupe_key,
            "rate_key": self.rate_key,
            "task": self.task,
            "payload": self.payload_json,
            "queue": self.queue,
            "priority": self.priority,
            "delay": self.delay,
            "run_at": self.run_at,
            "max_attempts": self.max_attempts,
            "depends_on": self.depends_on,
            "on_dependency_failure": self.on_dependency_failure,
            "trace_context": self.trace_context,
            "unique_for": self.unique_for,
            "on_duplicate": self.on_duplicate,
            "tags": self.tags,
            "callback_url": self.callback_url,
        }


DEDUPE_TRIES = 5
"""Rounds of `enqueue_deduped` before giving up: each one that finds neither a new
row nor a holder saw the holder commit or finish in between, which is rare."""


async def enqueue(conn: psycopg.AsyncConnection[Any], job: NewJob) -> JobId:
    with translated():
        if job.dedupe_key is None:
            cur = conn.cursor(row_factory=class_row(Inserted))
            row = await (await cur.execute(QUERIES["enqueue"], job.params())).fetchone()
            assert row is not None
            return JobId(row.id, job.token)
        for _ in range(DEDUPE_TRIES):
            deduped = conn.cursor(row_factory=class_row(Deduped))
            await deduped.execute(QUERIES["enqueue_deduped"], job.params())
            holder = await deduped.fetchone()
            if holder is not None:
                return _enqueued(job, holder)
    raise _dedupe_unsettled(job)


def enqueue_sync(conn: psycopg.Connection[Any], job: NewJob) -> JobId:
    with translated():
        if job.dedupe_key is None:
            cur = conn.cursor(row_factory=class_row(Inserted))
            row = cur.execute(QUERIES["enqueue"], job.params()).fetchone()
            assert row is not None
            return JobId(row.id, job.token)
        for _ in range(DEDUPE_TRIES):
            deduped = conn.cursor(row_factory=class_row(Deduped))
            holder = deduped.execute(QUERIES["enqueue_deduped"], job.params()).fetchone()
            if holder is not None:
                return _enqueued(job, holder)
    raise _dedupe_unsettled(job)


def _enqueued(job: NewJob, row: Deduped) -> JobId:
    """Our token only if our row went in."""
    return JobId(row.id, job.token if row.created else None)


def _dedupe_unsettled(job: NewJob) -> OperationRefused:
    # Only a snapshot that never moves (REPEATABLE READ or SERIALIZABLE) gets here
    # every round: the holder committed after it was taken, so it can never be seen.
    return OperationRefused(
        f"could not enqueue with dedupe_key {job.dedupe_key!r}: another transaction "
        f"holds the key and this one cannot see its job (a REPEATABLE READ or SERIALIZABLE "
        f"transaction); retry the transaction, or enqueue in READ COMMITTED"
    )


async def wait_outcomes(
    conn: psycopg.AsyncConnection[Any], jobs: dict[int, uuid.UUID | None]
) -> list[JobOutcome]:
    """Where these jobs stand (App.wait's read): by token (notifyq.job_status) those
    whose token is known, the others from the table."""
    by_token = {job_id: token for job_id, token in jobs.items() if token is not None}
    by_id = [job_id for job_id, token in jobs.items() if token is None]
    rows: list[JobOutcome] = []
    with translated():
        cur = conn.cursor(row_factory=class_row(JobOutcome))
        if by_token:
            params = {"ids": list(by_token), "tokens": list(by_token.values())}
            await cur.execute(QUERIES["wait_outcomes_by_token"], params)
            rows += await cur.fetchall()
        if by_id:
            await cur.execute(QUERIES["wait_outcomes"], {"ids": by_id})
            rows += await cur.fetchall()
    return rows


def _job_status(*, status: str, **columns: Any) -> JobStatus:
    """A job_status row: its columns are JobStatus's fields, by name."""
    return JobStatus(status=JobState(status), **columns)


_STATUS = kwargs_row(_job_status)


async def job_status(
    conn: psycopg.AsyncConnection[Any], job_id: int, token: uuid.UUID | None
) -> JobStatus | None:
    """App.status: by token through notifyq.job_status, else from the table."""
    with translated():
        cur = conn.cursor(row_factory=_STATUS)
        if token is None:
            await cur.execute(QUERIES["job_status_by_id"], {"id": job_id})
        else:
            await cur.execute(QUERIES["job_status"], {"id": job_id, "token": token})
        return await cur.fetchone()


def job_status_sync(
    conn: psycopg.Connection[Any], job_id: int, token: uuid.UUID | None
) -> JobStatus | None:
    with translated():
        cur = conn.cursor(row_factory=_STATUS)
        if token is None:
            return cur.execute(QUERIES["job_status_by_id"], {"id": job_id}).fetchone()
        params = {"id": job_id, "token": token}
        return cur.execute(QUERIES["job_status"], params).fetchone()


ENQUEUE_CHUNK = 5_000
"""Payloads per INSERT in enqueue_many: bounds one statement's parameter size;
the chunks share one transaction, so PostgreSQL still delivers one
notification per queue (it folds identical notifications of a transaction)."""


def _chunks(job: NewJob, payloads: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The parameters of each INSERT, with a new token per payload."""
    common = job.params()
    del common["payload"], common["token"]
    for start in range(0, len(payloads), ENQUEUE_CHUNK):
        chunk = list(payloads[start : start + ENQUEUE_CHUNK])
        yield {**common, "payloads": chunk, "tokens": [uuid.uuid4() for _ in chunk]}


def _ids(params: dict[str, Any], rows: list[Inserted]) -> list[JobId]:
    """Identity values are drawn in the payloads' order: sorted, they pair with the tokens."""
    ids = sorted(row.id for row in rows)
    return [JobId(i, token) for i, token in zip(ids, params["tokens"], strict=True)]


async def enqueue_many(
    conn: psycopg.AsyncConnection[Any], job: NewJob, payloads: Sequence[str]
) -> list[JobId]:
    """Insert one job per payload (JSON text) with `job`'s other columns; ids in order."""
    ids: list[JobId] = []
    with translated():
        # An autocommit connection gets a transaction of its own (all or nothing, one
        # notification); any other joins the caller's, which commits it or not.
        async with conn.transaction() if conn.autocommit else nullcontext():
            cur = conn.cursor(row_factory=class_row(Inserted))
            for params in _chunks(job, payloads):
                await cur.execute(QUERIES["enqueue_many"], params)
                ids += _ids(params, await cur.fetchall())
    return ids


def enqueue_many_sync(
    conn: psycopg.Connection[Any], job: NewJob, payloads: Sequence[str]
) -> list[JobId]:
    ids: list[JobId] = []
    with translated(), conn.transaction() if conn.autocommit else nullcontext():
        cur = conn.cursor(row_factory=class_row(Inserted))
        for params in _chunks(job, payloads):
            ids += _ids(params, cur.execute(QUERIES["enqueue_many"], params).fetchall())
    return ids
