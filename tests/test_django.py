"""The Django Tasks backend (notifyq.contrib.django) in a minimal Django project
(tests/django_project), against the test PostgreSQL: each test points the project's
database at a fresh database of its own.

Django 6 needs Python 3.12, so under the main test run (3.11) these tests skip; CI
runs them under .venv312 (.ci/run), after the main suite."""

from __future__ import annotations

import datetime as dt
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

if sys.version_info < (3, 12):
    pytest.skip(
        "Django 6 needs Python 3.12: CI runs these under .venv312 (.ci/run); here: "
        "python3.12 -m venv .venv312 && .venv312/bin/pip install -e '.[test,django]'",
        allow_module_level=True,
    )
pytest.importorskip("django.tasks", reason="needs Django 6: pip install -e '.[test,django]'")

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")
import django

django.setup()

from django.core import checks  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import close_old_connections, connections, transaction  # noqa: E402
from django.db.transaction import TransactionManagementError  # noqa: E402
from django.tasks import TaskResultStatus, default_task_backend  # noqa: E402
from django.tasks.exceptions import (  # noqa: E402
    InvalidTask,
    InvalidTaskBackend,
    TaskResultDoesNotExist,
)
from django.tasks.signals import task_enqueued, task_finished, task_started  # noqa: E402
from django.test import override_settings  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402

from notifyq import migrate  # noqa: E402
from notifyq.contrib.django import running  # noqa: E402
from notifyq.contrib.django.backend import Backend  # noqa: E402
from notifyq.testing import TestQueue  # noqa: E402
from tests.conftest import query  # noqa: E402
from tests.django_project.shop import tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APPLICATION = "notifyq-django-test"  # the project's application_name (its settings)


def point_django_at(dsn: str) -> None:
    """The project's database is now `dsn`'s (every thread's: they share the dict)."""
    connections.close_all()
    params = conninfo_to_dict(dsn)
    connections.settings["default"].update(
        NAME=params.get("dbname", ""),
        USER=params.get("user", ""),
        PASSWORD=params.get("password", ""),
        HOST=params.get("host", ""),
        PORT=str(params.get("port", "")),
    )


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    point_django_at(dsn)
    yield dsn
    connections.close_all()


@pytest.fixture
def heard() -> Iterator[list[tuple[str, str, str]]]:
    """(signal, result id, status) of every task signal sent, in order."""
    found: list[tuple[str, str, str]] = []

    def listen(name: str) -> Any:
        def receiver(sender: Any, task_result: Any, **kwargs: Any) -> None:
            found.append((name, task_result.id, str(task_result.status)))

        return receiver

    receivers = {
        task_enqueued: listen("enqueued"),
        task_started: listen("started"),
        task_finished: listen("finished"),
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver, weak=False)
    yield found
    for signal, receiver in receivers.items():
        signal.disconnect(receiver)


def drain(dsn: str, **options: Any) -> list[Any]:
    app = running.build_app(default_task_backend)
    try:
        return TestQueue(app, dsn).drain_sync(**options)
    finally:
        app.close()


def jobs(dsn: str) -> list[tuple[Any, ...]]:
    return query(dsn, "SELECT id, task, queue, priority, status FROM notifyq.jobs ORDER BY id")


def test_enqueue_joins_the_transaction_and_wakes_dispatchers_at_its_commit(
    db: str, heard: list[Any]
) -> None:
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute("LISTEN notifyq_jobs")
        with transaction.atomic():
            result = tasks.add.enqueue(1, 2)
            assert result.status == TaskResultStatus.READY
            assert tasks.add.get_result(result.id).args == [1, 2]  # seen in the transaction
            assert jobs(db) == [] and heard == []  # not committed: invisible, unsignalled
            assert list(listener.notifies(timeout=0.05)) == []
        assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["default"]
    assert jobs(db) == [
        (int(result.id), "tests.django_project.shop.tasks.add", "default", 0, "queued")
    ]
    assert heard == [("enqueued", result.id, "READY")]

    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.add.enqueue(5, 5)
        raise RuntimeError("rolled back")
    assert len(jobs(db)) == 1 and len(heard) == 1  # no job, no signal


