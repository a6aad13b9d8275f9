"""What a run costs besides time: WAL, statements, and CPU of the worker and its backends.

- WAL bytes: the difference of `pg_current_wal_insert_lsn()`, exact and immediate
  (the `pg_stat_wal` counters reach shared memory only when a backend flushes its
  statistics).  It covers the whole server: autovacuum and checkpoints running
  meanwhile count too, as they would for the system in production.
- Statements: calls of top-level statements in the run's database from
  `pg_stat_statements` (BEGIN and COMMIT count, as they are round trips).  Tracking
  is switched on for the database after the harness connected, so only the worker's
  sessions are tracked.  Without the extension (a --dsn server that does not preload
  it), committed and rolled-back transactions from `pg_stat_database`, read after the
  worker's backends have exited (which flushes their counters), less the harness's
  own transactions.
- CPU: the worker process (and any it started) from its first handler start, which
  it records itself; and its backends' CPU, when the server runs on this machine
  (psutil reads their /proc entries), from the first start the harness sees.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psycopg
from psycopg import sql

from . import procs

Conn = psycopg.Connection[tuple[Any, ...]]


def untrack(conn: Conn) -> None:
    """Keep this (harness) session's statements out of pg_stat_statements, in case
    the server tracks every session (a --dsn server may)."""
    # Not superuser: the session keeps the server's setting.
    with contextlib.suppress(psycopg.Error):
        conn.execute("SET pg_stat_statements.track = 'none'")


def track_statements(conn: Conn) -> None:
    """pg_stat_statements on for sessions that connect to this database from now on
    (not for `conn`, nor for any session already connected)."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    name = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
    conn.execute(
        sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track = 'top'").format(
            sql.Identifier(str(name))
        )
    )


def statement_count(conn: Conn, statements: bool) -> float:
    """Statements run in this database (pg_stat_statements), or its transactions."""
    if statements:
        query = (
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = current_database()"
        )
    else:
        conn.execute("SELECT pg_stat_force_next_flush()")
        query = (
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
    row = conn.execute(query).fetchone()
    assert row is not None
    return float(row[0])


def wal_lsn(conn: Conn) -> str:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def wal_since(conn: Conn, lsn: str) -> float:
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)", (lsn,)
    ).fetchone()
    assert row is not None
    return float(row[0])


class RunMeter:
    """WAL, statements and CPU between `begin` (before the worker starts) and `end`.

    Every query the harness sends on `conn` inside the window must go through
    `query` or `counted`, so that the transaction fallback can subtract them.
    """

    def __init__(self, conn: Conn, statements: bool) -> None:
        self.conn = conn
        self.statements = statements
        if statements:
            untrack(conn)
            track_statements(conn)
        self._harness = 0
        self._backends: dict[int, float] | None = None
        self._local = self._server_is_local()

    def query(self, text: Any, params: Any = None) -> Any:
        self._harness += 1
        return self.conn.execute(text, params).fetchone()

    def counted(self, condition: Any) -> Any:
        def run() -> Any:
            self._harness += 1
            return condition()

        return run

    def begin(self) -> None:
        self.lsn = wal_lsn(self.conn)
        self.count0 = statement_count(self.conn, self.statements)
        self._harness = 1  # the read above commits after it read

    def first_start(self) -> None:
        """The first handler started: from here the backends' CPU counts."""
        self._backends = self._backend_cpu()

    def end(self, w: procs.Worker) -> dict[str, float]:
        """At the end of the measured work, the worker still running."""
        self._harness += 1
        out = {"wal": wal_since(self.conn, self.lsn)}
        cpu = w.cpu()
        if cpu is not None:
            out["cpu"] = cpu
        if self._backends is not None:
            now = self._backend_cpu()
            if now is not None:
                out["server cpu"] = sum(t - self._backends.get(p, 0.0) for p, t in now.items())
        if self.statements:
            out["statements"] = statement_count(self.conn, True) - self.count0
        return out

    def after_stop(self) -> dict[str, float]:
        """The transaction count, once the worker has stopped (fallback only)."""
        if self.statements:
            return {}
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline
            and self.query(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )[0]
        ):
            time.sleep(0.02)
        # The count's own forced flush commits before its read: one more of ours.
        return {"xacts": statement_count(self.conn, False) - self.count0 - self._harness - 1}

    def _server_is_local(self) -> bool:
        try:
            import psutil

            pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            return "postgres" in psutil.Process(int(pid)).name()
        except Exception:  # no psutil, or the server runs elsewhere
            return False

    def _backend_cpu(self) -> dict[int, float] | None:
        """CPU seconds of each client backend in this database but the harness's."""
        if not self._local:
            return None
        import psutil

        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchall()
        self._harness += 1
        out: dict[int, float] = {}
        for (pid,) in rows:
            try:
                t = psutil.Process(int(pid)).cpu_times()
            except psutil.Error:
                continue
            out[int(pid)] = t.user + t.system
        return out
