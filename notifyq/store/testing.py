"""The statements of `notifyq.testing` (sync, on the caller's connection): a test's
clean state, its jobs, its clock, and the drain's retries made due."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row, scalar_row

from .connection import fetch_all, fetch_value, translated
from .rows import JobRecord

Conn = psycopg.Connection[Any]


def jobs(conn: Conn, ids: Sequence[int] | None = None) -> list[JobRecord]:
    """Every job (or those of `ids`), by id."""
    params = {"ids": None if ids is None else list(ids)}
    return fetch_all(conn, "testing_jobs", params, class_row(JobRecord))


def reset(conn: Conn) -> None:
    """Empty every notifyq table but the schema's version; ids start from 1 again."""
    fetch_value(conn, "testing_reset", {})


def advance(conn: Conn, seconds: float) -> int:
    """Move what the database keeps time of `seconds` into the past; the jobs moved."""
    return int(fetch_value(conn, "testing_advance", {"seconds": seconds}))


def retries_due(conn: Conn, queues: Collection[str], tasks: Collection[str]) -> list[int]:
    """Make due now the jobs of these queues and tasks that wait for a retry; their ids."""
    params = {"queues": list(queues), "tasks": list(tasks)}
    return fetch_all(conn, "testing_retries_due", params, scalar_row)


def create_database(conn: Conn, name: str) -> None:
    """A new, empty database (on an autocommit connection to another one)."""
    with translated():
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(conn: Conn, name: str) -> None:
    """Drop it, ending the sessions still connected to it (PostgreSQL 13 and later)."""
    with translated():
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def busy(conn: Conn, queues: Collection[str], tasks: Collection[str]) -> bool:
    """Whether a job of these queues and tasks is due now or running."""
    return bool(fetch_value(conn, "testing_busy", {"queues": list(queues), "tasks": list(tasks)}))
