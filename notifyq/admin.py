"""The operations behind `notifyq jobs/retry/cancel/purge/stats`.

Each admin action is a SQL function in schema.sql (notifyq.retry_job,
retry_dead, cancel_job, purge), so any language can do the same; this module
only calls them, through the named queries in sql/queries.sql.  A refusal
(unknown id, wrong state) arrives as OperationRefused with the function's
message and hint.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from . import store
from .errors import ConfigurationError
from .job import JobState

# Plain strings, not the members: click.Choice offers an Enum's name (SUCCEEDED), not its value.
FINISHED = (JobState.SUCCEEDED.value, JobState.DEAD.value, JobState.CANCELLED.value)
STATUSES = (JobState.WAITING.value, JobState.QUEUED.value, JobState.RUNNING.value, *FINISHED)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'7d', '12h', '30m', '90s', '2w' or plain seconds, as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise ConfigurationError(f"not a duration: {text!r} (use e.g. 7d, 12h, 30m, 90s)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@contextmanager
def _connection(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with store.connect_sync(dsn) as conn:
        yield conn


def _one(dsn: str, name: str, params: dict[str, Any]) -> Any:
    with _connection(dsn) as conn:
        return store.rows(conn, name, params)[0][0]


def retry_job(dsn: str, job_id: int) -> str:
    """Run the job again now; returns the status it had."""
    return str(_one(dsn, "retry_job", {"id": job_id}))


def retry_dead(dsn: str, queue: str | None = None, task: str | None = None) -> int:
    return int(_one(dsn, "retry_dead", {"queue": queue, "task": task}))


def cancel_job(dsn: str, job_id: int) -> str:
    """Cancel a queued or running job; returns the status it had."""
    return str(_one(dsn, "cancel_job", {"id": job_id}))


def purge(
    dsn: str,
    older_than: float,
    statuses: Sequence[str] = (JobState.SUCCEEDED, JobState.CANCELLED),
) -> int:
    return int(_one(dsn, "purge", {"seconds": older_than, "statuses": list(statuses)}))


def set_history(dsn: str, enabled: bool) -> bool:
    return bool(_one(dsn, "set_history", {"enabled": enabled}))


def history_enabled(dsn: str) -> bool:
    return bool(_one(dsn, "history_enabled", {}))


def set_events(dsn: str, queue: str, enabled: bool) -> bool:
    """Switch the per-job events on notifyq_events on or off for `queue`."""
    return bool(_one(dsn, "set_events", {"queue": queue, "enabled": enabled}))


def queue_events(dsn: str) -> list[dict[str, Any]]:
    """The queues whose jobs announce their changes on notifyq_events."""
    return _dicts(dsn, "queue_events", {})


def job_history(dsn: str, job_id: int) -> list[dict[str, Any]]:
    return _dicts(dsn, "job_history", {"id": job_id})


def queue_limits(dsn: str) -> list[dict[str, Any]]:
    return _dicts(dsn, "queue_limits", {})


def set_queue_limit(dsn: str, queue: str, max_running: int | None) -> None:
    """Cap `queue` at `max_running` jobs running at once, cluster-wide (None: no cap)."""
    with _connection(dsn) as conn:
        if max_running is None:
            store.rows(conn, "clear_queue_limit", {"queue": queue})
        else:
            store.rows(conn, "set_queue_limit", {"queue": queue, "max_running": max_running})


def list_jobs(
    dsn: str,
    *,
    queue: str | None = None,
    task: str | None = None,
    status: str | None = None,
    limit: int = 20,
) -> list[dict[str, Any]]:
    params = {"queue": queue, "task": task, "status": status, "limit": limit}
    return _dicts(dsn, "jobs_list", params)


def show_job(dsn: str, job_id: int) -> dict[str, Any] | None:
    found = _dicts(dsn, "job_show", {"id": job_id})
    return found[0] if found else None


def _dicts(dsn: str, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    with _connection(dsn) as conn:
        return store.records(conn, name, params)
