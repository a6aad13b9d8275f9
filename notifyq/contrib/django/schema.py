"""The notifyq schema through Django's migrations, and the check that it is current.

The app ships one Django migration per notifyq schema version it brings (0001
brings the schema to version 16, 0002 to 18, 0003 to 19, 0004 to 20; a notifyq release that adds a
version adds a Django migration for it, which a test enforces).  Each runs notifyq's own
migrator (migrate.upgrade) on the migration's connection, inside its transaction:
the advisory lock makes a second process migrating at once wait and then find
nothing to do, and the versions are recorded in notifyq.schema_version, so
`manage.py migrate` and `notifyq migrate` (or `notifyq serve --migrate`) can both
be used, in any order: each applies only what the database lacks.  A migration
applies nothing on a database that no notifyq backend uses (OPTIONS["DATABASE"]).
There is no way back: unapplying raises IrreversibleError rather than drop jobs.
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.core import checks
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.operations import RunPython
from django.tasks import task_backends

from ... import migrate, store
from .backend import Backend


def databases() -> set[str]:
    """The aliases of DATABASES that notifyq backends use ("default" when none is
    configured: the app is installed, so the schema goes somewhere)."""
    used = {b.database for b in task_backends.all() if isinstance(b, Backend)}
    return used or {DEFAULT_DB_ALIAS}


class UpgradeSchema(RunPython):
    """Bring the notifyq schema to `version` (no further: a later Django migration
    brings the next), unless the database is there already."""

    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(self._forward, elidable=False)

    def describe(self) -> str:
        return f"Bring the notifyq schema to version {self.version}"

    def _forward(self, apps: Any, schema_editor: Any) -> None:
        connection = schema_editor.connection
        if connection.alias not in databases():
            return
        conn = connection.connection
        if not isinstance(conn, psycopg.Connection):
            raise RuntimeError(
                f"the notifyq schema is applied through psycopg 3; DATABASES"
                f"[{connection.alias!r}] connects with {type(conn).__module__}"
            )
        migrate.upgrade(conn, up_to=self.version)


def register_checks() -> None:
    checks.register(check_schema, checks.Tags.database)


def check_schema(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[Any]:
    """manage.py check --database ALIAS: a schema behind this notifyq is a warning (an
    error would stop `manage.py migrate`, which runs this check before migrating)."""
    messages: list[Any] = []
    for alias in sorted(set(databases or ()) & _databases()):
        try:
            wrapper = connections[alias]
            wrapper.ensure_connection()
            version = store.schema_version(wrapper.connection) or 0
        except Exception as exc:  # the check reports; it never fails the command
            messages.append(
                checks.Warning(
                    f"could not read the notifyq schema version of database {alias!r}: {exc}",
                    id="notifyq.W002",
                )
            )
            continue
        if version < migrate.SCHEMA_VERSION:
            messages.append(
                checks.Warning(
                    f"the notifyq schema of database {alias!r} is at version {version or 'none'}"
                    f"; this notifyq needs {migrate.SCHEMA_VERSION}",
                    hint="python manage.py migrate notifyq (or: notifyq migrate)",
                    id="notifyq.W001",
                )
            )
    return messages


_databases = databases  # check_schema's parameter of that name hides the function
