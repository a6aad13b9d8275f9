"""The schema's migrations: the numbered scripts, the version recorded in the
database, and the roles script (migrate.py and roles.py drive them)."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from .connection import QUERIES, translated


def roles_script(producer: str, worker: str) -> sql.Composed:
    """sql/roles.sql with the role names filled in, quoted by psycopg."""
    text: LiteralString = resources.files("notifyq").joinpath("sql/roles.sql").read_text()
    return sql.SQL(text).format(
        producer=sql.Identifier(producer),
        worker=sql.Identifier(worker),
        producer_name=sql.Literal(producer),
        worker_name=sql.Literal(worker),
    )


def apply_roles(conn: psycopg.Connection[Any], script: sql.Composed) -> None:
    """Run the roles script in one transaction on the caller's connection."""
    with translated(), conn.transaction():
        conn.execute(script)


def migration_scripts() -> list[tuple[int, LiteralString]]:
    """Every numbered migration, from 0001_initial.sql on, in order: (version, script)."""
    folder = resources.files("notifyq").joinpath("sql/migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_\w+\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text()))
    return sorted(found)


def migration_sql(after: int) -> str:
    """What `notifyq migrate` runs on a database at version `after` (0: no schema), as one
    script for a migration tool: the advisory lock `migrate` takes (so the two never run
    at once), a guard that raises unless the database is at `after` (where `migrate`
    reads the version and chooses), then each migration above `after`, each followed by
    the row recording it."""
    scripts = migration_scripts()
    guard = QUERIES["migrate_guard"]
    guard = guard.replace("%(after)s", str(after)).replace("%(target)s", str(scripts[-1][0]))
    record = QUERIES["record_version"]
    parts = [QUERIES["migrate_lock"], guard]
    for version, script in scripts:
        if version > after:
            parts.append(f"-- notifyq migration {version}\n{script.rstrip()}")
            parts.append(record.replace("%(version)s", str(version)))
    return "\n\n".join(parts) + "\n"


def schema_version(conn: psycopg.Connection[Any]) -> int | None:
    with translated():
        row = conn.execute(QUERIES["schema_present"]).fetchone()
        if not row or not row[0]:
            return None
        row = conn.execute(QUERIES["schema_version"]).fetchone()
    return int(row[0]) if row else 0


def apply_script(conn: psycopg.Connection[Any], version: int, script: LiteralString) -> None:
    """Run one migration script and record its version; the caller holds the transaction."""
    with translated():
        # No parameters: psycopg sends the script whole, several statements at once.
        conn.execute(script)
        conn.execute(QUERIES["record_version"], {"version": version})


def lock_migrations(conn: psycopg.Connection[Any]) -> None:
    with translated():
        conn.execute(QUERIES["migrate_lock"])
