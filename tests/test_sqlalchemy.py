"""Enqueue inside a SQLAlchemy transaction (contrib/sqlalchemy.py): the job exists only if
the Session (or AsyncSession, or Connection) commits."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import URL, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import notifyq
from notifyq import migrate
from notifyq.errors import ConfigurationError
from tests.conftest import REPO, query

pytestmark = pytest.mark.anyio


def url(dsn: str, driver: str = "psycopg") -> URL:
    params: dict[str, Any] = conninfo_to_dict(dsn)
    return URL.create(
        f"postgresql+{driver}",
        username=params.get("user"),
        password=params.get("password"),
        host=params.get("host"),
        port=int(params["port"]) if params.get("port") else None,
        database=params.get("dbname"),
    )


def tasks(dsn: str) -> list[str]:
    return [r[0] for r in query(dsn, "SELECT task FROM notifyq.jobs ORDER BY id")]


def test_a_session_commits_or_rolls_back_its_jobs_with_its_rows(dsn: str) -> None:
    app = notifyq.App(dsn=dsn)
    engine = create_engine(url(dsn))
    query(dsn, "CREATE TABLE orders (id int PRIMARY KEY)")
    try:
        with Session(engine) as session:
            session.execute(text("INSERT INTO orders VALUES (1)"))
            app.enqueue_sync("orders.ship", {"order": 1}, conn=session)
            session.rollback()
        assert tasks(dsn) == [] and query(dsn, "SELECT count(*) FROM orders") == [(0,)]
        with Session(engine) as session:
            # Before any statement of the session's own: asking for its connection begins it.
            app.enqueue_sync("orders.ship", {"order": 2}, conn=session)
            app.enqueue_many_sync("orders.mail", [{"n": 1}, {"n": 2}], conn=session)
            session.execute(text("INSERT INTO orders VALUES (2)"))
            assert tasks(dsn) == []  # not committed yet: other sessions see nothing
            session.commit()
        assert tasks(dsn) == ["orders.ship", "orders.mail", "orders.mail"]
    finally:
        engine.dispose()
        app.close()


def test_schema_sql_applies_through_sqlalchemy_as_documented(empty_dsn: str) -> None:
    """docs/operations.md's Alembic recipe: the script, sent whole with no parameters (the
    functions' bodies hold % signs), in a transaction."""
    engine = create_engine(url(empty_dsn))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(migrate.script(0), execution_options={"no_parameters": True})
        assert migrate.check(empty_dsn) == migrate.SCHEMA_VERSION
        # The same revision run again (Alembic's bookkeeping lost): its guard stops it.
        with pytest.raises(DBAPIError, match="stopping before any change"), engine.begin() as conn:
            conn.exec_driver_sql(migrate.script(0), execution_options={"no_parameters": True})
    finally:
        engine.dispose()


def test_a_connection_must_be_in_a_transaction(dsn: str) -> None:
    app = notifyq.App(dsn=dsn)
    engine = create_engine(url(dsn))
    try:
        with engine.connect() as conn, pytest.raises(ConfigurationError, match="in a transaction"):
            app.enqueue_sync("t", {}, conn=conn)
        with engine.begin() as conn:
            app.enqueue_sync("t", {}, conn=conn)
        assert tasks(dsn) == ["t"]
    finally:
        engine.dispose()
        app.close()


async def test_an_async_session_commits_or_rolls_back_its_jobs(dsn: str) -> None:
    app = notifyq.App(dsn=dsn)
    engine = create_async_engine(url(dsn))
    try:
        async with AsyncSession(engine) as session:
            await app.enqueue("a", {}, conn=session)
            await session.rollback()
        async with AsyncSession(engine) as session:
            await app.enqueue("b", {}, conn=session)
            await app.enqueue_many("c", [{}, {}], conn=session)
            await session.commit()
        async with engine.connect() as conn:
            with pytest.raises(ConfigurationError, match="not in a transaction"):
                await app.enqueue("d", {}, conn=conn)
        async with engine.begin() as conn:
            await app.enqueue("e", {}, conn=conn)
        assert tasks(dsn) == ["b", "c", "c", "e"]
    finally:
        await engine.dispose()
        await app.aclose()


