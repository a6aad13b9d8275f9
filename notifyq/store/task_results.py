"""A job's record and its attempts for a framework's result API (Django's
get_result, contrib/django), read on the caller's connection: inside its open
transaction, so a job enqueued in it and not yet committed is found too."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import class_row

from .connection import fetch_all, fetch_one
from .rows import AttemptEntry, TaskRecord


def task_record(conn: psycopg.Connection[Any], job_id: int) -> TaskRecord | None:
    return fetch_one(conn, "task_record", {"id": job_id}, class_row(TaskRecord))


def task_attempts(conn: psycopg.Connection[Any], job_id: int) -> list[AttemptEntry]:
    return fetch_all(conn, "task_attempts", {"id": job_id}, class_row(AttemptEntry))
