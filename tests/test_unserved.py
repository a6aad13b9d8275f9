"""Jobs no live dispatcher can run: a dispatcher claims only the tasks it has handlers for,
so a second app serving the same queue leaves the first app's jobs queued, and `notifyq
health`, `notifyq watch` and the metrics say which jobs wait and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from notifyq import store
from tests.apps.ledger import LEDGER_DDL
from tests.conftest import REPO, query, serve_process, statuses, wait_until
from tests.test_metrics import free_port, get, sample


def notifyq(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFYQ_DSN"}
    return subprocess.run(
        [sys.executable, "-m", "notifyq", *args, "--dsn", dsn],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "200"},
        timeout=60,
    )


def unserved(dsn: str) -> list[store.rows.UnservedJobs]:
    with store.connect_sync(dsn) as conn:
        return store.monitoring.unserved_jobs(conn)


def polls(port: int) -> float:
    return sample(get(port, "/metrics")[1], "notifyq_polls_total") or 0.0


def test_a_second_app_leaves_the_first_apps_jobs_queued_and_reports_them(dsn: str) -> None:
    query(dsn, LEDGER_DDL)
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload)"
        """ SELECT 'hello.greet', '{"name": "Ada"}' FROM generate_series(1, 3);"""
        " INSERT INTO notifyq.jobs (task) VALUES ('ledger.record');"
        # A queue no dispatcher serves at all.
        " INSERT INTO notifyq.jobs (task, queue) VALUES ('ledger.record', 'reports')",
    )
    port = free_port()
    # The second app (no hello.greet handler), with the default --queues: 'default' too.
    with serve_process(
        dsn, "--metrics-port", str(port), "--poll-interval", "0.1", app="tests.apps.ledger:app"
    ) as other:
        wait_until(lambda: statuses(dsn) == {"queued": 4, "succeeded": 1}, message="its own job")
        registered = query(dsn, "SELECT queues, tasks FROM notifyq.dispatchers")
        assert registered == [(["default"], ["ledger.hold", "ledger.record"])]
        # Every poll from now on (ten a second) sees the first app's jobs ready, none ours.
        wait_until(lambda: polls(port) > 0, message="the metrics")
        seen = polls(port)
        wait_until(lambda: polls(port) >= seen + 3, message="three more polls")
        assert (
            query(
                dsn,
                "SELECT status, attempts, last_error FROM notifyq.jobs WHERE task = 'hello.greet'",
            )
            == [("queued", 0, None)] * 3
        )

        done = notifyq(dsn, "health", "--json")
        assert done.returncode == 2, done.stdout + done.stderr
        check = next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "unserved")
        assert check["status"] == "warning"
        assert check["details"]["jobs"] == 4
        assert {
            (u["queue"], u["task"], u["jobs"], u["queue_served"])
            for u in check["details"]["unserved"]
        } == {("default", "hello.greet", 3, True), ("reports", "ledger.record", 1, False)}
        assert (
            "3 of task 'hello.greet' in queue 'default' (no live dispatcher has a handler for"
            " the task)" in check["message"]
        )
        assert (
            "1 of task 'ledger.record' in queue 'reports' (no live dispatcher serves"
            in (check["message"])
        )

        text = notifyq(dsn, "watch", "--once").stdout
        assert "no dispatcher handles task hello.greet (queue default): 3 ready" in text
        assert "no dispatcher serves queue reports: 1 ready (ledger.record)" in text
        snap = json.loads(notifyq(dsn, "watch", "--once", "--json").stdout)
        assert {(u["queue"], u["task"], u["jobs"]) for u in snap["unserved"]} == {
            ("default", "hello.greet", 3),
            ("reports", "ledger.record", 1),
        }

        metrics = get(port, "/metrics")[1]
        assert sample(metrics, "notifyq_unserved_jobs", queue="default", task="hello.greet") == 3
        assert sample(metrics, "notifyq_unserved_jobs", queue="reports", task="ledger.record") == 1

        # The first app starts: it runs its jobs, and they are no longer reported.
        with serve_process(dsn, app="examples.hello:app"):
            wait_until(
                lambda: statuses(dsn) == {"queued": 1, "succeeded": 4}, message="hello.greet"
            )
            left = [(u.queue, u.task) for u in unserved(dsn)]
            assert left == [("reports", "ledger.record")]
        metrics = get(port, "/metrics")[1]
        assert sample(metrics, "notifyq_unserved_jobs", queue="default", task="hello.greet") is None
        assert other.poll() is None


@pytest.mark.parametrize(
    ("state", "tasks", "reported"),
    [
        ("running", ["t"], []),
        ("running", ["other"], [("default", "t", True)]),
        ("running", None, []),  # registered before schema version 8: it claims any task
        ("lost", ["t"], [("default", "t", False)]),
        ("stopped", ["t"], [("default", "t", False)]),
    ],
    ids=["handles-it", "other-task", "any-task", "lost", "stopped"],
)
def test_only_a_live_dispatcher_with_the_task_serves_a_job(
    dsn: str, state: str, tasks: list[str] | None, reported: list[tuple[str, str, bool]]
) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.jobs (task) VALUES ('t'), ('t');"
        # Scheduled for later: not waiting yet, so never reported.
        " INSERT INTO notifyq.jobs (task, run_at) VALUES ('later', now() + interval '1 hour')",
    )
    query(
        dsn,
        "INSERT INTO notifyq.dispatchers (claimant, host, pid, queues, concurrency, heartbeat,"
        " heartbeat_at, stopped_at, tasks) VALUES ('h:1:x', 'h', 1, '{default}', 1, 10,"
        " now() - CASE WHEN %s = 'lost' THEN interval '1 hour' ELSE interval '0' END,"
        " CASE WHEN %s = 'stopped' THEN now() END, %s)",
        state,
        state,
        tasks,
    )
    found = unserved(dsn)
    assert [(u.queue, u.task, u.served) for u in found] == reported
    assert all(u.jobs == 2 for u in found)


def test_a_huge_unserved_backlog_is_counted_up_to_ten_thousand(dsn: str) -> None:
    """Every watch refresh, health check and scrape asks: it must not count a million."""
    query(
        dsn, "INSERT INTO notifyq.jobs (task) SELECT 'nobody.runs' FROM generate_series(1, 10050)"
    )
    (row,) = unserved(dsn)
    assert (row.task, row.jobs, row.more) == ("nobody.runs", 10_000, True)
    result = notifyq(dsn, "health", "--json")
    (check,) = [c for c in json.loads(result.stdout)["checks"] if c["name"] == "unserved"]
    assert check["message"].startswith("10000+ ready jobs wait")