async def test_objects_that_are_no_connection_are_refused_saying_why(dsn: str) -> None:
    app = notifyq.App(dsn=dsn)
    with pytest.raises(TypeError, match=r"conn= takes a psycopg\.AsyncConnection, or a SQLAlchemy"):
        await app.enqueue("t", {}, conn=object())  # type: ignore[arg-type]
    engine = create_engine(url(dsn))
    try:
        with Session(engine) as session, pytest.raises(TypeError, match="Session"):
            await app.enqueue("t", {}, conn=session)  # type: ignore[arg-type]
    finally:
        engine.dispose()
    async_engine = create_async_engine(url(dsn))
    try:
        async with AsyncSession(async_engine) as session:
            with pytest.raises(TypeError, match=r"goes to enqueue\(\) or enqueue_many\(\)"):
                app.enqueue_sync("t", {}, conn=session)  # type: ignore[arg-type]
    finally:
        await async_engine.dispose()
        await app.aclose()
    assert tasks(dsn) == []


async def test_a_driver_other_than_psycopg_is_refused_naming_the_url_to_use(dsn: str) -> None:
    pytest.importorskip("asyncpg", reason="asyncpg (a driver to refuse) is not installed")
    app = notifyq.App(dsn=dsn)
    other = create_async_engine(url(dsn, "asyncpg"))
    try:
        async with AsyncSession(other) as session:
            with pytest.raises(ConfigurationError, match=r"postgresql\+psycopg://"):
                await app.enqueue("t", {}, conn=session)
    finally:
        await other.dispose()
        await app.aclose()
    assert tasks(dsn) == []


WITH_SQLALCHEMY = """
from typing import Any

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session, scoped_session

import notifyq

app = notifyq.App()
engine = create_engine("postgresql+psycopg://")


def sync(s: Session, scoped: scoped_session[Session], aconn: AsyncConnection) -> None:
    with engine.begin() as connection:
        app.enqueue_sync("t", conn=connection)
    app.enqueue_sync("t", conn=s)
    app.enqueue_many_sync("t", [1], conn=scoped)
    app.enqueue_sync("t", conn=aconn)  # error
    app.enqueue_sync("t", conn="postgresql://")  # error


async def async_(session: AsyncSession, aconn: AsyncConnection, s: Session) -> None:
    await app.enqueue("t", conn=session)
    await app.enqueue_many("t", [1], conn=aconn)
    app.enqueue_sync("t", conn=session)  # error
    await app.enqueue("t", conn=s)  # error
"""

WITHOUT_SQLALCHEMY = """
from typing import Any

import psycopg

import notifyq

app = notifyq.App()


async def both(conn: psycopg.Connection[Any], aconn: psycopg.AsyncConnection[Any]) -> None:
    app.enqueue_sync("t", conn=conn)
    await app.enqueue("t", conn=aconn)
    app.enqueue_sync("t", conn="postgresql://")  # error
    await app.enqueue("t", conn=conn)  # error
"""


@pytest.mark.timeout(300)  # mypy analyses notifyq, psycopg and SQLAlchemy from cold
def test_conn_is_typed_with_sqlalchemy_installed_or_not(tmp_path: Path) -> None:
    """mypy on a user's code: with SQLAlchemy, its Session and Connection fit `conn=` and
    the async ones do not fit the _sync methods (and the other way round); without it
    (SQLAlchemy's modules skipped, as if not installed), `conn=` is still typed, not Any."""
    for name, source, config in (
        ("with_sqlalchemy", WITH_SQLALCHEMY, "[mypy]\nstrict = True\n"),
        (
            "without_sqlalchemy",
            WITHOUT_SQLALCHEMY,
            "[mypy]\nstrict = True\n[mypy-sqlalchemy.*]\nfollow_imports = skip\n",
        ),
    ):
        snippet = tmp_path / f"{name}.py"
        snippet.write_text(textwrap.dedent(source).lstrip())
        (tmp_path / f"{name}.ini").write_text(config)
        result = subprocess.run(
            [
                *(sys.executable, "-m", "mypy", "--config-file", f"{name}.ini"),
                *("--cache-dir", str(tmp_path / "cache"), snippet.name),
            ],
            cwd=tmp_path,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=280,
        )
        errors = {
            int(m.group(1)) for m in re.finditer(rf"^{name}\.py:(\d+): error:", result.stdout, re.M)
        }
        expected = {
            n for n, line in enumerate(snippet.read_text().splitlines(), 1) if "# error" in line
        }
        assert errors == expected, result.stdout + result.stderr
        assert "arg-type" in result.stdout  # the errors are the ones meant, not import errors
