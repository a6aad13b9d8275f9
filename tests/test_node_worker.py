"""The Node.js worker of examples/node-worker (the SQL worker protocol) beside `notifyq serve`.

Each test runs `node tasks.js` as a real process, most of them with a `notifyq serve`
process of tests/apps/node_peer.py (the same task names) on the same queue: drains that run
every job exactly once, a concurrency cap and a rate limit that hold across both workers,
kill -9 rescued through the worker's session lock, fenced late outcomes, a job taken away
(cancelled) aborted at the next heartbeat, failures and timeouts through notifyq.fail, and
the hand-back on SIGTERM.  They skip, saying why, without `node` and `npm`; the `node` fixture runs
`npm ci` in examples/node-worker once when its node_modules is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from notifyq import admin
from tests.conftest import REPO, query, serve_process, statuses, wait_until

NODE_DIR = REPO / "examples" / "node-worker"
PEER = "tests.apps.node_peer:app"


@pytest.fixture(scope="session")
def node() -> str:
    """The `node` executable, with the example's dependencies installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(
            "the Node worker needs node and npm on PATH (Debian: apt-get install nodejs npm)"
        )
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return node


def url_dsn(dsn: str) -> str:
    """The DSN as a URL: `pg`, the Node client, reads no key=value strings."""
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    auth = quote(params.pop("user", ""), safe="")
    if "password" in params:
        auth += ":" + quote(params.pop("password"), safe="")
    database = quote(params.pop("dbname", ""), safe="")
    return f"postgresql://{auth}@/{database}?{urlencode(params)}"


