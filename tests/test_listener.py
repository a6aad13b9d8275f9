"""The LISTEN connection's own guarantees: it survives what cuts idle sessions off."""

from __future__ import annotations

from pathlib import Path

from tests.apps.ledger import LEDGER_DDL
from tests.conftest import query, serve_process, statuses, wait_until


def backends(dsn: str, role: str) -> list[int]:
    return [
        r[0]
        for r in query(
            dsn,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s",
            f"notifyq:{role}",
        )
    ]


def test_listener_is_exempt_from_idle_session_timeout(dsn: str, tmp_path: Path) -> None:
    """With idle sessions cut after 1 s, the other connections come and go, but the listener
    stays, so a job still starts by its notification alone (the poll is an hour)."""
    query(dsn, LEDGER_DDL)
    dbname = query(dsn, "SELECT current_database()")[0][0]
    query(dsn, f"ALTER DATABASE \"{dbname}\" SET idle_session_timeout = '1s'")
    with serve_process(dsn, "--poll-interval", "3600", log=tmp_path / "serve.log"):
        listener = wait_until(lambda: backends(dsn, "listen"), message="the listener")
        first_claim = wait_until(lambda: backends(dsn, "claim"), message="the first claim")
        # The claim connection, idle, is cut by the timeout: now we know it is in force.
        wait_until(lambda: backends(dsn, "claim") != first_claim, message="the timeout to bite")
        assert backends(dsn, "listen") == listener
        query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.record')")
        wait_until(lambda: statuses(dsn) == {"succeeded": 1}, message="the job, by notification")
        assert backends(dsn, "listen") == listener
