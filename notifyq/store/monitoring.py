"""The read-only statements of `notifyq health` and the metrics (sync, on the caller's
connection) and of `notifyq watch` (async, on its Store): each along a partial
index, never a count of the whole table (sql/queries.sql says which)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import psycopg
from psycopg.rows import class_row

from .connection import fetch_all, fetch_one
from .dispatching import Store
from .rows import (
    BreakerState,
    DispatcherState,
    ExpiredLeases,
    FailedAttempt,
    FailedJob,
    LostDispatchers,
    OldestTransaction,
    QueueDepth,
    QueuePause,
    QueueStats,
    RunningJob,
    ServerInfo,
    StartWait,
    StuckJob,
    TupleCounts,
    UnservedJobs,
    Wakeups,
)

Conn = psycopg.Connection[Any]

# --- notifyq health


def server_info(conn: Conn) -> ServerInfo:
    found = fetch_one(conn, "health_server", {}, class_row(ServerInfo))
    assert found is not None  # a SELECT without FROM returns its one row
    return found


def oldest_transaction(conn: Conn) -> OldestTransaction | None:
    """The oldest transaction open in this database, other than ours; None: no other."""
    return fetch_one(conn, "health_oldest_transaction", {}, class_row(OldestTransaction))


def expired_leases(conn: Conn, grace: float) -> ExpiredLeases:
    """Running jobs whose lease expired over `grace` seconds ago."""
    found = fetch_one(conn, "health_expired_leases", {"grace": grace}, class_row(ExpiredLeases))
    assert found is not None  # an aggregate returns its one row
    return found


def jobs_table(conn: Conn) -> TupleCounts | None:
    """notifyq.jobs' tuple counts; None before the statistics know the table."""
    return fetch_one(conn, "health_jobs_table", {}, class_row(TupleCounts))


def lost_dispatchers(conn: Conn) -> LostDispatchers:
    found = fetch_one(conn, "health_lost_dispatchers", {}, class_row(LostDispatchers))
    assert found is not None  # an aggregate returns its one row
    return found


def unserved_jobs(conn: Conn, queues: Sequence[str] | None = None) -> list[UnservedJobs]:
    """Ready jobs no live dispatcher would claim, per (queue, task); None: every queue."""
    params = {"queues": None if queues is None else list(queues)}
    return fetch_all(conn, "unserved_jobs", params, class_row(UnservedJobs))


def circuit_breakers(conn: Conn) -> list[BreakerState]:
    """Every circuit breaker and where it stands (health, the metrics)."""
    return fetch_all(conn, "circuit_breakers", {}, class_row(BreakerState))


def queue_pauses(conn: Conn) -> list[QueuePause]:
    """Every paused queue and task, with its ready jobs (notifyq health, the metrics)."""
    return fetch_all(conn, "queue_pauses", {}, class_row(QueuePause))


# --- the monitoring functions (notifyq.queue_health, failed_recent, stuck), sync


def queue_health(conn: Conn, queues: Sequence[str] | None = None) -> list[QueueStats]:
    """notifyq.queue_health: per queue, what `notifyq watch` shows."""
    params = {"queues": None if queues is None else list(queues), "tags": None}
    return fetch_all(conn, "watch_queues", params, class_row(QueueStats))


def failed_recent(conn: Conn, within: float, limit: int) -> list[FailedAttempt]:
    """notifyq.failed_recent: failed attempts started in the last `within` seconds."""
    params = {"within": within, "limit": limit}
    return fetch_all(conn, "monitor_failed_recent", params, class_row(FailedAttempt))


def stuck(conn: Conn, longer_than: float) -> list[StuckJob]:
    """notifyq.stuck: running jobs past their lease or running over `longer_than` seconds."""
    return fetch_all(conn, "monitor_stuck", {"seconds": longer_than}, class_row(StuckJob))


# --- the metrics, at scrape time


def queue_depth(conn: Conn) -> list[QueueDepth]:
    return fetch_all(conn, "metrics_depth", {}, class_row(QueueDepth))


def wakeups(conn: Conn) -> Wakeups:
    row = fetch_one(conn, "wakeups", {}, class_row(Wakeups))
    return row if row is not None else Wakeups(0, 0)


def start_waits(conn: Conn, ids: Collection[int]) -> list[StartWait]:
    """Enqueue-to-start waits of these jobs' attempts, if not queued again since."""
    if not ids:
        return []
    return fetch_all(conn, "metrics_waits", {"ids": list(ids)}, class_row(StartWait))


# --- notifyq watch, on its Store (reconnects like the dispatcher's)


async def breaker_states(st: Store) -> list[BreakerState]:
    return await st._run("circuit_breakers", {}, class_row(BreakerState))


# `tags`: only the jobs that have every one of them (watch --tag); None or empty: any job.


async def queue_stats(
    st: Store, queues: Sequence[str] | None, tags: Sequence[str] | None = None
) -> list[QueueStats]:
    params = {"queues": None if queues is None else list(queues), "tags": list(tags or ()) or None}
    return await st._run("watch_queues", params, class_row(QueueStats))


async def recent_failures(
    st: Store, queues: Sequence[str] | None, limit: int, tags: Sequence[str] | None = None
) -> list[FailedJob]:
    params = {
        "queues": None if queues is None else list(queues),
        "limit": limit,
        "tags": list(tags or ()) or None,
    }
    return await st._run("watch_failures", params, class_row(FailedJob))


async def longest_running(
    st: Store, queues: Sequence[str] | None, limit: int, tags: Sequence[str] | None = None
) -> list[RunningJob]:
    params = {
        "queues": None if queues is None else list(queues),
        "limit": limit,
        "tags": list(tags or ()) or None,
    }
    return await st._run("watch_running", params, class_row(RunningJob))


async def dispatchers(st: Store) -> list[DispatcherState]:
    return await st._run("watch_dispatchers", {}, class_row(DispatcherState))


async def unserved(st: Store, queues: Sequence[str] | None) -> list[UnservedJobs]:
    params = {"queues": None if queues is None else list(queues)}
    return await st._run("unserved_jobs", params, class_row(UnservedJobs))
