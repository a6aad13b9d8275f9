"""Enqueue inside a SQLAlchemy transaction.

`App.enqueue(..., conn=session)` (and `enqueue_sync`, `enqueue_many`) take a SQLAlchemy
`Session`, `AsyncSession` or `Connection`/`AsyncConnection` as well as a psycopg
connection: the INSERT runs on the DBAPI connection of that object's transaction, so
the job exists only if it commits, and its notification is sent at that commit.  The
engine must use the psycopg (3) driver (`postgresql+psycopg://...`), the one notifyq
speaks; any other driver is refused with a message saying so.

A Session begins its transaction when asked for its connection.  A bare Connection must
be in one already (`with engine.begin() as conn`, or after a statement of its own):
otherwise SQLAlchemy would not know of the transaction the INSERT opens, and its
`commit()` would leave the job uncommitted, to be rolled back and lost.

SQLAlchemy is not imported here: its objects are recognised by what they offer, at run
time by their attributes and for type checkers by the Protocols below, which describe
the part of SQLAlchemy's classes notifyq uses.  With SQLAlchemy installed, mypy checks a
`Session` against `SessionLike` (it fits; an `AsyncSession` does not, so giving one to
`enqueue_sync` is a type error); without it, `conn=` is still typed, not `Any`.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias

import psycopg

from ..errors import ConfigurationError


class PooledConnection(Protocol):
    """sqlalchemy.pool.PoolProxiedConnection: the pool's wrapper of a DBAPI connection."""

    @property
    def driver_connection(self) -> Any: ...


class ConnectionLike(Protocol):
    """sqlalchemy.Connection (sync)."""

    @property
    def connection(self) -> PooledConnection: ...

    def in_transaction(self) -> bool: ...

    # What tells it from an AsyncConnection, whose `connection` property is typed
    # NoReturn (which fits any type) but whose commit is a coroutine function.
    def commit(self) -> None: ...


class SessionLike(Protocol):
    """sqlalchemy.orm.Session (sync)."""

    def connection(self) -> ConnectionLike: ...

    def commit(self) -> None: ...  # as in ConnectionLike: an AsyncConnection does not fit


class AsyncConnectionLike(Protocol):
    """sqlalchemy.ext.asyncio.AsyncConnection."""

    async def get_raw_connection(self) -> PooledConnection: ...

    def in_transaction(self) -> bool: ...


class AsyncSessionLike(Protocol):
    """sqlalchemy.ext.asyncio.AsyncSession."""

    async def connection(self) -> AsyncConnectionLike: ...


# What conn= of App.enqueue* takes: the job joins that connection's open transaction.
SyncConn: TypeAlias = psycopg.Connection[Any] | SessionLike | ConnectionLike
AsyncConn: TypeAlias = psycopg.AsyncConnection[Any] | AsyncSessionLike | AsyncConnectionLike


def sync_connection(conn: Any) -> psycopg.Connection[Any]:
    """The psycopg connection under a psycopg or SQLAlchemy (sync) connection or Session."""
    if isinstance(conn, psycopg.Connection):
        return conn
    if hasattr(conn, "sync_session") or hasattr(conn, "get_raw_connection"):
        raise TypeError(
            f"an {type(conn).__qualname__} goes to enqueue() or enqueue_many(), "
            "not to their _sync variants"
        )
    if _is_session(conn):
        conn = conn.connection()  # begins the session's transaction if it has none
    elif _is_connection(conn):
        _require_transaction(conn)
    else:
        raise TypeError(_unknown(conn, "psycopg.Connection, or a SQLAlchemy Session or Connection"))
    driver: psycopg.Connection[Any] = _psycopg(
        conn.connection.driver_connection, psycopg.Connection
    )
    return driver


async def async_connection(conn: Any) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection under a psycopg or SQLAlchemy async connection or session."""
    if isinstance(conn, psycopg.AsyncConnection):
        return conn
    if hasattr(conn, "sync_session"):  # AsyncSession
        conn = await conn.connection()  # begins the session's transaction if it has none
    elif hasattr(conn, "get_raw_connection"):  # AsyncConnection
        _require_transaction(conn)
    else:
        raise TypeError(
            _unknown(
                conn, "psycopg.AsyncConnection, or a SQLAlchemy AsyncSession or AsyncConnection"
            )
        )
    raw = await conn.get_raw_connection()
    driver: psycopg.AsyncConnection[Any] = _psycopg(raw.driver_connection, psycopg.AsyncConnection)
    return driver


def _is_session(conn: Any) -> bool:
    return callable(getattr(conn, "connection", None)) and hasattr(conn, "get_bind")


def _is_connection(conn: Any) -> bool:
    return (
        hasattr(conn, "in_transaction")
        and hasattr(conn, "engine")
        and not callable(getattr(conn, "connection", None))
    )


def _require_transaction(conn: Any) -> None:
    if not conn.in_transaction():
        raise ConfigurationError(
            "the SQLAlchemy connection given as conn= is not in a transaction: the job would "
            "be inserted outside it and lost at its commit; begin one first "
            "(engine.begin(), conn.begin()) or pass the Session"
        )


def _psycopg(driver: Any, expected: type) -> Any:
    if not isinstance(driver, expected):
        raise ConfigurationError(
            f"the SQLAlchemy engine's driver connection is a {type(driver).__module__}."
            f"{type(driver).__qualname__}; notifyq enqueues through psycopg 3: create the "
            "engine with a postgresql+psycopg:// URL"
        )
    return driver


def _unknown(conn: Any, wanted: str) -> str:
    return f"conn= takes a {wanted}, not {type(conn).__qualname__}"