def test_manual_transaction_management_is_refused_before_the_insert(
    db: str, heard: list[Any]
) -> None:
    transaction.set_autocommit(False)
    try:
        with pytest.raises(TransactionManagementError, match=r"transaction\.atomic\(\)"):
            tasks.add.enqueue(1, 1)
        transaction.commit()
    finally:
        transaction.set_autocommit(True)
    assert jobs(db) == [] and heard == []  # no job that enqueue said it did not send


def test_a_dead_persistent_connection_is_replaced_as_django_would(db: str) -> None:
    """CONN_HEALTH_CHECKS: the request's first use of a connection that died since the
    last request reconnects, the enqueue's as Django's own queries."""
    settings = connections.settings["default"]
    settings.update(CONN_MAX_AGE=None, CONN_HEALTH_CHECKS=True)
    try:
        connection = connections["default"]
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            [pid] = cursor.fetchone()
        query(db, "SELECT pg_terminate_backend(%s)", pid)
        close_old_connections()  # a request starts
        result = tasks.add.enqueue(1, 1)
    finally:
        settings.update(CONN_MAX_AGE=0, CONN_HEALTH_CHECKS=False)
        connections.close_all()
    assert [row[0] for row in jobs(db)] == [int(result.id)]


def test_queue_priority_and_run_after_map_onto_the_job(db: str) -> None:
    mail = tasks.send_mail.enqueue("ada@example.com", subject="hi")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    deferred = tasks.add.using(priority=-100, run_after=later).enqueue(1, 1)
    rows = {row[0]: row for row in jobs(db)}
    # Both run higher priorities first: the number goes across unchanged.
    assert rows[int(mail.id)][2:4] == ("mail", 50)
    assert rows[int(deferred.id)][2:4] == ("default", -100)
    [(run_at,)] = query(db, "SELECT run_at FROM notifyq.jobs WHERE id = %s", int(deferred.id))
    assert run_at == later
    found = tasks.add.get_result(deferred.id)
    assert (found.task.run_after, found.task.priority, found.kwargs) == (later, -100, {})
    assert tasks.send_mail.get_result(mail.id).kwargs == {"subject": "hi"}
    # The deferred one is not run now: it is due in an hour.
    assert [o.id for o in drain(db)] == [int(mail.id)]


def test_what_the_backend_refuses(db: str) -> None:
    with pytest.raises(InvalidTask, match="Queue 'other' is not valid"):
        tasks.add.using(queue_name="other")
    with pytest.raises(InvalidTask, match="priority"):
        tasks.add.using(priority=101)
    with pytest.raises(TypeError):
        tasks.add.enqueue(object(), 1)  # not JSON: nothing is sent
    for unknown in ("nope", "0", "999", str(2**70)):
        with pytest.raises(TaskResultDoesNotExist):
            default_task_backend.get_result(unknown)
    # A job of the table that is no Django task of this backend is not its result.
    [(other,)] = query(db, "INSERT INTO notifyq.jobs (task) VALUES ('plain.job') RETURNING id")
    with pytest.raises(TaskResultDoesNotExist, match="not a task of the 'default' backend"):
        default_task_backend.get_result(str(other))
    assert len(jobs(db)) == 1
    with pytest.raises(InvalidTaskBackend, match="unknown keys"):
        Backend("x", {"OPTIONS": {"MAX_ATTEMPT": 3}})
    with pytest.raises(InvalidTaskBackend, match="MAX_ATTEMPTS"):
        Backend("x", {"OPTIONS": {"MAX_ATTEMPTS": 0}})
    with pytest.raises(InvalidTaskBackend, match="BACKOFF"):
        Backend("x", {"OPTIONS": {"BACKOFF": {"base": -1}}})


