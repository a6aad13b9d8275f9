"""The operator's statements behind `notifyq jobs/retry/cancel/purge/history/events/limit/breaker`
(admin.py), sync, on the caller's connection.

The admin actions are SQL functions in schema.sql (notifyq.retry_job, retry_dead,
cancel_job, purge, set_history, set_events), so any language can do the same; a
refusal (unknown id, wrong state) arrives as OperationRefused with the function's
message and hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import class_row

from .connection import fetch_all, fetch_one, fetch_value
from .rows import (
    BreakerState,
    HistoryEntry,
    JobRecord,
    JobSummary,
    QueueEvents,
    QueueLimit,
    QueuePause,
)

Conn = psycopg.Connection[Any]


def retry_job(conn: Conn, job_id: int) -> str:
    """Run the job again now; the status it had."""
    return str(fetch_value(conn, "retry_job", {"id": job_id}))


def retry_dead(
    conn: Conn, queue: str | None, task: str | None, tags: Sequence[str] | None = None
) -> int:
    """Re-queue the dead jobs (of a queue, a task, with all of `tags`); how many."""
    params = {"queue": queue, "task": task, "tags": _tags(tags)}
    return int(fetch_value(conn, "retry_dead", params))


def cancel_job(conn: Conn, job_id: int) -> str:
    """Cancel a queued or running job; the status it had."""
    return str(fetch_value(conn, "cancel_job", {"id": job_id}))


def cancel_jobs(
    conn: Conn, tags: Sequence[str], queue: str | None = None, task: str | None = None
) -> int:
    """Cancel the unfinished jobs with all of `tags` (of a queue, a task); how many."""
    params = {"tags": list(tags), "queue": queue, "task": task}
    return int(fetch_value(conn, "cancel_jobs", params))


def purge(
    conn: Conn, older_than: float, statuses: Sequence[str], tags: Sequence[str] | None = None
) -> int:
    """Delete the jobs of `statuses` finished over `older_than` seconds ago (with all of
    `tags`); how many."""
    params = {"seconds": older_than, "statuses": list(statuses), "tags": _tags(tags)}
    return int(fetch_value(conn, "purge", params))


def pause_queue(conn: Conn, queue: str, task: str | None) -> bool:
    """Pause the queue (or one task of it); False if it was paused already."""
    return bool(fetch_value(conn, "pause_queue", {"queue": queue, "task": task}))


def resume_queue(conn: Conn, queue: str, task: str | None) -> bool:
    """Lift the queue's (or one task's) pause; False if it was not paused."""
    return bool(fetch_value(conn, "resume_queue", {"queue": queue, "task": task}))


def queue_pauses(conn: Conn) -> list[QueuePause]:
    return fetch_all(conn, "queue_pauses", {}, class_row(QueuePause))


def _tags(tags: Sequence[str] | None) -> list[str] | None:
    """No filter (NULL) for no tags: the SQL functions refuse an empty array, which
    `@>` would read as "every tagged job"."""
    return list(tags) if tags else None


def set_history(conn: Conn, enabled: bool) -> bool:
    return bool(fetch_value(conn, "set_history", {"enabled": enabled}))


def history_enabled(conn: Conn) -> bool:
    return bool(fetch_value(conn, "history_enabled", {}))


def set_events(conn: Conn, queue: str, enabled: bool) -> bool:
    return bool(fetch_value(conn, "set_events", {"queue": queue, "enabled": enabled}))


def queue_events(conn: Conn) -> list[QueueEvents]:
    return fetch_all(conn, "queue_events", {}, class_row(QueueEvents))


def job_history(conn: Conn, job_id: int) -> list[HistoryEntry]:
    return fetch_all(conn, "job_history", {"id": job_id}, class_row(HistoryEntry))


def queue_limits(conn: Conn) -> list[QueueLimit]:
    return fetch_all(conn, "queue_limits", {}, class_row(QueueLimit))


def set_queue_limit(conn: Conn, queue: str, max_running: int) -> None:
    fetch_value(conn, "set_queue_limit", {"queue": queue, "max_running": max_running})


def clear_queue_limit(conn: Conn, queue: str) -> None:
    fetch_value(conn, "clear_queue_limit", {"queue": queue})


def list_jobs(
    conn: Conn,
    *,
    queue: str | None,
    task: str | None,
    status: str | None,
    limit: int,
    tags: Sequence[str] | None = None,
) -> list[JobSummary]:
    """The newest jobs, optionally of one queue, task and status, with all of `tags`."""
    params = {"queue": queue, "task": task, "status": status, "limit": limit, "tags": _tags(tags)}
    return fetch_all(conn, "jobs_list", params, class_row(JobSummary))


def show_job(conn: Conn, job_id: int) -> JobRecord | None:
    return fetch_one(conn, "job_show", {"id": job_id}, class_row(JobRecord))


def circuit_breakers(conn: Conn) -> list[BreakerState]:
    return fetch_all(conn, "circuit_breakers", {}, class_row(BreakerState))


def set_circuit_breaker(
    conn: Conn, task: str, failures: int, window: float, cooldown: float
) -> None:
    fetch_value(
        conn,
        "set_circuit_breaker",
        {"task": task, "failures": failures, "window": window, "cooldown": cooldown},
    )


def reset_circuit_breaker(conn: Conn, task: str) -> str:
    """Close the task's breaker; the state it had."""
    return str(fetch_value(conn, "reset_circuit_breaker", {"task": task}))


def remove_circuit_breaker(conn: Conn, task: str) -> bool:
    """Whether the task had a breaker (it has none now)."""
    return fetch_value(conn, "remove_circuit_breaker", {"task": task}) is not None
