"""Results for dependents: ctx.dependency_results() in Python, notifyq.dependency_results
in SQL, and who may read them."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import notifyq
from notifyq import JobContext
from notifyq.testing import eager
from tests.conftest import query, statuses
from tests.helpers import eventually, serving
from tests.test_security import Roles, as_user, roles  # noqa: F401 - roles is a fixture

pytestmark = pytest.mark.anyio


async def test_a_dependent_reads_what_its_dependencies_returned(dsn: str) -> None:
    """Across two dispatchers, async and plain handlers alike; read once per attempt."""
    app = notifyq.App(dsn)
    seen: dict[str, Any] = {}

    @app.task(name="fetch")
    async def fetch(payload: Any) -> Any:
        return {"rows": payload["n"]}

    @app.task(name="nothing")
    async def nothing(payload: Any) -> None:
        return None

    @app.task(name="build")
    async def build(payload: Any, ctx: JobContext) -> None:
        first = await ctx.dependency_results()
        assert await ctx.dependency_results() == first  # kept, not read again
        seen["build"] = dict(first)

    @app.task(name="report")
    def report(payload: Any, ctx: JobContext) -> None:
        seen["report"] = dict(ctx.dependency_results_sync())

    @app.task(name="alone")
    async def alone(payload: Any, ctx: JobContext) -> None:
        seen["alone"] = dict(await ctx.dependency_results())

    try:
        a = await app.enqueue("fetch", {"n": 1})
        b = await app.enqueue("fetch", {"n": 2})
        c = await app.enqueue("nothing")
        await app.enqueue("build", depends_on=[a, b, c])
        await app.enqueue("report", depends_on=[b])
        await app.enqueue("alone")
        async with serving(app, dsn, concurrency=2), serving(app, dsn, concurrency=2):
            await eventually(lambda: statuses(dsn) == {"succeeded": 6})
        assert seen == {
            "build": {a: {"rows": 1}, b: {"rows": 2}, c: None},
            "report": {b: {"rows": 2}},
            "alone": {},
        }
    finally:
        await app.aclose()


async def test_dependencies_that_did_not_succeed_are_left_out(dsn: str) -> None:
    app = notifyq.App(dsn)
    seen: list[dict[int, Any]] = []

    @app.task(name="cleanup")
    async def cleanup(payload: Any, ctx: JobContext) -> None:
        seen.append(dict(await ctx.dependency_results()))

    try:
        ok = await app.enqueue("gone")
        dead = await app.enqueue("gone")
        query(
            dsn,
            "UPDATE notifyq.jobs SET status = 'succeeded', result = '7', finished_at = now()"
            " WHERE id = %s",
            ok,
        )
        query(
            dsn, "UPDATE notifyq.jobs SET status = 'dead', finished_at = now() WHERE id = %s", dead
        )
        await app.enqueue("cleanup", depends_on=[ok, dead], on_dependency_failure="run")
        async with serving(app, dsn):
            await eventually(lambda: seen)
        assert seen == [{ok: 7}]
    finally:
        await app.aclose()


def test_sql_function_lists_every_dependency_in_order(dsn: str) -> None:
    ids = [
        query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('t') RETURNING id")[0][0]
        for _ in range(3)
    ]
    query(
        dsn,
        "UPDATE notifyq.jobs SET status = 'succeeded', result = %s, finished_at = now()"
        " WHERE id = %s",
        '{"x": 1}',
        ids[2],
    )
    (dependent,) = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, depends_on) VALUES ('t', %s) RETURNING id",
        [ids[2], ids[0], ids[1]],
    )[0]
    query(dsn, "DELETE FROM notifyq.jobs WHERE id = %s", ids[1])  # purged since
    assert query(dsn, "SELECT * FROM notifyq.dependency_results(%s)", dependent) == [
        (ids[2], "succeeded", {"x": 1}),
        (ids[0], "queued", None),
        (ids[1], None, None),
    ]
    assert query(dsn, "SELECT * FROM notifyq.dependency_results(%s)", ids[0]) == []
    assert query(dsn, "SELECT * FROM notifyq.dependency_results(424242)") == []


def test_workers_read_dependency_results_and_producers_may_not(
    dsn: str,
    roles: Roles,  # noqa: F811 - the fixture imported above
) -> None:
    """A producer chooses depends_on: reading results through its own job (or its token)
    would show it any job's result, so the function reads with the caller's rights."""
    (first,) = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, result, status, finished_at)"
        " VALUES ('t', '1', 'succeeded', now()) RETURNING id",
    )[0]
    (second,) = query(
        dsn, "INSERT INTO notifyq.jobs (task, depends_on) VALUES ('t', %s) RETURNING id", [first]
    )[0]
    worker = as_user(dsn, roles.worker_login)
    assert query(worker, "SELECT id, result FROM notifyq.dependency_results(%s)", second) == [
        (first, 1)
    ]
    assert query(worker, "SELECT notifyq.expire_unique_windows(10)") == [(0,)]
    producer = as_user(dsn, roles.producer_login)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query(producer, "SELECT * FROM notifyq.dependency_results(%s)", second)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query(producer, "SELECT notifyq.expire_unique_windows(10)")


def test_eager_jobs_read_their_dependencies_results(dsn: str) -> None:
    app = notifyq.App(dsn)
    seen: list[dict[int, Any]] = []

    @app.task(name="a")
    def a(payload: Any) -> int:
        return 41

    @app.task(name="b")
    async def b(payload: Any, ctx: JobContext) -> None:
        seen.append(dict(await ctx.dependency_results()))

    with eager(app):
        first = app.enqueue_sync("a")
        app.enqueue_sync("b", depends_on=[first])
    assert seen == [{first: 41}]
