"""`notifyq serve --metrics-port`: Prometheus counters that match the jobs run, /healthz and
/readyz, scraped over HTTP from a real dispatcher process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import psycopg

from tests.apps.ledger import LEDGER_DDL
from tests.conftest import REPO, query, serve_process, statuses, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels must match exactly)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name:
            have = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
            if have == want:
                return float(match.group(3))
    return None


def test_metrics_count_the_jobs_run_and_probes_answer(dsn: str) -> None:
    query(dsn, LEDGER_DDL)
    port = free_port()
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task) SELECT 'ok.record' FROM generate_series(1, 4);"
        "INSERT INTO notifyq.jobs (task) VALUES ('bad.raise');"
        "INSERT INTO notifyq.jobs (task, run_at) VALUES ('ok.record', now() + interval '1h')",
    )
    with serve_process(
        dsn,
        "--metrics-port",
        str(port),
        app="tests.apps.misbehaving:app",
    ):
        wait_until(lambda: get(port, "/healthz")[0] == 200, message="/healthz")
        wait_until(lambda: get(port, "/readyz") == (200, "ready\n"), message="/readyz")
        wait_until(
            lambda: statuses(dsn) == {"succeeded": 4, "dead": 1, "queued": 1},
            message="the jobs to finish",
        )
        ok = {"queue": "default", "task": "ok.record"}
        bad = {"queue": "default", "task": "bad.raise"}

        # A dead job is counted once the completer has the database's reply, a moment
        # after the row changed.
        def counted_dead() -> str | None:
            text = get(port, "/metrics")[1]
            return text if sample(text, "notifyq_jobs_dead_total", **bad) == 1 else None

        text = wait_until(counted_dead, message="the dead job counted")
        assert sample(text, "notifyq_jobs_started_total", **ok) == 4
        assert sample(text, "notifyq_jobs_succeeded_total", **ok) == 4
        assert sample(text, "notifyq_jobs_started_total", **bad) == 2  # max_attempts=2
        assert sample(text, "notifyq_jobs_failed_total", **bad) == 2
        assert sample(text, "notifyq_jobs_dead_total", **bad) == 1
        assert sample(text, "notifyq_job_run_seconds_count", **ok) == 4
        assert sample(text, "notifyq_job_wait_seconds_count", **ok) == 4
        assert sample(text, "notifyq_queue_depth", queue="default", state="scheduled") == 1
        assert sample(text, "notifyq_queue_depth", queue="default", state="ready") == 0
        assert sample(text, "notifyq_database_up") == 1
        assert (sample(text, "notifyq_notifications_total") or 0) >= 1
        # The three INSERT statements came before any dispatcher stated its appetite.
        assert sample(text, "notifyq_wakeups_sent_total") == 3
        assert sample(text, "notifyq_wakeups_skipped_total") == 0
        # Every job was announced: by the start-up catch-up, a retry's notification, a timer.
        assert sample(text, "notifyq_polls_with_work_total") == 0
        assert get(port, "/nothing")[0] == 404


def test_polls_with_work_counts_only_notifications_really_lost(dsn: str) -> None:
    query(dsn, LEDGER_DDL)
    port = free_port()
    with serve_process(
        dsn, "--metrics-port", str(port), "--poll-interval", "0.3", app="tests.apps.ledger:app"
    ):
        wait_until(lambda: get(port, "/readyz") == (200, "ready\n"), message="/readyz")
        query(dsn, "INSERT INTO notifyq.jobs (task) VALUES ('ledger.record')")
        wait_until(lambda: statuses(dsn) == {"succeeded": 1}, message="the announced job")
        assert sample(get(port, "/metrics")[1], "notifyq_polls_with_work_total") == 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            # Triggers do not fire for a session in replica mode: no notification is sent.
            conn.execute("SET session_replication_role = replica")
            conn.execute("INSERT INTO notifyq.jobs (task) VALUES ('ledger.record')")
        wait_until(lambda: statuses(dsn) == {"succeeded": 2}, message="the unannounced job")
        assert sample(get(port, "/metrics")[1], "notifyq_polls_with_work_total") == 1


def test_a_missing_prometheus_client_is_one_clear_line() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None; from notifyq.cli import main; main()"
    )
    args = ("--metrics-port", "0", "--dsn", "postgresql://nobody@127.0.0.1:1/none")
    done = subprocess.run(
        [sys.executable, "-c", code, *("serve", "--app", "tests.apps.ledger:app"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "notifyq: error: --metrics-port needs prometheus-client, which is not installed: "
        "pip install 'notifyq[metrics]' (the extra), in the environment notifyq runs from"
    )
