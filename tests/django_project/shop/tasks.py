"""The test project's tasks, found by autodiscovery (the app's `tasks` module)."""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.tasks import TaskContext, task


class OutOfStock(Exception):
    pass


@task
def add(a: int, b: int) -> int:
    return a + b


@task(queue_name="mail", priority=50)
def send_mail(to: str, *, subject: str = "") -> dict[str, str]:
    return {"to": to, "subject": subject}


@task
def reserve(item: str) -> None:
    raise OutOfStock(f"no {item} left")


@task
async def double(x: int) -> int:
    return 2 * x


@task(takes_context=True)
def attempt_of(context: TaskContext, tag: str) -> dict[str, Any]:
    result = context.task_result
    return {"tag": tag, "attempt": context.attempt, "id": result.id, "status": result.status}


@task
def backend_pid() -> int:
    """Uses the task's Django connection: the tests check that it is closed after the job."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])
