"""Connections, the named queries, and the translation of driver errors.

Queries come from sql/queries.sql, loaded once.  Every driver error leaves the
store translated by `translated()`, so callers handle notifyq errors only.
The helpers at the bottom run one named query on the caller's (sync)
connection and return its rows built by a psycopg row factory: by column name,
so no code anywhere reads a column by its position.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg.rows import BaseRowFactory, scalar_row

from .. import codec
from ..errors import ConfigurationError, OperationRefused, dsn_secrets, redact, translate

T = TypeVar("T")

_BLOCK = re.compile(r"^-- name: (\w+)\n", re.MULTILINE)

CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 10,
    # Notice a peer that vanished without closing the socket within ~30 s.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    # ... and a query whose packets go unacknowledged (keepalives do not cover that).
    "tcp_user_timeout": 30_000,
}


def _load_queries() -> dict[str, LiteralString]:
    text = resources.files("notifyq").joinpath("sql/queries.sql").read_text()
    parts = _BLOCK.split(text)[1:]
    # The SQL is our own file, never user input: typing it as LiteralString is honest.
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2], strict=True)}


QUERIES = _load_queries()


@contextmanager
def translated(dsn: str | None = None) -> Iterator[None]:
    """Re-raise driver errors as the notifyq errors they mean; while connecting, `dsn`
    names the password to keep out of the message (libpq may echo the string)."""
    try:
        yield
    except psycopg.ProgrammingError as exc:
        if exc.sqlstate is None:  # raised by the driver itself, e.g. a malformed DSN
            reason = redact(str(exc).strip(), dsn_secrets(dsn))
            # `from None`: the driver's own exception would carry the password along.
            raise ConfigurationError(f"invalid connection string: {reason}") from None
        raise translate(exc, dsn=dsn) from exc
    except psycopg.Error as exc:
        error = translate(exc, dsn=dsn)
        if dsn and redact(str(exc), dsn_secrets(dsn)) != str(exc):
            raise error from None  # the driver's message held the password
        raise error from exc


def connect_sync(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    with translated(dsn):
        conn = psycopg.connect(dsn, autocommit=autocommit, **CONNECT_OPTIONS)
    codec.configure(conn)
    return conn


async def connect(
    dsn: str, *, application_name: str = "notifyq", prepare: bool = True
) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection; `prepare=False` for poolers that cannot keep prepared
    statements across transactions (PgBouncer in transaction mode)."""
    with translated(dsn):
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name=application_name, **CONNECT_OPTIONS
        )
    if not prepare:
        conn.prepare_threshold = None
    codec.configure(conn)
    return conn


# --- one named query on the caller's connection (the operations and monitoring modules)


def fetch_all(
    conn: psycopg.Connection[Any], name: str, params: dict[str, Any], row: BaseRowFactory[T]
) -> list[T]:
    """Rows of a named query, each built by `row`; an admin function's refusal
    (a notifyq.* function that RAISEs) becomes OperationRefused."""
    with translated():
        try:
            cur = conn.cursor(row_factory=row).execute(QUERIES[name], params)
        except psycopg.Error as exc:
            refusal = _refusal(exc)
            if refusal is None:
                raise
            raise refusal from exc
        return cur.fetchall() if cur.description else []


def fetch_one(
    conn: psycopg.Connection[Any], name: str, params: dict[str, Any], row: BaseRowFactory[T]
) -> T | None:
    """The first row of a named query, None when it returned none."""
    found = fetch_all(conn, name, params, row)
    return found[0] if found else None


def fetch_value(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> Any:
    """The one value a named query returns (a notifyq.* function's result, a count)."""
    return fetch_one(conn, name, params, scalar_row)


def _refusal(exc: psycopg.Error) -> OperationRefused | None:
    """The notifyq.* admin functions RAISE with a message starting 'notifyq: '."""
    message = exc.diag.message_primary or ""
    if not message.startswith("notifyq: "):
        return None
    hint = exc.diag.message_hint
    return OperationRefused(message.removeprefix("notifyq: ") + (f" ({hint})" if hint else ""))