def test_results_of_tasks_that_succeed_fail_are_async_or_take_the_context(
    db: str, heard: list[Any]
) -> None:
    added = tasks.add.enqueue(1, 2)
    failed = tasks.reserve.enqueue("tea")
    doubled = tasks.double.enqueue(21)
    context = tasks.attempt_of.enqueue("x")
    outcomes = drain(db, concurrency=4)
    assert sorted(o.status for o in outcomes) == ["dead", "succeeded", "succeeded", "succeeded"]

    added.refresh()
    assert (added.status, added.return_value, added.attempts) == ("SUCCESSFUL", 3, 1)
    assert added.started_at is not None and added.finished_at is not None
    assert added.worker_ids[0].count(":") == 2  # a dispatcher's claimant: host:pid:id

    result = tasks.reserve.get_result(failed.id)
    assert result.status == TaskResultStatus.FAILED
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value
    [error] = result.errors
    assert error.exception_class_path == "tests.django_project.shop.tasks.OutOfStock"
    assert error.exception_class is tasks.OutOfStock
    assert "raise OutOfStock" in error.traceback
    assert error.traceback.rstrip().endswith("OutOfStock: no tea left")

    assert tasks.double.get_result(doubled.id).return_value == 42
    import asyncio

    async def read() -> Any:
        return await tasks.double.aget_result(doubled.id)

    assert asyncio.run(read()).return_value == 42
    assert tasks.attempt_of.get_result(context.id).return_value == {
        "tag": "x",
        "attempt": 1,
        "id": context.id,
        "status": "RUNNING",
    }
    # Each job: enqueued at the commit, started, finished with the attempt's outcome.
    for job, end in ((added, "SUCCESSFUL"), (failed, "FAILED"), (doubled, "SUCCESSFUL")):
        assert [(s, status) for s, i, status in heard if i == job.id] == [
            ("enqueued", "READY"),
            ("started", "RUNNING"),
            ("finished", end),
        ]


def test_max_attempts_retries_with_the_errors_of_every_attempt(db: str) -> None:
    retrying = {"default": {"BACKEND": "notifyq.contrib.django.Backend",
                            "QUEUES": ["default", "mail"],
                            "OPTIONS": {"MAX_ATTEMPTS": 3, "BACKOFF": {"base": 0}}}}  # fmt: skip
    with override_settings(TASKS=retrying):
        failed = tasks.reserve.enqueue("tea")
        [outcome] = drain(db)
        assert (outcome.status, outcome.attempts) == ("dead", 3)
        failed.refresh()
    assert failed.status == TaskResultStatus.FAILED
    assert len(failed.worker_ids) == 3
    # The same traceback thrice: the history keeps it once, and each attempt shows it.
    assert [e.exception_class_path for e in failed.errors] == [
        "tests.django_project.shop.tasks.OutOfStock"
    ] * 3


def test_sync_tasks_close_their_database_connections(db: str) -> None:
    for _ in range(4):
        tasks.backend_pid.enqueue()
    outcomes = drain(db, concurrency=2)
    assert [o.status for o in outcomes] == ["succeeded"] * 4
    connections.close_all()  # this thread's, which enqueued
    # Django's connections of the worker threads (CONN_MAX_AGE 0) went with their jobs.
    assert query(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = "
        "current_database()",
        APPLICATION,
    ) == [(0,)]


def django_command(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
        "NOTIFYQ_DJANGO_DSN": dsn,
    }
    command = [sys.executable, "-m", "django", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=90)


def test_notifyq_serve_runs_the_jobs_in_a_process_of_its_own(db: str) -> None:
    result = tasks.add.enqueue(2, 3)
    mail = tasks.send_mail.enqueue("bob@example.com")
    done = django_command(db, "notifyq_serve", "--until-empty", "--concurrency", "2")
    assert done.returncode == 0, done.stderr
    assert "serving 6 tasks of backend 'default' on queues default, mail" in done.stdout
    result.refresh()
    mail.refresh()
    assert (result.status, result.return_value) == ("SUCCESSFUL", 5)
    assert mail.return_value == {"to": "bob@example.com", "subject": ""}

    refused = django_command(db, "notifyq_serve", "--concurrency", "0")
    assert refused.returncode == 1 and "--concurrency must be from 1" in refused.stderr


