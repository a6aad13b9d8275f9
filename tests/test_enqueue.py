"""Enqueue from Python: async and sync, on the app's connection or inside the caller's
transaction."""

from __future__ import annotations

import dataclasses
import enum
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import notifyq
from notifyq import ConfigurationError, InvalidJob, channels, enqueue
from tests.conftest import query
from tests.helpers import listen_on


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
        ({"task": "t", "payload": {"x": [1, float("nan")]}}, r"JSON has no NaN.*\['x'\]\[1\]"),
        ({"task": "t", "payload": float("-inf")}, "JSON has no NaN or Infinity"),
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


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Level(enum.Enum):
    TOP = float("inf")


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({"rows": [(1, 2.0), (3, float("nan"))]}, "['rows'][1][1] is nan"),
        ({"at": Point(1.0, -float("inf"))}, "['at'].y is -inf"),
        ([None, Level.TOP], "[1] is inf"),
    ],
)
def test_nan_and_infinity_are_refused_wherever_orjson_would_write_null(
    payload: Any, where: str
) -> None:
    with pytest.raises(InvalidJob, match="JSON has no NaN or Infinity") as refused:
        enqueue.encode(payload)
    assert where in str(refused.value)
    # A real null is no reason to refuse.
    assert enqueue.encode({"a": None, "p": Point(0.5, 1e308)}) == (
        '{"a":null,"p":{"x":0.5,"y":1e+308}}'
    )


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


def notifications_until_sentinel(listener: psycopg.Connection[Any], dsn: str) -> list[str]:
    """Everything `listener` received on notifyq_jobs before a sentinel sent now: a NOTIFY
    is delivered in commit order, so the sentinel arriving means nothing else is on its way."""
    query(dsn, "SELECT pg_notify(%s, 'sentinel')", channels.JOBS)
    got: list[str] = []
    for note in listener.notifies(timeout=20):
        if note.payload == "sentinel":
            return got
        got.append(note.payload)
    raise AssertionError(f"the sentinel never arrived; got {got[:5]}")


@pytest.mark.anyio
async def test_enqueue_many_inserts_in_order_with_one_notification_per_queue(dsn: str) -> None:
    app = make_app(dsn)
    count = notifyq.store.ENQUEUE_CHUNK * 2 + 17  # three statements, one transaction
    with psycopg.connect(dsn, autocommit=True) as listener:
        listen_on(listener, channels.JOBS)
        try:
            ids = await app.enqueue_many("mail.send", ({"i": i} for i in range(count)), priority=2)
            other = await app.enqueue_many("report.build", [[1], [2]], queue="reports")
            assert await app.enqueue_many("mail.send", []) == []
        finally:
            await app.aclose()
        assert notifications_until_sentinel(listener, dsn) == ["mail", "reports"]
    assert len(ids) == count and len(set(ids)) == count
    rows = query(
        dsn,
        "SELECT id, (payload->>'i')::int, queue, priority, max_attempts FROM notifyq.jobs"
        " WHERE task = 'mail.send' ORDER BY id",
    )
    assert [(r[0], r[1]) for r in rows] == list(zip(ids, range(count), strict=True))
    assert {r[2:] for r in rows} == {("mail", 2, 7)}  # the task's queue and max_attempts
    assert query(
        dsn, "SELECT id, payload, queue FROM notifyq.jobs WHERE task = 'report.build' ORDER BY id"
    ) == [(other[0], [1], "reports"), (other[1], [2], "reports")]


def test_enqueue_many_sync_joins_the_callers_transaction(dsn: str) -> None:
    app = make_app(dsn)
    try:
        with psycopg.connect(dsn) as conn:
            app.enqueue_many_sync("mail.send", [{"a": 1}, {"a": 2}], conn=conn, delay=60)
            conn.rollback()
            assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]
            ids = app.enqueue_many_sync("mail.send", [{"a": 3}], conn=conn, delay=60)
            conn.commit()
        ids += app.enqueue_many_sync("mail.send", [None])  # on the app's own connection
    finally:
        app.close()
    assert query(
        dsn,
        "SELECT id, payload, run_at > now() + interval '50 seconds' FROM notifyq.jobs ORDER BY id",
    ) == [(ids[0], {"a": 3}, True), (ids[1], {}, False)]


def nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("payloads", "message"),
    [
        ([{"ok": 1}, {"ok": 2}, {"ok": 3}, {"bad": object()}], "payload #3"),
        ([{"ok": 1}, nested(101)], "payload #1"),
        ([{"ok": 1}, {"ratio": float("inf")}], "payload #1.*JSON has no NaN or Infinity"),
        ("abc", "not a str"),
        ({"a": 1}, "not a dict"),
    ],
)
def test_enqueue_many_refuses_the_whole_batch_for_one_bad_payload(
    dsn: str, payloads: Any, message: str
) -> None:
    app = make_app(dsn)
    try:
        with pytest.raises(InvalidJob, match=message):
            app.enqueue_many_sync("mail.send", payloads)
    finally:
        app.close()
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]
