"""The reads of `notifyq web` (notifyq/web/) beyond `notifyq watch`'s, async, on the
dashboard's one Store: the job search, one job with its attempts, the schedules.
The actions go through admin.py's SQL functions, like the CLI's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from .dispatching import Store
from .rows import AttemptEntry, JobRecord, JobSummary, PeriodicEntry


@dataclass(frozen=True, slots=True)
class JobFilter:
    """What the search form asked for; None: any."""

    id: int | None = None
    queue: str | None = None
    task: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    key: str | None = None  # a top-level payload key, compared with `value` as text
    value: str | None = None
    limit: int = 50


async def search_jobs(st: Store, f: JobFilter) -> list[JobSummary]:
    params = {
        "id": f.id,
        "queue": f.queue,
        "task": f.task,
        "status": f.status,
        "since": f.since,
        "until": f.until,
        "key": f.key,
        "value": f.value,
        "limit": f.limit,
    }
    return await st._run("web_jobs", params, class_row(JobSummary))


async def job(st: Store, job_id: int) -> JobRecord | None:
    found = await st._run("job_show", {"id": job_id}, class_row(JobRecord))
    return found[0] if found else None


async def attempts(st: Store, job_id: int) -> list[AttemptEntry]:
    """Every recorded status change of the job, oldest first, errors whole."""
    return await st._run("task_attempts", {"id": job_id}, class_row(AttemptEntry))


async def schedules(st: Store) -> list[PeriodicEntry]:
    return await st._run("web_periodic", {}, class_row(PeriodicEntry))
