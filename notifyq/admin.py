"""The operations behind `notifyq jobs/retry/cancel/purge/stats/breaker`.

Each admin action is a SQL function in schema.sql (notifyq.retry_job,
retry_dead, cancel_job, purge, reset_circuit_breaker, ...), so any language can
do the same; this module
opens a connection and calls them through the store (store/operations.py).  A
refusal (unknown id, wrong state) arrives as OperationRefused with the
function's message and hint.

Listings come back as dicts by column name, in the query's column order (what
the CLI prints and dumps as JSON); the store's typed rows say what each holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

import psycopg

from . import store
from .breaker import CircuitBreaker
from .errors import ConfigurationError
from .job import JobState
from .registry import check_queue_name, check_task_name

# Plain strings, not the members: click.Choice offers an Enum's name (SUCCEEDED), not its value.
FINISHED = (JobState.SUCCEEDED.value, JobState.DEAD.value, JobState.CANCELLED.value)
STATUSES = (JobState.WAITING.value, JobState.QUEUED.value, JobState.RUNNING.value, *FINISHED)

T = TypeVar("T")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'7d', '12h', '30m', '90s', '2w' or plain seconds, as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise ConfigurationError(f"not a duration: {text!r} (use e.g. 7d, 12h, 30m, 90s)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _on(dsn: str, call: Callable[[psycopg.Connection[Any]], T]) -> T:
    """`call` on a connection of its own, closed after."""
    with store.connect_sync(dsn) as conn:
        return call(conn)


def retry_job(dsn: str, job_id: int) -> str:
    """Run the job again now; returns the status it had."""
    return _on(dsn, lambda conn: store.operations.retry_job(conn, job_id))


def retry_dead(
    dsn: str,
    queue: str | None = None,
    task: str | None = None,
    tags: Sequence[str] | None = None,
) -> int:
    return _on(dsn, lambda conn: store.operations.retry_dead(conn, queue, task, tags))


def cancel_job(dsn: str, job_id: int) -> str:
    """Cancel a queued or running job; returns the status it had."""
    return _on(dsn, lambda conn: store.operations.cancel_job(conn, job_id))


def cancel_jobs(
    dsn: str, tags: Sequence[str], queue: str | None = None, task: str | None = None
) -> int:
    """Cancel every queued, waiting or running job with all of `tags`; how many."""
    return _on(dsn, lambda conn: store.operations.cancel_jobs(conn, tags, queue, task))


def purge(
    dsn: str,
    older_than: float,
    statuses: Sequence[str] = (JobState.SUCCEEDED, JobState.CANCELLED),
    tags: Sequence[str] | None = None,
) -> int:
    return _on(dsn, lambda conn: store.operations.purge(conn, older_than, statuses, tags))


def pause_queue(dsn: str, queue: str, task: str | None = None) -> bool:
    """Pause `queue` (or `task` in it); False if it was paused already.  The names are
    checked first: a typo would otherwise pause a queue nobody serves."""
    check_queue_name(queue)
    if task is not None:
        check_task_name(task)
    return _on(dsn, lambda conn: store.operations.pause_queue(conn, queue, task))


def resume_queue(dsn: str, queue: str, task: str | None = None) -> bool:
    """Lift the pause of `queue` (or of `task` in it); False if it was not paused."""
    check_queue_name(queue)
    if task is not None:
        check_task_name(task)
    return _on(dsn, lambda conn: store.operations.resume_queue(conn, queue, task))


def queue_pauses(dsn: str) -> list[dict[str, Any]]:
    """Every pause (task '*': the whole queue), with its ready jobs."""
    return [asdict(row) for row in _on(dsn, store.operations.queue_pauses)]


def set_history(dsn: str, enabled: bool) -> bool:
    return _on(dsn, lambda conn: store.operations.set_history(conn, enabled))


def history_enabled(dsn: str) -> bool:
    return _on(dsn, store.operations.history_enabled)


def set_events(dsn: str, queue: str, enabled: bool) -> bool:
    """Switch the per-job events on notifyq_events on or off for `queue`."""
    return _on(dsn, lambda conn: store.operations.set_events(conn, queue, enabled))


def queue_events(dsn: str) -> list[dict[str, Any]]:
    """The queues whose jobs announce their changes on notifyq_events."""
    return [asdict(row) for row in _on(dsn, store.operations.queue_events)]


def job_history(dsn: str, job_id: int) -> list[dict[str, Any]]:
    found = _on(dsn, lambda conn: store.operations.job_history(conn, job_id))
    return [asdict(row) for row in found]


def queue_limits(dsn: str) -> list[dict[str, Any]]:
    return [asdict(row) for row in _on(dsn, store.operations.queue_limits)]


def set_queue_limit(dsn: str, queue: str, max_running: int | None) -> None:
    """Cap `queue` at `max_running` jobs running at once, cluster-wide (None: no cap)."""
    if max_running is None:
        _on(dsn, lambda conn: store.operations.clear_queue_limit(conn, queue))
    else:
        _on(dsn, lambda conn: store.operations.set_queue_limit(conn, queue, max_running))


def list_jobs(
    dsn: str,
    *,
    queue: str | None = None,
    task: str | None = None,
    status: str | None = None,
    limit: int = 20,
    tags: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    found = _on(
        dsn,
        lambda conn: store.operations.list_jobs(
            conn, queue=queue, task=task, status=status, limit=limit, tags=tags
        ),
    )
    return [asdict(row) for row in found]


def show_job(dsn: str, job_id: int) -> dict[str, Any] | None:
    found = _on(dsn, lambda conn: store.operations.show_job(conn, job_id))
    return None if found is None else asdict(found)


# --- the monitoring functions (docs/sql.md, "Monitoring"): the same rows as their SQL


def queue_health(dsn: str, queues: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """notifyq.queue_health: per queue, ready, scheduled, running, failed in the last
    minute, dead, enqueue-to-start p50/p95, oldest ready age and pauses."""
    return [asdict(row) for row in _on(dsn, lambda c: store.monitoring.queue_health(c, queues))]


def failed_recent(dsn: str, within: float = 3600.0, limit: int = 100) -> list[dict[str, Any]]:
    """notifyq.failed_recent: failed attempts started in the last `within` seconds, newest
    first, at most `limit`, each with its whole error."""
    found = _on(dsn, lambda conn: store.monitoring.failed_recent(conn, within, limit))
    return [asdict(row) for row in found]


def stuck(dsn: str, longer_than: float = 3600.0) -> list[dict[str, Any]]:
    """notifyq.stuck: running jobs past their lease, or running over `longer_than` seconds."""
    found = _on(dsn, lambda conn: store.monitoring.stuck(conn, longer_than))
    return [asdict(row) for row in found]


def circuit_breakers(dsn: str) -> list[dict[str, Any]]:
    """Every task's circuit breaker: its settings and where it stands."""
    return [asdict(row) for row in _on(dsn, store.operations.circuit_breakers)]


def set_circuit_breaker(dsn: str, task: str, breaker: CircuitBreaker) -> None:
    """Give `task` a circuit breaker, or change its settings (its state is kept)."""
    check_task_name(task)
    _on(
        dsn,
        lambda conn: store.operations.set_circuit_breaker(
            conn, task, breaker.failures, breaker.window, breaker.cooldown
        ),
    )


def reset_circuit_breaker(dsn: str, task: str) -> str:
    """Close `task`'s circuit breaker now; returns the state it had (OperationRefused
    for a task without one)."""
    return _on(dsn, lambda conn: store.operations.reset_circuit_breaker(conn, task))


def remove_circuit_breaker(dsn: str, task: str) -> bool:
    """`task` has no circuit breaker from now on; whether it had one."""
    return _on(dsn, lambda conn: store.operations.remove_circuit_breaker(conn, task))