class NodeWorker:
    """`node tasks.js` of examples/node-worker as a process; keyword settings become NOTIFYQ_*
    variables (concurrency=5 is NOTIFYQ_CONCURRENCY=5).  Polls every 0.2 s unless told."""

    def __init__(self, node: str, dsn: str, log: Path, **settings: object) -> None:
        env = {**os.environ, "DATABASE_URL": url_dsn(dsn), "NOTIFYQ_POLL_INTERVAL": "0.2"}
        env.update({f"NOTIFYQ_{key.upper()}": str(value) for key, value in settings.items()})
        self.dsn, self.log = dsn, log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [node, "tasks.js"], cwd=NODE_DIR, env=env, stdout=self._out, stderr=subprocess.STDOUT
        )

    def __enter__(self) -> NodeWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._out.close()

    def name(self) -> str:
        """The worker's name, once it holds its session lock (it is serving then)."""

        def ready() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"node worker exited {self.proc.returncode}: {self.output()}")
            rows = query(
                self.dsn,
                "SELECT claimant FROM notifyq.dispatchers"
                " WHERE kind = 'sql' AND liveness_lock AND claimant LIKE %s",
                f"%:{self.proc.pid}:%",
            )
            return str(rows[0][0]) if rows else None

        return str(wait_until(ready, timeout=30, message="the node worker to hold its session"))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(dsn: str, log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`notifyq serve` of the peer app, returned once it is registered."""
    with serve_process(dsn, "--log-level", "info", *args, app=PEER, log=log) as proc:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"notifyq serve exited {proc.returncode}: {log.read_text()}")
            return bool(query(dsn, "SELECT 1 FROM notifyq.dispatchers WHERE kind = 'serve'"))

        wait_until(ready, timeout=30, message="notifyq serve to register")
        yield proc


def insert(dsn: str, n: int, task: str, payload: dict[str, Any], **columns: str) -> list[int]:
    names = ", ".join(["task", "payload", *columns])
    values = ", ".join(["%s", "%s::jsonb", *(["%s"] * len(columns))])
    rows = query(
        dsn,
        f"INSERT INTO notifyq.jobs ({names}) SELECT {values} FROM generate_series(1, %s)"
        " RETURNING id",
        task,
        json.dumps(payload),
        *columns.values(),
        n,
    )
    return sorted(r[0] for r in rows)


def claims_by_kind(dsn: str) -> dict[str, int]:
    """How many claims (status changes to running) each kind of worker made."""
    return dict(
        query(
            dsn,
            "SELECT d.kind, count(*) FROM notifyq.job_history h"
            " JOIN notifyq.dispatchers d ON d.claimant = h.dispatcher"
            " WHERE h.to_status = 'running' GROUP BY d.kind",
        )
    )


def running_under(dsn: str, claimant: str) -> int:
    rows = query(
        dsn,
        "SELECT count(*) FROM notifyq.jobs WHERE status = 'running' AND claimed_by = %s",
        claimant,
    )
    return int(rows[0][0])


def test_node_and_serve_drain_one_queue_exactly_once(node: str, dsn: str, tmp_path: Path) -> None:
    jobs = 10_000  # 3.5 s on an idle 2-core machine, 45 s on a very busy one
    with (
        serving(dsn, tmp_path / "serve.log", "-c", "50"),
        NodeWorker(node, dsn, tmp_path / "node.log", concurrency=50, batch=50) as worker,
    ):
        worker.name()
        insert(dsn, jobs, "example.noop", {})
        wait_until(
            lambda: statuses(dsn) == {"succeeded": jobs},
            timeout=90,
            interval=0.1,
            message=f"{jobs} jobs to succeed",
        )
    # Every job claimed once, by one of the two, and succeeded at its first attempt.
    assert query(dsn, "SELECT count(*) FROM notifyq.jobs WHERE attempts <> 1") == [(0,)]
    assert query(
        dsn,
        "SELECT count(*) FROM (SELECT job_id FROM notifyq.job_history"
        " WHERE to_status IN ('running', 'succeeded') GROUP BY job_id"
        " HAVING count(*) FILTER (WHERE to_status = 'running') <> 1"
        " OR count(*) FILTER (WHERE to_status = 'succeeded') <> 1) AS odd",
    ) == [(0,)]
    claims = claims_by_kind(dsn)
    assert sum(claims.values()) == jobs
    assert claims.get("sql", 0) > 0 and claims.get("serve", 0) > 0, claims


def test_queue_cap_holds_across_node_and_serve(node: str, dsn: str, tmp_path: Path) -> None:
    query(dsn, "INSERT INTO notifyq.queue_limits (queue, max_running) VALUES ('capped', 4)")
    peak = 0
    with (
        serving(dsn, tmp_path / "serve.log", "-c", "3", "-q", "capped", "--poll-interval", "0.2"),
        NodeWorker(node, dsn, tmp_path / "node.log", concurrency=3, queues="capped") as worker,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        worker.name()
        # 6 slots between the two, 4 allowed: the cap is what holds them back.
        insert(dsn, 40, "example.sleep", {"ms": 100}, queue="capped")
        deadline = time.monotonic() + 60
        while True:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'running'),"
                " count(*) FILTER (WHERE status = 'succeeded')"
                " FROM notifyq.jobs WHERE queue = 'capped'"
            ).fetchone()
            assert row is not None
            peak = max(peak, row[0])
            if row[1] == 40:
                break
            assert time.monotonic() < deadline, f"not drained: {statuses(dsn)}"
            time.sleep(0.005)
    assert peak == 4
    claims = claims_by_kind(dsn)
    assert claims.get("sql", 0) > 0 and claims.get("serve", 0) > 0, claims


def test_rate_limit_holds_across_node_and_serve(node: str, dsn: str, tmp_path: Path) -> None:
    query(dsn, "INSERT INTO notifyq.rate_limits (rate_key, per_second) VALUES ('api', 5)")
    n = 15
    with (
        serving(dsn, tmp_path / "serve.log", "-c", "1", "--poll-interval", "0.2"),
        NodeWorker(node, dsn, tmp_path / "node.log", concurrency=1) as worker,
    ):
        worker.name()
        # 5 starts a second; a job takes 0.3 s, so neither worker alone keeps up.
        insert(dsn, n, "example.sleep", {"ms": 300}, rate_key="api")
        wait_until(lambda: statuses(dsn) == {"succeeded": n}, timeout=60, message="the jobs")
    starts = [
        float(at)
        for (at,) in query(
            dsn,
            "SELECT extract(epoch FROM at)::float8 FROM notifyq.job_history"
            " WHERE to_status = 'running' ORDER BY at",
        )
    ]
    assert len(starts) == n
    # The first start takes the empty bucket; each later one waits its 0.2 s slot.
    assert starts[-1] - starts[0] >= (n - 1) / 5 - 0.01
    claims = claims_by_kind(dsn)
    assert claims.get("sql", 0) > 0 and claims.get("serve", 0) > 0, claims


@pytest.mark.parametrize("rescuer", ["serve", "node"])
def test_kill9_of_node_worker_rescued_through_its_session(
    node: str, dsn: str, tmp_path: Path, rescuer: str
) -> None:
    with NodeWorker(node, dsn, tmp_path / "victim.log", concurrency=10) as victim:
        name = victim.name()
        ids = insert(dsn, 8, "example.sleep", {"ms": 60_000})
        wait_until(lambda: running_under(dsn, name) == 8, message="the victim to hold the jobs")
        # The next attempts are quick; the victim's handlers already have their payloads.
        query(dsn, "UPDATE notifyq.jobs SET payload = '{\"ms\": 50}' WHERE id = ANY(%s)", ids)
        other: Any = (
            serving(dsn, tmp_path / "serve.log")
            if rescuer == "serve"
            else NodeWorker(node, dsn, tmp_path / "rescuer.log")
        )
        with other as proc:
            if rescuer == "node":
                proc.name()
            victim.kill()
            killed_at = time.monotonic()
            wait_until(lambda: statuses(dsn) == {"succeeded": 8}, timeout=30, message="the rescue")
            took = time.monotonic() - killed_at
    # A 30 s lease has not expired: the free session lock told the rescuer.
    assert took < 10, took
    rows = query(dsn, "SELECT attempts, last_error FROM notifyq.jobs ORDER BY id")
    assert all(attempts == 2 for attempts, _ in rows), rows
    assert all("database session" in error and name in error for _, error in rows), rows
    second = query(
        dsn,
        "SELECT DISTINCT dispatcher FROM notifyq.job_history WHERE to_status = 'running'"
        " AND attempt = 2",
    )
    assert len(second) == 1 and second[0][0] != name


def test_late_outcomes_after_a_rescue_change_nothing(node: str, dsn: str, tmp_path: Path) -> None:
    with NodeWorker(node, dsn, tmp_path / "victim.log") as victim:
        name = victim.name()
        slow, quick = insert(dsn, 2, "example.sleep", {"ms": 60_000})
        wait_until(lambda: running_under(dsn, name) == 2, message="the victim to hold the jobs")
        # After the rescue, `quick` succeeds at once and `slow` runs on (attempt 2) in serve.
        query(dsn, "UPDATE notifyq.jobs SET payload = '{\"ms\": 10}' WHERE id = %s", quick)
        with serving(dsn, tmp_path / "serve.log"):
            victim.kill()
            wait_until(
                lambda: query(
                    dsn,
                    "SELECT count(*) = 2 FROM notifyq.jobs WHERE attempts = 2"
                    " AND (id = %s AND status = 'succeeded'"
                    "      OR id = %s AND status = 'running' AND claimed_by <> %s)",
                    quick,
                    slow,
                    name,
                )[0][0],
                message="the rescue",
            )
            snapshot = (
                "SELECT to_jsonb(j) - 'lease_expires_at' FROM notifyq.jobs j ORDER BY id",
                "SELECT count(*) FROM notifyq.job_history",
            )
            before = [query(dsn, sql) for sql in snapshot]
            late = query(
                dsn,
                "SELECT notifyq.complete(%s, %s, '{\"late\": 1}', 1),"
                " notifyq.complete(%s, %s, '{\"late\": 1}', 1),"
                " notifyq.complete(%s, %s),"
                " notifyq.fail(%s, %s, 'late', attempt => 1),"
                " notifyq.fail(%s, %s, 'late', false)",
                *(slow, name, quick, name, slow, name, slow, name, quick, name),
            )
            after = [query(dsn, sql) for sql in snapshot]
    assert late == [(False, False, False, None, None)]
    assert after == before


def test_a_job_taken_away_is_aborted_at_the_next_heartbeat(
    node: str, dsn: str, tmp_path: Path
) -> None:
    with NodeWorker(node, dsn, tmp_path / "node.log", concurrency=1) as worker:
        name = worker.name()
        [cancelled] = insert(dsn, 1, "example.sleep", {"ms": 60_000})
        wait_until(lambda: running_under(dsn, name) == 1, message="the worker to hold the job")
        [waiting] = insert(dsn, 1, "example.noop", {})
        admin.cancel_job(dsn, cancelled)
        # The heartbeat does not return the job: its signal aborts the sleep, which frees
        # the only slot; the failure it reports is fenced out.
        wait_until(
            lambda: statuses(dsn) == {"cancelled": 1, "succeeded": 1},
            message="the slot freed for the next job",
        )
        wait_until(lambda: "too late" in worker.output(), message="the fenced failure logged")
    assert f"job {cancelled} (attempt 1) is no longer ours" in worker.output()
    assert query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", waiting) == [("succeeded",)]


def test_sigterm_hands_back_running_jobs_and_marks_the_worker_stopped(
    node: str, dsn: str, tmp_path: Path
) -> None:
    with NodeWorker(node, dsn, tmp_path / "node.log", shutdown_timeout=3) as worker:
        name = worker.name()
        long = insert(dsn, 3, "example.sleep", {"ms": 60_000})
        short = insert(dsn, 2, "example.sleep", {"ms": 1_000})
        wait_until(lambda: running_under(dsn, name) == 5, message="the worker to hold the jobs")
        worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "no more claims" in worker.output(), message="the signal handled")
        later = insert(dsn, 1, "example.noop", {})
        # The short jobs finish within the 3 s grace; the long ones are handed back.
        assert worker.proc.wait(15) == 0, worker.output()
    jobs = {
        job_id: (status, attempts, claimed_by)
        for job_id, status, attempts, claimed_by in query(
            dsn, "SELECT id, status, attempts, claimed_by FROM notifyq.jobs"
        )
    }
    assert [jobs[i] for i in long] == [("queued", 0, None)] * 3
    assert [jobs[i] for i in short] == [("succeeded", 1, None)] * 2
    assert [jobs[i] for i in later] == [("queued", 0, None)]  # no claim after the signal
    assert query(
        dsn,
        "SELECT kind, state, running FROM notifyq.dispatcher_status WHERE claimant = %s",
        name,
    ) == [("sql", "stopped", 0)]
    assert "3 job(s) handed back" in worker.output()


def test_failures_and_timeouts_go_through_notifyq_fail(node: str, dsn: str, tmp_path: Path) -> None:
    query(
        dsn,
        "INSERT INTO notifyq.tasks (task, max_attempts, backoff_base, timeout) VALUES"
        " ('example.flaky', 3, '0', NULL), ('example.sleep', 1, '0', '0.3 s')",
    )
    doomed = insert(dsn, 2, "example.flaky", {"failRate": 1})
    lucky = insert(dsn, 2, "example.flaky", {"failRate": 0})
    slow = insert(dsn, 1, "example.sleep", {"ms": 60_000})
    with NodeWorker(node, dsn, tmp_path / "node.log"):
        wait_until(lambda: statuses(dsn) == {"dead": 3, "succeeded": 2}, message="every job to end")
    rows = {
        job_id: (status, attempts, error, result)
        for job_id, status, attempts, error, result in query(
            dsn, "SELECT id, status, attempts, last_error, result FROM notifyq.jobs"
        )
    }
    for i in doomed:
        status, attempts, error, _ = rows[i]
        assert (status, attempts) == ("dead", 3)
        assert "attempt 3 failed on purpose" in error
    assert [rows[i] for i in lucky] == [("succeeded", 1, None, {"attempt": 1})] * 2
    status, attempts, error, _ = rows[slow[0]]
    assert (status, attempts) == ("dead", 1)
    assert "timed out after 0.3 s" in error
