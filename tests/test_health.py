"""`notifyq health` as users run it: exit 0 healthy, 1 a check failed, 2 only warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg

from notifyq.migrate import SCHEMA_VERSION
from tests.conftest import REPO, query, wait_until


def health(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFYQ_DSN"}
    return subprocess.run(
        [sys.executable, "-m", "notifyq", "health", "--dsn", dsn, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_healthy_database_exits_0(dsn: str) -> None:
    done = health(dsn)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: reachable: database" in done.stdout
    assert f"OK: schema: version {SCHEMA_VERSION}" in done.stdout
    assert "OK: leases: no expired lease left unrescued" in done.stdout
    assert "OK: jobs table: notifyq.jobs has about" in done.stdout
    # PostgreSQL's dead tuples, not notifyq's dead jobs: the wording keeps them apart.
    assert "dead tuples (old row versions VACUUM reclaims, not dead jobs)" in done.stdout
    assert "dead rows" not in done.stdout


def test_old_transaction_warns_naming_it_and_exits_2(dsn: str) -> None:
    with psycopg.connect(dsn, application_name="forgotten-report") as holder:
        holder.execute("SELECT txid_current()")  # BEGIN (not autocommit) and take an xid
        pid = holder.info.backend_pid
        wait_until(
            lambda: query(
                dsn,
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s"
                " AND clock_timestamp() - xact_start > interval '1 second'",
                pid,
            ),
            message="the transaction to be a second old",
        )
        done = health(dsn, "--max-transaction-age", "1")
        assert done.returncode == 2, done.stdout + done.stderr
        warning = next(line for line in done.stdout.splitlines() if line.startswith("WARNING"))
        assert warning.startswith(f"WARNING: transactions: pid {pid} ")
        assert "application_name 'forgotten-report'" in warning
        assert "state 'idle in transaction'" in warning
        assert "holds back vacuum of notifyq.jobs, whose dead tuples" in warning
        # Within the limit it is no warning.
        assert health(dsn, "--max-transaction-age", "3600").returncode == 0


def test_missing_schema_fails_with_1(empty_dsn: str) -> None:
    done = health(empty_dsn)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED: schema: the notifyq schema is not installed: run `notifyq migrate`" in (
        done.stdout
    )


def test_outdated_schema_fails_with_1(dsn: str) -> None:
    query(dsn, "DELETE FROM notifyq.schema_version")
    done = health(dsn)
    assert done.returncode == 1
    assert (
        f"FAILED: schema: the schema is at version 0, this notifyq needs {SCHEMA_VERSION}"
        in done.stdout
    )


def test_unreachable_database_fails_with_1() -> None:
    done = health("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert done.returncode == 1
    assert done.stdout.startswith("FAILED: reachable: cannot connect")


def test_stranded_lease_warns_and_json_reports_it(dsn: str) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, status, attempts, claimed_by, lease_expires_at)"
        " VALUES ('t', 'running', 1, 'gone:1:x', now() - interval '5 minutes')",
    )
    done = health(dsn, "--json")
    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "warning" and report["exit_code"] == 2
    leases = next(c for c in report["checks"] if c["name"] == "leases")
    assert leases["status"] == "warning"
    assert leases["details"]["jobs"] == 1
    assert "no dispatcher is rescuing them" in leases["message"]
