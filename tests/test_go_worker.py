"""The Go worker of examples/go-worker, built offline in GOPATH mode against Debian's pgx v4
(golang-go, golang-github-jackc-pgx-v4-dev): it drains a few hundred jobs and hands back
the rest on SIGTERM.  Skips, saying why, without the toolchain or the pgx sources."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, query, statuses, wait_until

GO_DIR = REPO / "examples" / "go-worker"
DEBIAN_GOPATH = Path("/usr/share/gocode")


@pytest.fixture(scope="session")
def go_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("the Go worker needs go on PATH (Debian: golang-go)")
    if not (DEBIAN_GOPATH / "src/github.com/jackc/pgx/v4/pgxpool").is_dir():
        pytest.skip(
            f"the Go worker needs pgx v4 in {DEBIAN_GOPATH}"
            " (Debian: golang-github-jackc-pgx-v4-dev)"
        )
    binary = tmp_path_factory.mktemp("go") / "go-worker"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(DEBIAN_GOPATH), "GOFLAGS": ""}
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=GO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    return binary


def test_go_worker_drains_and_hands_back_on_sigterm(
    go_worker: Path, dsn: str, tmp_path: Path
) -> None:
    query(dsn, "INSERT INTO notifyq.jobs (task) SELECT 'example.noop' FROM generate_series(1, 300)")
    [(long_id,)] = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload) VALUES ('example.sleep', '{\"ms\": 60000}')"
        " RETURNING id",
    )
    log = tmp_path / "go.log"
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "NOTIFYQ_CONCURRENCY": "20",
        "NOTIFYQ_SHUTDOWN_TIMEOUT": "1",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen([go_worker], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(
                lambda: statuses(dsn) == {"succeeded": 300, "running": 1},
                timeout=60,
                message="300 jobs done and the long one running",
            )
            [(name,)] = query(dsn, "SELECT claimed_by FROM notifyq.jobs WHERE id = %s", long_id)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert query(
        dsn, "SELECT count(*) FROM notifyq.jobs WHERE attempts <> 1 AND id <> %s", long_id
    ) == [(0,)]
    assert query(dsn, "SELECT status, attempts FROM notifyq.jobs WHERE id = %s", long_id) == [
        ("queued", 0)
    ]
    assert query(
        dsn, "SELECT kind, state FROM notifyq.dispatcher_status WHERE claimant = %s", name
    ) == [("sql", "stopped")]
    assert "1 job(s) handed back" in log.read_text()
