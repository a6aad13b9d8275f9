"""Bring a database's notifyq schema up to date.

A database with no schema gets schema.sql whole (it records its own
version); one with an older version gets each numbered migration after it,
in order.  Everything runs in one transaction under an advisory lock, so two
processes migrating at once serialise and the second finds nothing to do.
"""

from __future__ import annotations

import logging

from . import store
from .errors import SchemaMissing

log = logging.getLogger("notifyq.migrate")

SCHEMA_VERSION = 11
"""The schema version this code needs (the newest it knows how to apply)."""


def latest_version() -> int:
    scripts = store.migration_scripts()
    return scripts[-1][0] if scripts else SCHEMA_VERSION


def migrate(dsn: str) -> tuple[int | None, int]:
    """Apply what is missing; returns (version before, version after)."""
    with store.connect_sync(dsn, autocommit=False) as conn:
        with conn.transaction():
            store.lock_migrations(conn)
            before = store.schema_version(conn)
            if before is None:
                store.apply_script(conn, SCHEMA_VERSION, store.schema_sql())
                current = SCHEMA_VERSION
            else:
                current = before
            for version, script in store.migration_scripts():
                if version > current:
                    store.apply_script(conn, version, script)
                    current = version
        if before != current:
            log.info("migrated schema from=%s to=%s", before, current)
        return before, current


def check(dsn: str) -> int:
    """Raise SchemaMissing unless the database has the schema this code needs."""
    with store.connect_sync(dsn) as conn:
        version = store.schema_version(conn)
    if version is None:
        raise SchemaMissing(
            "the notifyq schema is not installed in this database: run `notifyq migrate`"
        )
    if version < latest_version():
        raise SchemaMissing(
            f"the notifyq schema is at version {version} but this notifyq needs "
            f"{latest_version()}: run `notifyq migrate`"
        )
    return version
