"""Bring a database's notifyq schema up to date.

The numbered scripts in sql/migrations/ build the schema from nothing:
0001_initial.sql is the first released schema, frozen, and each later file
changes the one before.  A database gets every script numbered above the
version it records, in order, each recorded in the same transaction, so a
database built by any older release (they recorded version 1 from the schema
they applied, or every version up to theirs) upgrades from where it stands.

Everything runs in one transaction under an advisory lock, so two processes
migrating at once serialise and the second finds nothing to do.  The version
this code needs is the newest file's number: nothing else writes it down.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import psycopg

from . import store
from .errors import SchemaMissing

log = logging.getLogger("notifyq.migrate")


def latest_version() -> int:
    """The schema version this code needs: the number of its newest migration."""
    return SCHEMA_VERSION


SCHEMA_VERSION: Final = store.migration_scripts()[-1][0]
"""The schema version this code needs, read from the migrations' file names."""


def migrate(dsn: str) -> tuple[int | None, int]:
    """Apply what is missing; returns (version before, version after)."""
    with store.connect_sync(dsn, autocommit=False) as conn:
        # translated() around the transaction too: its COMMIT (deferred checks, a lost
        # connection) is a statement of its own, outside the store's functions.
        with store.translated(), conn.transaction():
            before, current = upgrade(conn)
        if before != current:
            log.info("migrated schema from=%s to=%s", before, current)
        return before, current


def upgrade(conn: psycopg.Connection[Any], up_to: int | None = None) -> tuple[int | None, int]:
    """`migrate` on the caller's connection, inside the transaction it holds (a Django
    migration's, say), up to version `up_to` (None: the newest); returns (version before,
    version after).  The advisory lock is the transaction's: it holds until the caller
    commits, so a second process migrating at once waits, then finds nothing to do."""
    store.lock_migrations(conn)
    before = store.schema_version(conn)
    current = before or 0
    for version, script in store.migration_scripts():
        if current < version and (up_to is None or version <= up_to):
            store.apply_script(conn, version, script)
            current = version
    return before, current


def script(after: int = 0) -> str:
    """The SQL that `migrate` would run on a database at schema version `after` (0: no
    schema yet), for teams that apply schema changes with their own migration tool.
    Apply it in one transaction; it records each version it installs, so `migrate`,
    `check` and `notifyq health` see the result as they see their own.  It first raises
    (SQLSTATE 55000, object_not_in_prerequisite_state) unless the database is at `after`,
    so a script applied to the wrong database fails before it changes anything."""
    if after < 0:
        raise ValueError(f"schema version {after}: versions start at 1 (0: no schema yet)")
    if after > SCHEMA_VERSION:
        raise ValueError(
            f"schema version {after} is newer than this notifyq knows ({SCHEMA_VERSION}): "
            "upgrade notifyq to get its migrations"
        )
    return store.migration_sql(after)


def installed(dsn: str) -> int:
    """The schema version a database records (0: no notifyq schema)."""
    with store.connect_sync(dsn) as conn:
        return store.schema_version(conn) or 0


def check(dsn: str) -> int:
    """Raise SchemaMissing unless the database has the schema this code needs."""
    with store.connect_sync(dsn) as conn:
        version = store.schema_version(conn)
    if version is None:
        raise SchemaMissing(
            "the notifyq schema is not installed in this database: run `notifyq migrate`"
        )
    if version < SCHEMA_VERSION:
        raise SchemaMissing(
            f"the notifyq schema is at version {version} but this notifyq needs "
            f"{SCHEMA_VERSION}: run `notifyq migrate`"
        )
    return version
