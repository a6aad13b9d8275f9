"""examples/enqueue_from_python.py without NOTIFYQ_DSN: it finds the private server the way the
rest of notifyq does, and says what to do when there is none (test_cli.py runs it with a DSN)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, statuses, wait_until


def run(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_python_enqueue_example_without_a_database_says_what_to_do(tmp_path: Path) -> None:
    env = {"NOTIFYQ_DATA_DIR": str(tmp_path / "pgdata"), "NOTIFYQ_DSN": ""}
    result = run(["-m", "examples.enqueue_from_python"], env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "examples.enqueue_from_python: no database configured" in result.stderr
    assert "NOTIFYQ_DSN" in result.stderr and "notifyq serve" in result.stderr


def test_python_enqueue_example_uses_the_private_server(tmp_path: Path) -> None:
    env = {"NOTIFYQ_DATA_DIR": str(tmp_path / "pgdata"), "NOTIFYQ_DSN": ""}
    serve = subprocess.Popen(
        [sys.executable, "-m", "notifyq", "serve", "--app", "examples.hello:app"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        dsn = wait_until(
            lambda: run(["-m", "notifyq", "dsn"], env).stdout.strip(),
            timeout=60,
            message="the private server to be up",
        )
        result = run(["-m", "examples.enqueue_from_python"], env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("job ") == 2
        wait_until(lambda: statuses(dsn) == {"succeeded": 2}, message="both jobs to run")
    finally:
        serve.send_signal(signal.SIGTERM)
        out, _ = serve.communicate(timeout=60)
    assert serve.returncode == 0, out
    assert b"Hello, Ada!" in out and b"HELLO, GRACE!" in out
