"""Enqueue from Python: async and sync, on the app's connection or inside the caller's
transaction."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import notifyq
from notifyq import ConfigurationError, InvalidJob
from tests.conftest import query


def make_app(dsn: str) -> notifyq.App:
    app = notifyq.App(dsn=dsn)

    @app.task(name="mail.send", queue="mail", max_attempts=7)
    async def send(payload: Any) -> None:
        pass

    return app


@pytest.mark.anyio
async def test_async_enqueue_uses_task_defaults_and_returns_the_id(dsn: str) -> None:
    app = make_app(dsn)
    try:
        job_id = await app.enqueue("mail.send", {"to": "ada@example.org"}, priority=3)
        by_function = await app.enqueue(app.registry.get("mail.send").handler)  # type: ignore[union-attr]
    finally:
        await app.aclose()
    rows = query(
        dsn,
        "SELECT id, queue, task, payload, priority, max_attempts, status"
        " FROM notifyq.jobs ORDER BY id",
    )
    assert rows == [
        (job_id, "mail", "mail.send", {"to": "ada@example.org"}, 3, 7, "queued"),
        (by_function, "mail", "mail.send", {}, 0, 7, "queued"),
    ]


def test_sync_enqueue_of_an_unregistered_task_uses_column_defaults(dsn: str) -> None:
    app = notifyq.App(dsn=dsn)
    try:
        job_id = app.enqueue_sync("other.service.task", [1, 2, 3], queue="q2")
    finally:
        app.close()
    assert query(dsn, "SELECT id, queue, payload, max_attempts FROM notifyq.jobs") == [
        (job_id, "q2", [1, 2, 3], None)
    ]


def test_delay_and_run_at_use_the_database_clock(dsn: str) -> None:
    app = notifyq.App(dsn=dsn)
    at = datetime.now(UTC) + timedelta(hours=2)
    try:
        app.enqueue_sync("t", delay=3600)
        app.enqueue_sync("t", run_at=at)
    finally:
        app.close()
    rows = query(
        dsn,
        "SELECT round(extract(epoch FROM run_at - created_at)), run_at"
        " FROM notifyq.jobs ORDER BY id",
    )
    assert rows[0][0] == 3600
    assert rows[1][1] == at


def test_sync_enqueue_inside_the_callers_transaction_commits_or_vanishes_with_it(
    dsn: str,
) -> None:
    app = notifyq.App()  # no DSN of its own is needed with conn=
    with psycopg.connect(dsn) as conn:
        app.enqueue_sync("t", {"n": 1}, conn=conn)
        conn.rollback()
        kept = app.enqueue_sync("t", {"n": 2}, conn=conn)
        # Not visible to others before the caller commits.
        assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]
        conn.commit()
    assert query(dsn, "SELECT id, payload FROM notifyq.jobs") == [(kept, {"n": 2})]


@pytest.mark.anyio
async def test_async_enqueue_inside_the_callers_transaction(dsn: str) -> None:
    app = notifyq.App()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction():
            await app.enqueue("t", {"n": 1}, conn=conn)
            await conn.execute("CREATE TABLE orders (id int)")  # the caller's own work
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await app.enqueue("t", {"n": 2}, conn=conn)
                raise ZeroDivisionError
    assert query(dsn, "SELECT payload FROM notifyq.jobs") == [({"n": 1},)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "bad name"}, "invalid task name"),
        ({"task": "t", "queue": "Bad"}, "invalid queue name"),
        ({"task": "t", "priority": 5000}, "priority must be an integer from -1000 to 1000"),
        ({"task": "t", "max_attempts": 0}, "max_attempts must be NULL or an integer from 1"),
        ({"task": "t", "payload": {"x": object()}}, "payload is not JSON-serialisable"),
        ({"task": "t", "delay": -1}, "delay must be from 0 to"),
        ({"task": "t", "delay": float("inf")}, "delay must be from 0 to"),
        ({"task": "t", "delay": float("nan")}, "delay must be from 0 to"),
        ({"task": "t", "payload": {"s": "nul \u0000"}}, "job rejected: unsupported Unicode"),
        ({"task": "t", "delay": 1, "run_at": datetime.now(UTC)}, "either delay or run_at"),
        ({"task": "t", "run_at": datetime(2030, 1, 1)}, "timezone-aware"),
    ],
)
def test_bad_enqueue_arguments_raise_a_clear_error_and_insert_nothing(
    dsn: str, kwargs: dict[str, Any], message: str
) -> None:
    app = notifyq.App(dsn=dsn)
    kwargs = dict(kwargs)  # the parameter is shared by both servers' runs
    task = kwargs.pop("task")
    payload = kwargs.pop("payload", None)
    try:
        with pytest.raises((InvalidJob, ConfigurationError), match=message):
            app.enqueue_sync(task, payload, **kwargs)
    finally:
        app.close()
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]


def test_enqueue_without_schema_says_to_migrate(empty_dsn: str) -> None:
    app = notifyq.App(dsn=empty_dsn)
    try:
        with pytest.raises(notifyq.SchemaMissing, match="run `notifyq migrate`"):
            app.enqueue_sync("t")
    finally:
        app.close()


def test_enqueue_with_an_unreachable_database_is_a_clear_error(tmp_path: Any) -> None:
    app = notifyq.App(dsn=f"postgresql://postgres@/postgres?host={tmp_path}&connect_timeout=2")
    with pytest.raises(notifyq.DatabaseUnavailable, match="cannot reach PostgreSQL"):
        app.enqueue_sync("t")


def test_no_dsn_anywhere_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("NOTIFYQ_DSN", raising=False)
    monkeypatch.setenv("NOTIFYQ_DATA_DIR", str(tmp_path / "none"))
    with pytest.raises(ConfigurationError, match="no database configured"):
        notifyq.App().enqueue_sync("t")


def test_task_registration_rejects_bad_settings() -> None:
    app = notifyq.App()
    with pytest.raises(ConfigurationError, match="invalid task name"):
        app.task(name="has space")(lambda p: None)
    with pytest.raises(ConfigurationError, match="invalid queue name"):
        app.task(name="t", queue="UPPER")(lambda p: None)
    with pytest.raises(ConfigurationError, match="max_attempts"):
        app.task(name="t", max_attempts=0)(lambda p: None)
    with pytest.raises(ConfigurationError, match="must accept the payload"):
        app.task(name="t")(lambda: None)
    app.task(name="t")(lambda p: None)
    with pytest.raises(ConfigurationError, match="registered twice"):
        app.task(name="t")(lambda p: None)
