"""The `notifyq` command as users run it: real subprocesses, real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from notifyq.migrate import SCHEMA_VERSION
from tests.apps.ledger import LEDGER_DDL
from tests.conftest import REPO, query, serve_process, statuses, wait_until


def notifyq(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifyq", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def listeners(dsn: str) -> int:
    return int(
        query(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'notifyq:listen'",
        )[0][0]
    )


def test_help_explains_every_serve_option() -> None:
    result = notifyq("serve", "--help")
    assert result.returncode == 0
    for option in (
        "--app",
        "--dsn",
        "--concurrency",
        "--queues",
        "--poll-interval",
        "--lease",
        "--shutdown-timeout",
        "--batch-size",
        "--no-listen",
        "--migrate",
        "--metrics-host",
    ):
        assert option in result.stdout
    # The defaults shown are Settings' own (settings.py), not a second copy.
    assert "[default: 10]" in result.stdout  # --concurrency
    assert "[default: 127.0.0.1]" in result.stdout  # --metrics-host
    assert "XDG_DATA_HOME" in result.stdout


def test_enqueue_prints_the_id_and_honours_options(dsn: str) -> None:
    result = notifyq(
        "enqueue",
        "hello.greet",
        '{"name": "Ada"}',
        "--queue",
        "greetings",
        "--priority",
        "7",
        "--delay",
        "60",
        "--max-attempts",
        "2",
        "--dsn",
        dsn,
    )
    assert result.returncode == 0, result.stderr
    job_id = int(result.stdout)
    assert query(
        dsn,
        "SELECT id, queue, task, payload, priority, max_attempts,"
        " run_at > now() + interval '50 seconds' FROM notifyq.jobs",
    ) == [(job_id, "greetings", "hello.greet", {"name": "Ada"}, 7, 2, True)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["serve", "--app", "no_such_module:app"],
            "notifyq: error: cannot import 'no_such_module'",
        ),
        (["serve", "--app", "examples.hello:log"], "is not a notifyq.App"),
        (
            ["serve", "--app", "examples.hello:nope"],
            "notifyq: error: --app examples.hello:nope: module 'examples.hello' has no "
            "attribute 'nope' (its notifyq.App: app)",
        ),
    ],
)
def test_errors_are_one_line_without_traceback(dsn: str, args: list[str], message: str) -> None:
    result = notifyq(*args, "--dsn", dsn)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs") == [(0,)]


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("foo", "notifyq: error: invalid connection string"),
        ("postgresql://postgres@127.0.0.1:1/x?connect_timeout=2", "cannot reach PostgreSQL"),
    ],
)
def test_bad_dsn_is_one_line(dsn: str, message: str) -> None:
    for args in (["migrate"], ["enqueue", "t"], ["serve", "--app", "examples.hello:app"]):
        result = notifyq(*args, "--dsn", dsn)
        assert result.returncode == 1
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    result = notifyq("migrate", "--dsn", f"postgresql://postgres@/x?host={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.startswith("notifyq: error: cannot reach PostgreSQL")
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_database_without_schema_until_migrated(empty_dsn: str) -> None:
    result = notifyq("serve", "--app", "examples.hello:app", "--dsn", empty_dsn)
    assert result.returncode == 1
    assert (
        "the notifyq schema is not installed in this database: run `notifyq migrate`"
        in result.stderr
    )
    first = notifyq("migrate", "--dsn", empty_dsn)
    again = notifyq("migrate", env={"NOTIFYQ_DSN": empty_dsn})
    assert first.stdout == f"schema migrated from version none to {SCHEMA_VERSION}\n"
    assert again.stdout == f"schema already at version {SCHEMA_VERSION}\n"


def test_serve_runs_sql_enqueued_jobs_and_stops_cleanly_on_sigterm(
    dsn: str, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with serve_process(dsn, "--app", "examples.hello:app", app="", log=log) as proc:
        wait_until(lambda: listeners(dsn) == 1, message="the dispatcher to LISTEN")
        query(
            dsn,
            """INSERT INTO notifyq.jobs (task, payload) VALUES
                      ('hello.greet', '{"name": "Ada"}'), ('hello.shout', '{"name": "bob"}'),
                      ('hello.shout', '{}')""",
        )
        wait_until(
            lambda: statuses(dsn) == {"succeeded": 2, "dead": 1}, message="all three to finish"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "Hello, Ada!" in text and "HELLO, BOB!" in text
    assert "received SIGTERM: shutting down gracefully" in text
    assert "stopped; since start: claimed=3 succeeded=2 retried=0 dead=1" in text
    assert "dead job=3 task=hello.shout attempt=1/3: PayloadError: hello.shout needs" in text
    assert "claimed job=1 task=hello.greet queue=default attempt=1/5" in text


def test_zero_setup_private_server_is_shared_with_a_second_terminal(tmp_path: Path) -> None:
    env = {"NOTIFYQ_DATA_DIR": str(tmp_path / "pgdata"), "NOTIFYQ_DSN": ""}
    assert notifyq("dsn", env=env).returncode == 1  # nothing running yet
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "notifyq", "serve", "--app", "examples.hello:app"],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        printed = wait_until(
            lambda: notifyq("dsn", env=env).stdout.strip(),
            timeout=60,
            message="the private server to be up",
        )
        wait_until(lambda: listeners(printed) == 1, timeout=60, message="the dispatcher")
        # "A second terminal": plain SQL through the printed DSN, and the CLI.
        with psycopg.connect(printed, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO notifyq.jobs (task, payload)"
                """ VALUES ('hello.greet', '{"name": "Ada"}')"""
            )
        assert notifyq("enqueue", "hello.greet", '{"name": "Bo"}', env=env).returncode == 0
        wait_until(lambda: statuses(printed) == {"succeeded": 2}, message="jobs to run")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert b"Hello, Ada!" in out and b"Hello, Bo!" in out
    # The last process using the private server stopped it.
    assert notifyq("dsn", env=env).returncode == 1


def test_sql_example_runs_as_written(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((REPO / "examples" / "enqueue.sql").read_bytes())
    assert statuses(dsn) == {"queued": 104}


def test_python_enqueue_example_runs_as_written(dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.enqueue_from_python"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NOTIFYQ_DSN": dsn, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert query(dsn, "SELECT task, priority FROM notifyq.jobs ORDER BY id") == [
        ("hello.greet", 0),
        ("hello.shout", 5),
    ]


def test_serve_queues_and_poll_only_mode(dsn: str, tmp_path: Path) -> None:
    query(dsn, LEDGER_DDL)
    with serve_process(
        dsn,
        "--queues",
        "other, more",
        "--no-listen",
        "--poll-interval",
        "0.2",
        log=tmp_path / "serve.log",
    ):
        query(
            dsn,
            "INSERT INTO notifyq.jobs (task, queue) VALUES ('ledger.record', 'other'),"
            " ('ledger.record', 'default'), ('ledger.record', 'more')",
        )
        wait_until(
            lambda: statuses(dsn) == {"succeeded": 2, "queued": 1},
            message="the served queues' jobs",
        )
        assert listeners(dsn) == 0  # poll-only: no LISTEN connection at all
    assert query(dsn, "SELECT queue FROM notifyq.jobs WHERE status = 'queued'") == [("default",)]
    assert "serving queues=other,more" in (tmp_path / "serve.log").read_text()
