"""Behind PgBouncer in transaction mode: LISTEN cannot work there, and notifyq says so.

A real PgBouncer (Debian's package) runs in front of the server under test.
Listening through it, the dispatcher's probe notification never arrives and
it warns; with --no-listen (no LISTEN, no prepared statements) every job runs
by the fallback poll.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.apps.ledger import LEDGER_DDL
from tests.conftest import query, serve_process, statuses, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pooled_dsn(dsn: str) -> Iterator[str]:
    """`dsn` through a PgBouncer of the test's own, in transaction pooling mode."""
    exe = shutil.which("pgbouncer") or shutil.which("/usr/sbin/pgbouncer")
    if exe is None:
        pytest.skip("pgbouncer is not installed (Debian package pgbouncer; .ci/run installs it)")
    target = conninfo_to_dict(dsn)
    user = str(target.get("user", "postgres"))
    port = _free_port()
    # PgBouncer refuses to run as root: it runs as another user, so its files are open to all.
    root = Path(tempfile.mkdtemp(prefix="notifyq-pgbouncer-"))
    root.chmod(0o777)
    (root / "users.txt").write_text(f'"{user}" ""\n')
    (root / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={target.get('host', '127.0.0.1')} port={target.get('port', 5432)}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {root / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 20\nmax_client_conn = 100\n"
        f"logfile = {root / 'pgbouncer.log'}\n"
    )
    for f in root.iterdir():
        f.chmod(0o666)
    host = str(target.get("host", "127.0.0.1"))
    # A Unix socket is only reachable by its directory's owner (the embedded server's user).
    run_as = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "nobody"
    proc = subprocess.Popen(
        [exe, *(["-u", run_as] if os.geteuid() == 0 else []), str(root / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pooled = make_conninfo(dsn, host="127.0.0.1", port=port)

    def reachable() -> bool:
        try:
            with psycopg.connect(pooled, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    try:
        wait_until(reachable, timeout=15, message="pgbouncer to accept connections")
        yield pooled
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def test_listening_through_a_transaction_pooler_is_detected_and_warned(
    pooled_dsn: str, dsn: str, tmp_path: Path
) -> None:
    query(dsn, LEDGER_DDL)
    log = tmp_path / "serve.log"
    with serve_process(pooled_dsn, "--poll-interval", "0.2", log=log) as proc:
        wait_until(
            lambda: "LISTEN receives no notifications" in log.read_text(),
            timeout=30,
            message="the probe warning",
        )
        # Misconfigured, it still finds work by polling rather than failing.
        for _ in range(20):
            query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.record')")
        wait_until(lambda: statuses(dsn) == {"succeeded": 20} or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()[-3000:]
    text = log.read_text()
    assert "--no-listen" in text
    # More claims than psycopg's prepare threshold: the pooler broke a prepared statement,
    # and the store went on without preparing instead of failing.
    assert "notifyq stops preparing statements" in text


def test_poll_only_mode_runs_every_job_through_a_transaction_pooler(
    pooled_dsn: str, dsn: str, tmp_path: Path
) -> None:
    query(dsn, LEDGER_DDL)
    log = tmp_path / "serve.log"
    jobs = 40  # more claims than psycopg's prepare threshold: none may be prepared
    with serve_process(pooled_dsn, "--no-listen", "--poll-interval", "0.2", "-c", "2", log=log):
        for _ in range(jobs):
            query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.record')")
        wait_until(lambda: statuses(dsn) == {"succeeded": jobs}, timeout=60, message="all jobs")
    assert "prepared statement" not in log.read_text()


def test_a_direct_connection_passes_the_listen_probe(dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with serve_process(dsn, log=log):
        wait_until(lambda: "listener verified" in log.read_text(), message="the probe to come back")
    assert "LISTEN receives no notifications" not in log.read_text()