def test_the_migration_installs_and_upgrades_the_schema(
    empty_dsn: str, db: str, server: Any
) -> None:
    point_django_at(empty_dsn)
    assert any(m.id == "notifyq.W001" for m in checks.run_checks(databases=["default"]))
    call_command("migrate", verbosity=0)
    assert query(empty_dsn, "SELECT max(version) FROM notifyq.schema_version") == [
        (migrate.SCHEMA_VERSION,)
    ]
    assert query(
        empty_dsn, "SELECT name FROM django_migrations WHERE app = 'notifyq' ORDER BY name"
    ) == [("0001_schema",), ("0002_schema",), ("0003_schema",), ("0004_schema",)]
    assert not [m for m in checks.run_checks(databases=["default"]) if m.id.startswith("notifyq")]
    assert tasks.add.enqueue(1, 1).id == "1"

    # A database an older notifyq built (version 15) is brought up to date.
    older = server.create_database(template="template0")
    try:
        older_dsn = psycopg.conninfo.make_conninfo(server.admin_dsn, dbname=older)
        with psycopg.connect(older_dsn) as conn:
            migrate.upgrade(conn, up_to=migrate.SCHEMA_VERSION - 1)
        point_django_at(older_dsn)
        [warning] = [m for m in checks.run_checks(databases=["default"]) if m.id == "notifyq.W001"]
        assert f"at version {migrate.SCHEMA_VERSION - 1}" in warning.msg
        call_command("migrate", verbosity=0)
        assert migrate.installed(older_dsn) == migrate.SCHEMA_VERSION
    finally:
        connections.close_all()
        server.drop_database(older)

    # `notifyq migrate` first, then Django's: nothing left to do, and recorded.
    point_django_at(db)
    call_command("migrate", verbosity=0)
    assert migrate.installed(db) == migrate.SCHEMA_VERSION


def test_a_django_migration_brings_every_schema_version() -> None:
    """A notifyq release that adds a schema version adds a Django migration for it."""
    folder = REPO / "notifyq" / "contrib" / "django" / "migrations"
    versions = [
        operation.version
        for path in sorted(folder.glob("0*.py"))
        for operation in importlib.import_module(
            f"notifyq.contrib.django.migrations.{path.stem}"
        ).Migration.operations
    ]
    assert versions == sorted(versions)
    assert versions[-1] == migrate.SCHEMA_VERSION


def test_a_task_past_its_timeout_is_reported_failed(db: str, heard: list[Any]) -> None:
    options = {"TIMEOUT": 0.2, "MODULES": ["tests.django_project.slow_tasks"]}
    timing_out = {
        "default": {
            "BACKEND": "notifyq.contrib.django.Backend",
            "QUEUES": ["default", "mail"],
            "OPTIONS": options,
        }
    }
    with override_settings(TASKS=timing_out):
        from tests.django_project import slow_tasks

        result = slow_tasks.sleep_async.enqueue(60)
        late = slow_tasks.sleep_sync.enqueue(1)
        assert [o.status for o in drain(db, concurrency=2)] == ["dead", "dead"]
        result.refresh()
        late.refresh()
    assert result.status == late.status == TaskResultStatus.FAILED
    # A thread cannot be stopped: the sync task's thread returns after its attempt failed.
    deadline = time.monotonic() + 30
    while not any(s == "finished" and i == late.id for s, i, _ in heard):
        assert time.monotonic() < deadline, "the sync task's thread never returned"
        time.sleep(0.05)
    # task_finished is sent for each as for any failed attempt (not SUCCESSFUL for the
    # thread that returned after its attempt failed).
    for job in (result, late):
        assert [(s, status) for s, i, status in heard if i == job.id] == [
            ("enqueued", "READY"),
            ("started", "RUNNING"),
            ("finished", "FAILED"),
        ]
